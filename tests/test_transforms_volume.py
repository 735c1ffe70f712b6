"""Volume transforms: loading NIfTI / DICOM, intensity scaling, slicing and its exact inverse."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_multiad.data.synthetic_volumes import (
    make_affine,
    rotation_matrix,
    itk_geometry_from_affine,
    make_phantom_volume,
    write_dicom_series,
    write_nifti,
)
from monai_multiad.errors import MultiADInputError
from monai_multiad.transforms import (
    CT_WINDOWS,
    LoadVolume,
    LoadVolumed,
    ScaleIntensityByModality,
    ScaleIntensityByModalityd,
    SlicesToVolume,
    SlicesToVolumed,
    VolumeToSlices,
    VolumeToSlicesd,
    load_volume,
    slice_affine,
    slices_to_volume,
    volume_to_slices,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


AFFINES = {
    "identity": np.eye(4),
    "flipped": make_affine(np.diag([-1.0, 1.0, -1.0]), (10, -5, 3)),
    "permuted": make_affine(np.array([[0, 0, -1.0], [1.0, 0, 0], [0, -1.0, 0]]), (4, 5, 6)),
    "anisotropic": make_affine(np.diag([0.5, 2.0, 3.3]), (-20, 7, 1)),
    "oblique": make_affine(rotation_matrix((1, 2, 3), 30) @ np.diag([0.8, 1.2, 2.5]), (12, -30, 44)),
}


def _mt(array, affine) -> torch.Tensor:
    from monai.data import MetaTensor

    return MetaTensor(torch.as_tensor(np.asarray(array, np.float32))[None], affine=torch.as_tensor(affine))


def _oriented(vol):
    from monai.transforms import Orientation

    return Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(vol)


# ----------------------------------------------------------------------------- loading
def test_nifti_round_trip(tmp_path):
    aff = AFFINES["oblique"]
    image, label = make_phantom_volume((16, 18, 10), affine=aff)
    assert image.dtype == np.float32 and label.dtype == np.uint8 and label.sum() > 0 and image.max() > 700
    vol = LoadVolume()(write_nifti(tmp_path / "a.nii.gz", image, aff))
    assert vol.shape == (1, 16, 18, 10) and vol.dtype == torch.float32
    np.testing.assert_array_equal(vol[0].numpy(), image)
    np.testing.assert_allclose(vol.affine.numpy(), aff, atol=1e-5)
    assert vol.meta["modality"] is None and vol.meta["filename_or_obj"].endswith("a.nii.gz")
    assert tuple(vol.meta["spatial_shape"]) == (16, 18, 10)
    from monai.data import NibabelReader
    from monai.transforms import LoadImage

    monai_vol = LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True)(tmp_path / "a.nii.gz")
    assert torch.equal(vol.as_tensor(), monai_vol.as_tensor())  # same voxels and affine as MONAI's reader
    assert torch.allclose(vol.affine, monai_vol.affine)
    _, no_lesion = make_phantom_volume((16, 18, 10), lesion=False)
    assert no_lesion.sum() == 0


@pytest.mark.parametrize("name", ["identity", "flipped", "permuted", "anisotropic", "oblique"])
def test_dicom_series_matches_nifti_with_same_geometry(tmp_path, name):
    aff = AFFINES[name]
    image = np.rint(make_phantom_volume((12, 14, 6), affine=aff, seed=1)[0])
    nifti = load_volume(write_nifti(tmp_path / "a.nii.gz", image, aff))
    spacing, origin, direction = itk_geometry_from_affine(aff)
    write_dicom_series(tmp_path / "dcm", image, spacing, origin, direction, modality="MR", series_uid="1.2.3.4")
    dicom = load_volume(tmp_path / "dcm")
    assert dicom.meta["modality"] == "MR" and dicom.meta["series_uid"] == "1.2.3.4"
    if np.linalg.det(np.reshape(direction, (3, 3))) > 0:  # slice order along the normal = array order
        np.testing.assert_array_equal(dicom.numpy(), nifti.numpy())
        np.testing.assert_allclose(dicom.affine.numpy(), aff, atol=1e-4)
    else:  # left-handed: the slices come sorted the other way; same voxels on the same grid
        a, b = _oriented(dicom), _oriented(nifti)
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-4)


def test_dicom_ct_hounsfield_and_single_files(tmp_path):
    hu = np.full((10, 8, 4), -1000.0)
    hu[2:8, 2:6, 1:3] = 40.0
    hu[4, 4, 2] = 1500.0
    write_dicom_series(tmp_path / "ct", hu, (0.7, 0.7, 2.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1), modality="CT")
    vol = LoadVolume()(tmp_path / "ct")
    np.testing.assert_array_equal(vol[0].numpy(), hu)
    assert vol.meta["modality"] == "CT"
    np.testing.assert_allclose(np.diag(vol.affine.numpy())[:3], [-0.7, -0.7, 2.0], atol=1e-5)
    one = load_volume(tmp_path / "ct" / "IM0002.dcm")  # a single DICOM file is a Z = 1 volume
    assert one.shape == (1, 10, 8, 1)
    np.testing.assert_array_equal(one[0, ..., 0].numpy(), hu[..., 1])
    write_dicom_series(tmp_path / "single", hu[..., :1], modality="CT")
    assert load_volume(tmp_path / "single").shape == (1, 10, 8, 1)


def _series(folder, n=6, **kw):
    return write_dicom_series(folder, np.arange(8 * 9 * n, dtype=float).reshape(8, 9, n), (1.0, 1.0, 2.0), **kw)


def _set(file, **tags):
    import pydicom

    ds = pydicom.dcmread(file)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(file)


def _raises(path, *fragments, **kw):
    with pytest.raises(MultiADInputError) as info:
        load_volume(path, **kw)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_bad_paths_and_files(tmp_path):
    import nibabel as nib
    import SimpleITK as sitk

    _raises(tmp_path / "nope.nii.gz", "no such file")
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", "empty folder")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("hello")
    _raises(tmp_path / "text", "no DICOM files")
    _raises(write_nifti(tmp_path / "flat.nii.gz", np.ones((6, 7), np.float32)), "2D image", "ndim 2")
    _raises(write_nifti(tmp_path / "one.nii.gz", np.ones((6, 7, 1), np.float32)), "2D image", "single slice")
    png = tmp_path / "x.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 12), np.uint8)), str(png))
    _raises(png, "2D image")
    _raises(write_nifti(tmp_path / "t.nii.gz", np.ones((4, 5, 6, 3), np.float32)), "4D data")
    assert load_volume(write_nifti(tmp_path / "t1.nii.gz", np.ones((4, 5, 6, 1), np.float32))).shape == (1, 4, 5, 6)
    nan = np.ones((4, 5, 6), np.float32)
    nan[1, 2, 3] = np.nan
    _raises(write_nifti(tmp_path / "nan.nii.gz", nan), "1 NaN")
    singular = np.eye(4)
    singular[2, 2] = 0.0
    _raises(write_nifti(tmp_path / "sing.nii.gz", np.ones((4, 5, 6), np.float32), singular), "singular affine")
    assert nib.load(str(tmp_path / "sing.nii.gz")).affine[2, 2] == 0


def test_bad_dicom_series(tmp_path):
    files = _series(tmp_path / "missing")
    files[2].unlink()
    _raises(tmp_path / "missing", "missing slices", "InstanceNumber jumps from 2 to 4", "gap in slice positions")

    files = _series(tmp_path / "posgap")  # instance numbers consecutive, one position missing
    files[2].unlink()
    for i, f in enumerate(files[3:], start=3):
        _set(f, InstanceNumber=i)
    msg = _raises(tmp_path / "posgap", "missing slices", "gap in slice positions")
    assert "InstanceNumber" not in msg

    files = _series(tmp_path / "uneven")
    for f in files[4:]:
        import pydicom

        z = float(pydicom.dcmread(f).ImagePositionPatient[2])
        _set(f, ImagePositionPatient=[0, 0, z + 0.5])
    _raises(tmp_path / "uneven", "inconsistent spacing between slices", "2.5 mm")

    files = _series(tmp_path / "dup")  # the same position twice: a 4D series
    shutil.copy(files[1], tmp_path / "dup" / "IM0099.dcm")
    _set(tmp_path / "dup" / "IM0099.dcm", InstanceNumber=7, SOPInstanceUID="1.2.3.99")
    _raises(tmp_path / "dup", "4D data")

    files = _series(tmp_path / "oblique_bad", n=1)
    _set(files[0], ImageOrientationPatient=[1, 0, 0, 1, 0, 0])
    _raises(files[0], "singular affine")
    _series(tmp_path / "oblique_bad2", n=3)
    for f in (tmp_path / "oblique_bad2").iterdir():
        _set(f, ImageOrientationPatient=[1, 0, 0, 1, 0, 0])
    _raises(tmp_path / "oblique_bad2", "singular affine")


def test_several_series_need_a_choice(tmp_path):
    _series(tmp_path / "two" / "a", series_uid="1.2.826.1", series_description="T1")
    _series(tmp_path / "two" / "b", n=4, series_uid="1.2.826.2", series_description="FLAIR", modality="CT")
    _raises(tmp_path / "two", "several DICOM series (2)", "1.2.826.1", "1.2.826.2", "'FLAIR'", "series_uid=")
    assert load_volume(tmp_path / "two", series_uid="1.2.826.2").shape == (1, 8, 9, 4)
    assert LoadVolume(series_uid="1.2.826.1")(tmp_path / "two").shape == (1, 8, 9, 6)
    _raises(tmp_path / "two", "not found", series_uid="9.9")


# ----------------------------------------------------------------------------- intensities
def test_ct_windows():
    hu = torch.tensor([[-1000.0, -45.0, 30.0, 105.0, 3000.0]])
    out = ScaleIntensityByModality(mode="ct", preset="liver")(hu)
    assert CT_WINDOWS["liver"] == (30.0, 150.0)
    np.testing.assert_allclose(out.numpy(), [[0.0, 0.0, 0.5, 1.0, 1.0]], atol=1e-6)
    assert out.dtype == torch.float32 and out.meta["intensity_normalisation"] == "ct window liver (level 30, width 150)"
    out = ScaleIntensityByModality(mode="ct", window=(40, 400))(torch.tensor([-160.0, 40.0, 140.0, 240.0]))
    np.testing.assert_allclose(out.numpy(), [0.0, 0.5, 0.75, 1.0], atol=1e-6)
    assert out.meta["intensity_normalisation"] == "ct window (level 40, width 400)"
    for bad in ({"mode": "ct"}, {"mode": "ct", "preset": "kidney"}, {"mode": "pet"}, {"mode": "mri", "lower": 90, "upper": 10}):
        with pytest.raises(MultiADInputError):
            ScaleIntensityByModality(**bad)


def test_mri_percentiles_and_minmax():
    vol = torch.zeros(1, 10, 10, 10)
    fg = torch.arange(1, 501, dtype=torch.float32)
    vol.view(-1)[:500] = fg
    out = ScaleIntensityByModality(mode="mri", lower=1, upper=99)(vol)
    lo, hi = np.percentile(fg.numpy(), [1, 99])
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert float(out.view(-1)[600]) == 0.0  # background stays 0
    np.testing.assert_allclose(float(out.view(-1)[249]), (250 - lo) / (hi - lo), atol=1e-6)
    assert "mri percentiles 1-99" in out.meta["intensity_normalisation"]
    mm = ScaleIntensityByModality(mode="minmax")(vol * 2 - 100)
    assert float(mm.view(-1)[600]) == 0.0 and float(mm.max()) == 1.0  # -100 .. 900
    assert float(mm.view(-1)[0]) == pytest.approx(2 / 1000) and mm.meta["intensity_normalisation"] == "minmax (-100, 900)"
    const = ScaleIntensityByModality(mode="mri")(torch.full((1, 3, 3, 3), 7.0))
    assert float(const.min()) == 1.0


# ----------------------------------------------------------------------------- slicing
def test_axial_axis_comes_from_the_affine():
    # array axes: 0 -> superior, 1 -> right, 2 -> anterior (the slice axis is the first one)
    aff = make_affine(np.array([[0, 1.0, 0], [0, 0, 1.0], [2.0, 0, 0]]))
    arr = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    slices, idx, info = volume_to_slices(_mt(arr, aff), "axial", keep_all=True)
    assert slices.shape == (5, 1, 6, 7) and idx == list(range(5)) and info.slice_dim == 2
    for k in range(5):
        np.testing.assert_array_equal(slices[k, 0].numpy(), arr[k])
    sag, _, _ = volume_to_slices(_mt(arr, aff), "sagittal", keep_all=True)
    assert sag.shape == (6, 1, 7, 5)  # rows anterior, columns superior
    rad, _, _ = volume_to_slices(_mt(arr, aff), "axial", orientation="PLS", keep_all=True)
    for k in range(5):  # radiological display: rows run anterior -> posterior, columns right -> left
        np.testing.assert_array_equal(rad[k, 0].numpy(), arr[k, ::-1, ::-1].T)


@pytest.mark.parametrize("name", list(AFFINES))
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_marked_voxel_round_trip(name, axis):
    aff, shape, mark = AFFINES[name], (7, 9, 11), (2, 5, 8)
    vol = np.zeros(shape, np.float32)
    vol[mark] = 1.0
    slices, idx, info = volume_to_slices(_mt(vol, aff), axis, keep_all=True)
    n, _, r, c = np.unravel_index(int(slices.argmax()), slices.shape)
    world = aff @ np.array([*mark, 1.0])
    np.testing.assert_allclose(slice_affine(info, idx[n]) @ np.array([r, c, 0.0, 1.0]), world, atol=1e-6)
    canon = info.canonical_affine[:3, :3]  # canonical axes point along +R, +A, +S
    assert [int(np.argmax(np.abs(canon[:, m]))) for m in range(3)] == [0, 1, 2]
    assert all(canon[m, m] > 0 for m in range(3))
    marked = torch.zeros_like(slices)
    marked[n, 0, r, c] = 5.0
    back = slices_to_volume(marked, idx, info)
    assert back.shape == (1, *shape) and torch.allclose(back.affine, torch.as_tensor(aff))
    assert tuple(np.argwhere(back[0].numpy() == 5.0)[0]) == mark and float(back.sum()) == 5.0
    # the torch path (GPU tensors, dtypes numpy lacks) gives the same slices and volume
    half, idx16, info16 = volume_to_slices(_mt(vol, aff).to(torch.bfloat16), axis, keep_all=True)
    assert half.dtype == torch.float32 and torch.equal(half, slices) and idx16 == idx
    back16 = slices_to_volume(marked.to(torch.bfloat16), idx16, info16)
    assert back16.dtype == torch.bfloat16 and torch.equal(back16.float(), back.as_tensor())
    if name != "oblique":  # axis-aligned: the canonical stack is MONAI's Orientation("RAS")
        stacked = torch.stack(list(slices[:, 0]), dim=info.slice_dim)
        np.testing.assert_array_equal(stacked.numpy(), _oriented(_mt(vol, aff))[0].numpy())


@pytest.mark.parametrize("name", ["identity", "permuted", "oblique"])
def test_marked_block_round_trip_with_resize(name):
    aff, shape = AFFINES[name], (8, 10, 6)
    vol = np.zeros(shape, np.float32)
    vol[3:6, 4:7, 2:5] = 1.0
    vol[4, 5, 3] = 2.0
    t = VolumeToSlices(axis="axial", spatial_size=(24, 20), keep_all=True)
    slices = t(_mt(vol, aff))
    assert slices[0].shape[1:] == (24, 20)
    k = next(s.meta["slice_index"] for s in slices if float(s.max()) > 1.5)
    top = next(s for s in slices if s.meta["slice_index"] == k)
    r, c = np.unravel_index(int(top[0].argmax()), top.shape[1:])
    world = slice_affine(slices[0].applied_operations[-1]["extra_info"]["geometry"], k) @ [r, c, 0, 1]
    voxel = np.linalg.inv(aff) @ world
    assert np.abs(voxel[:3] - [4, 5, 3]).max() <= 0.75  # within the centre voxel, up to resize rounding
    back = SlicesToVolume()(slices)
    assert back.shape == (1, *shape)
    assert tuple(np.unravel_index(int(back[0].argmax()), shape)) == (4, 5, 3)
    assert float(back[0][vol == 0].max()) < float(back[0][4, 5, 3])
    again = t.inverse(t(_mt(vol, aff)))
    np.testing.assert_allclose(again.numpy(), back.numpy())


def test_one_slice_of_a_reversed_axis_is_cut_and_resized():
    # sagittal slices of a C-ordered array are contiguous; with x reversed, a chunk of one slice has a
    # negative stride on its length-1 axis, which torch.from_numpy refused (screening's last batch of one)
    vol = np.random.default_rng(3).random((6, 5, 4)).astype(np.float32)
    stack, kept, _ = volume_to_slices(_mt(vol, np.diag([-1.0, 1.0, 1.0, 1.0])), "sagittal", spatial_size=(5, 4),
                                      indices=[2], chunk_size=1)
    assert kept == [2]
    np.testing.assert_array_equal(stack[0, 0].numpy(), vol[3])  # canonical slice 2 is array slice 6 - 1 - 2
    resized, _, _ = volume_to_slices(_mt(vol, np.diag([-1.0, 1.0, 1.0, 1.0])), "sagittal", spatial_size=(10, 8),
                                     indices=[2])
    assert resized.shape == (1, 1, 10, 8)


def test_background_slices_skipped_with_indices_kept():
    vol = np.zeros((6, 6, 10), np.float32)
    for k in (3, 4, 7):
        vol[:, :, k] = 1.0
    vol[0, 0, 8] = 1.0  # 1 of 36 voxels: below 5 %
    slices, idx, info = volume_to_slices(_mt(vol, np.eye(4)), min_foreground=0.05)
    assert idx == [3, 4, 7] and slices.shape == (3, 1, 6, 6)
    assert volume_to_slices(_mt(vol, np.eye(4)), min_foreground=0.01)[1] == [3, 4, 7, 8]
    assert volume_to_slices(_mt(vol, np.eye(4)), keep_all=True)[1] == list(range(10))
    back = slices_to_volume(slices * 3, idx, info)
    np.testing.assert_array_equal(back[0].numpy(), np.where(vol * (np.arange(10) != 8) > 0, 3.0, 0.0))
    flipped = make_affine(np.diag([1.0, 1.0, -1.0]))  # z reversed: canonical index k is array slice 9 - k
    assert volume_to_slices(_mt(vol, flipped), min_foreground=0.05)[1] == [2, 5, 6]
    with pytest.raises(MultiADInputError):
        slices_to_volume(slices, [3, 4], info)


def test_dictionary_forms_in_compose(tmp_path):
    from monai.data import list_data_collate
    from monai.transforms import Compose, Lambdad

    image, label = make_phantom_volume((16, 16, 12), affine=AFFINES["flipped"], seed=3)
    data = {"image": str(write_nifti(tmp_path / "i.nii.gz", image, AFFINES["flipped"])),
            "label": str(write_nifti(tmp_path / "l.nii.gz", label, AFFINES["flipped"])), "case": "p1"}
    pipeline = Compose([
        LoadVolumed(["image", "label"]),
        ScaleIntensityByModalityd("image", mode="mri"),
        VolumeToSlicesd(["image", "label"], spatial_size=(32, 32), mode=("bilinear", "nearest")),
        Lambdad("image", lambda x: x * 2),
    ])
    items = pipeline(data)
    assert isinstance(items, list) and 0 < len(items) < 12
    for item in items:
        assert item["image"].shape == (1, 32, 32) and item["label"].shape == (1, 32, 32) and item["case"] == "p1"
        assert set(torch.unique(item["label"]).tolist()) <= {0.0, 1.0}
        assert item["slice_index"] == item["image"].meta["slice_index"] == item["label"].meta["slice_index"]
        if item["label"].sum() > 0:
            assert float(item["image"][item["label"] > 0].mean()) > float(item["image"][item["label"] == 0].mean())
    batch = list_data_collate(items[:4])
    assert batch["image"].shape == (4, 1, 32, 32)
    vols = SlicesToVolumed(["image", "label"], mode=("bilinear", "nearest"))(items)
    lab = vols["label"][0].numpy()
    kept = [item["slice_index"] for item in items]
    # flipped affine: canonical (RAS) slice k is array slice 11 - k; skipped slices are 0
    np.testing.assert_array_equal(lab, np.where(np.isin(11 - np.arange(12), kept)[None, None], label, 0))
    assert vols["image"].shape == (1, 16, 16, 12)
    assert "slice_index" not in vols
    inv = pipeline.transforms[2].inverse(pipeline.transforms[2](LoadVolumed(["image", "label"])(data)))
    assert inv["image"].shape == (1, 16, 16, 12) and torch.allclose(inv["image"].affine, torch.as_tensor(AFFINES["flipped"]))


def test_label_aware_slicing_drops_or_adds_labelled_slices(tmp_path):
    """VolumeToSlicesd(label_key=...): "drop" keeps the normal foreground slices (training), "add" the
    foreground plus every labelled slice (testing), each flagged; a label on another grid is refused."""
    vol = np.zeros((6, 6, 10), np.float32)
    vol[:, :, 2:8] = 1.0  # foreground slices 2..7
    lab = np.zeros_like(vol)
    lab[1, 1, 4] = lab[2, 2, 9] = 1.0  # slice 4 (foreground) and slice 9 (background) are labelled
    data = {"image": _mt(vol, np.eye(4)), "mask": _mt(lab, np.eye(4) * 1.0000001), "name": "c"}

    def cut(labelled):
        return VolumeToSlicesd(["image", "mask"], mode=("bilinear", "nearest"), label_key="mask",
                               labelled=labelled)(dict(data))

    drop, add = cut("drop"), cut("add")
    assert [d["slice_index"] for d in drop] == [2, 3, 5, 6, 7] and all(d["label"] == 0 for d in drop)
    assert [d["slice_index"] for d in add] == [2, 3, 4, 5, 6, 7, 9]
    assert [d["label"] for d in add] == [0, 0, 1, 0, 0, 0, 1]
    assert all(float(d["mask"].sum()) == d["label"] for d in add)  # each labelled slice holds its one voxel
    normal = VolumeToSlicesd("image", label_key="mask")({"image": data["image"]})  # no label: a normal volume
    assert [d["label"] for d in normal] == [0] * 6
    data["mask"] = _mt(lab[:, :, :9], np.eye(4))
    with pytest.raises(MultiADInputError, match="label shape"):
        cut("drop")
    with pytest.raises(MultiADInputError, match="labelled"):
        VolumeToSlicesd("image", label_key="mask", labelled="keep")


def test_ct_window_given_as_text():
    """The ct_window option's text (a preset or "level,width") is a window for "ct" and ignored by "mri"."""
    hu = torch.tensor([[-45.0, 30.0, 105.0]])
    np.testing.assert_allclose(ScaleIntensityByModality(mode="ct", window="liver")(hu).numpy(), [[0.0, 0.5, 1.0]])
    np.testing.assert_allclose(ScaleIntensityByModality(mode="ct", window="30,150")(hu).numpy(), [[0.0, 0.5, 1.0]])
    assert ScaleIntensityByModality(mode="mri", window="liver").window is None
    with pytest.raises(MultiADInputError):
        ScaleIntensityByModality(mode="ct", window="")


# ----------------------------------------------------------------------------- real files
def test_pydicom_test_files_are_single_slice_volumes():
    pydicom_data = pytest.importorskip("pydicom.data")
    for name, modality, shape in (("CT_small.dcm", "CT", (1, 128, 128, 1)), ("MR_small.dcm", "MR", (1, 64, 64, 1))):
        vol = LoadVolume()(pydicom_data.get_testdata_file(name))
        assert vol.shape == shape and vol.meta["modality"] == modality
    ct = LoadVolume()(pydicom_data.get_testdata_file("CT_small.dcm"))
    assert float(ct.min()) < -500  # rescale intercept applied: Hounsfield units


@pytest.mark.skipif(not (SHARED_DATA / "lgg_flair_dicom").is_dir(), reason=f"real data folder {SHARED_DATA} is absent")
def test_lgg_dicom_series_match_their_nifti():
    folders = sorted(p for p in (SHARED_DATA / "lgg_flair_dicom").iterdir() if p.is_dir())
    assert folders
    for folder in folders:  # each folder is named after its patient in lgg_flair/
        dicom = load_volume(folder)
        nifti = load_volume(SHARED_DATA / "lgg_flair" / folder.name / "flair.nii.gz")
        assert dicom.meta["modality"] == "MR"
        if not torch.allclose(dicom.affine, nifti.affine):
            dicom, nifti = _oriented(dicom), _oriented(nifti)
        assert torch.equal(dicom.as_tensor(), nifti.as_tensor()), folder.name
        np.testing.assert_allclose(dicom.affine.numpy(), nifti.affine.numpy(), atol=1e-5)
