"""Screening scans: outputs on the scan's grid, exact inverse mapping, CT windows, failures per scan."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from monai.data import MetaTensor

from monai_multiad.cli import main
from monai_multiad.config import RunConfig
from monai_multiad.data.synthetic_volumes import (
    make_affine,
    rotation_matrix,
    itk_geometry_from_affine,
    make_phantom_volume,
    write_dicom_series,
    write_nifti,
)
from monai_multiad.networks import MultiAD
from monai_multiad.data.volumes import volume_slice_datasets
from monai_multiad.cohort import screen_paths
from monai_multiad.scan_outputs import screen_path
from monai_multiad.screening import ScreeningResult, screen_volume
from monai_multiad.transforms import load_volume
from monai_multiad.workflow import save_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

AFFINES = {
    "identity": np.eye(4),
    "flipped": make_affine(np.diag([-1.0, 1.0, -1.0]), (10, -5, 3)),
    "permuted": make_affine(np.array([[0, 0, -1.0], [1.0, 0, 0], [0, -1.0, 0]]), (4, 5, 6)),
    "oblique": make_affine(rotation_matrix((1, 2, 3), 30) @ np.diag([0.8, 1.2, 2.5]), (12, -30, 44)),
}


class MarkModel(nn.Module):
    """A fake MultiAD (eval interface, ``in_channels``): the map is 1 where the input is white
    ("mark"), the input itself ("identity"), or what exceeds 0.4 ("soft")."""

    def __init__(self, in_channels: int = 1, mode: str = "mark") -> None:
        super().__init__()
        self.in_channels, self.mode, self.seen = in_channels, mode, []
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        self.seen.append(x.detach().clone())
        x = x[:, :1] * self.scale
        amap = {"mark": (x >= 0.999).float(), "identity": x, "soft": (x - 0.4).clamp_min(0)}[self.mode]
        return amap, amap.amax(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run")
    cfg = RunConfig(backbone="resnet18", pretrained="none", discriminator=False, in_channels=1, image_size=64)
    save_model(path / "model.pt", MultiAD("resnet18", in_channels=1, pretrained=False, discriminator=False), cfg,
               fusion_stats={"threshold": 1.0})
    return path


def _phantom(path: Path, affine=None, shape=(48, 40, 16)) -> Path:
    image, _ = make_phantom_volume(shape, lesion=True, affine=affine, seed=0)
    return write_nifti(path, np.round(image).astype(np.int16), affine)


def test_nifti_screening_writes_map_report_and_montage(run_dir, tmp_path):
    scan = _phantom(tmp_path / "brain.nii.gz", AFFINES["oblique"])
    rows = screen_paths(run_dir, [scan], tmp_path / "out", device="cpu", top_k=2, progress=False)
    assert rows[0]["status"] == "ok" and rows[0]["threshold"] == 1.0 and len(rows[0]["top_slices"]) == 2
    folder = tmp_path / "out" / "brain"
    amap = nib.load(folder / "anomaly_map.nii.gz")
    assert amap.shape == (48, 40, 16)
    np.testing.assert_allclose(amap.affine, AFFINES["oblique"], atol=1e-5)
    assert np.isfinite(amap.get_fdata()).all() and amap.get_fdata().max() > 0
    assert (folder / "montage.png").stat().st_size > 0
    result = json.loads((folder / "result.json").read_text())
    scores = list(csv.DictReader((folder / "slice_scores.csv").open()))
    assert len(scores) == result["screened_slices"] <= 16
    top = sorted((float(r["score"]) for r in scores), reverse=True)[:2]
    assert result["scan_score"] == pytest.approx(np.mean(top), rel=1e-5)  # mean of the top-k slice scores
    report = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert report[0]["status"] == "ok" and report[0]["map"].endswith("anomaly_map.nii.gz")
    assert not list((tmp_path / "out").rglob(".*"))  # no temporary files left


def _affine_from_dicom_files(files: list[Path]) -> np.ndarray:
    """The RAS voxel-to-world affine of a series, built from the tags of its files read back with
    pydicom, in the order they were written (slice z = ``files[z]``): column i runs along the row
    direction (ImageOrientationPatient[:3]) by PixelSpacing[1], row j along the column direction
    (ImageOrientationPatient[3:]) by PixelSpacing[0], slice k from the first ImagePositionPatient to the
    last; DICOM's LPS world turned to RAS."""
    import pydicom

    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.asarray([float(v) for v in headers[0].ImageOrientationPatient])
    row_spacing, col_spacing = (float(v) for v in headers[0].PixelSpacing)
    ipp = np.asarray([[float(v) for v in h.ImagePositionPatient] for h in headers])
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_spacing
    lps[:3, 1] = iop[3:] * row_spacing
    lps[:3, 2] = (ipp[-1] - ipp[0]) / (len(files) - 1)
    lps[:3, 3] = ipp[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def test_dicom_series_map_has_the_series_geometry(run_dir, tmp_path):
    affine = AFFINES["oblique"]
    image, _ = make_phantom_volume((40, 40, 12), lesion=True, affine=affine, seed=1)
    spacing, origin, direction = itk_geometry_from_affine(affine)
    files = write_dicom_series(tmp_path / "series", image, spacing, origin, direction)
    written = _affine_from_dicom_files(files)
    np.testing.assert_allclose(written, affine, atol=1e-6)  # what the tags say is the geometry asked for
    row = screen_path(run_dir, tmp_path / "series", tmp_path / "out", device="cpu")
    amap = nib.load(row["map"])
    assert amap.shape == (40, 40, 12)
    np.testing.assert_allclose(amap.affine, written, atol=1e-5)
    assert Path(row["map"]).parent.name == "series"


@pytest.mark.parametrize("disorder", ["reversed_files", "shuffled_instance_numbers"])
def test_dicom_series_in_any_file_order_gives_the_same_map(run_dir, tmp_path, disorder):
    """Slices whose file names run backwards (IM0001.dcm holds the last slice), or whose InstanceNumbers
    are shuffled against their positions: the series is ordered by position, so the map, its geometry
    and the scan's scores are those of the series written in order."""
    import pydicom

    affine = AFFINES["oblique"]
    image, _ = make_phantom_volume((40, 40, 12), lesion=True, affine=affine, seed=1)
    spacing, origin, direction = itk_geometry_from_affine(affine)
    in_order = write_dicom_series(tmp_path / "ordered", image, spacing, origin, direction)
    files = write_dicom_series(tmp_path / "scrambled", image, spacing, origin, direction)
    if disorder == "reversed_files":
        for f in files:
            f.rename(f.with_suffix(".tmp"))
        for f, name in zip(files, reversed([f.name for f in files])):
            f.with_suffix(".tmp").rename(f.parent / name)
        first = pydicom.dcmread(tmp_path / "scrambled" / files[0].name, stop_before_pixels=True)
        assert int(first.InstanceNumber) == len(files)  # IM0001.dcm is now the last slice
    else:
        numbers = np.random.default_rng(0).permutation(len(files)) + 1
        assert (numbers != np.arange(1, len(files) + 1)).any()
        for f, n in zip(files, numbers):
            ds = pydicom.dcmread(f)
            ds.InstanceNumber = int(n)
            ds.save_as(f)
    expected = screen_path(run_dir, tmp_path / "ordered", tmp_path / "out_ordered", device="cpu")
    got = screen_path(run_dir, tmp_path / "scrambled", tmp_path / "out_scrambled", device="cpu")
    ref_map, map_ = nib.load(expected["map"]), nib.load(got["map"])
    np.testing.assert_allclose(map_.affine, _affine_from_dicom_files(in_order), atol=1e-5)
    np.testing.assert_allclose(map_.affine, ref_map.affine, atol=1e-6)
    np.testing.assert_allclose(map_.get_fdata(), ref_map.get_fdata(), rtol=1e-6, atol=1e-7)
    assert got["scan_score"] == pytest.approx(expected["scan_score"], rel=1e-6)
    assert got["top_slices"] == expected["top_slices"]


def _labelled(label: np.ndarray, g) -> set[int]:
    """Canonical indices of the slices of ``label`` (an array) with label voxels, found along the array axis."""
    return {k for k in range(g.num_slices) if np.take(label, g.array_index(k), axis=g.array_axis).any()}


def _training_and_screening_agree(root: Path, case: str, scan: Path, label: np.ndarray, axis: str, size: int) -> None:
    """``case`` of the volume folder ``root`` (its only test case, ``scan`` its image, ``label`` its label
    array) gives the test dataset the slices screening screens, plus its labelled ones, with the same pixels."""
    cfg = RunConfig(dataset_dir=str(root), layout="volumes", image_size=size, in_channels=1, slice_axis=axis)
    test = volume_slice_datasets(cfg, "test")
    items = [test[i] for i in range(len(test)) if test[i]["case"] == case]
    model = MarkModel(mode="identity")
    res = screen_volume(model, scan, modality=cfg.modality, axis=axis, image_size=size)
    screened = sorted(res.slice_scores)
    assert [item["slice_index"] for item in items] == sorted(set(screened) | _labelled(label, res.geometry))
    seen = dict(zip(screened, torch.cat(model.seen)[:, 0]))  # the batches in slice order
    for item in items:
        if item["slice_index"] in seen:  # uint8 storage: within half a grey level
            assert float((item["image"][0] - seen[item["slice_index"]]).abs().max()) <= 0.5 / 255 + 1e-6
    assert all(item["slice_index"] in seen for item in items if not item["label"])


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_training_and_screening_cut_the_same_slices(tmp_path, axis):
    """One pipeline: the slices a run trains and is evaluated on are the ones screening scores, cut and
    resized alike (a permuted, flipped affine, so the orientation counts); the train split is the
    screened slices without label voxels."""
    affine = AFFINES["permuted"]
    image, label = make_phantom_volume((40, 36, 16), lesion=True, affine=affine, seed=4)
    for name in ("a", "b", "c"):
        write_nifti(tmp_path / name / "flair.nii.gz", np.round(image).astype(np.int16), affine)
        write_nifti(tmp_path / name / "mask.nii.gz", label, affine)
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["a"], "valid": ["b"], "test": ["c"]}))
    _training_and_screening_agree(tmp_path, "c", tmp_path / "c" / "flair.nii.gz", label, axis, 24)
    cfg = RunConfig(dataset_dir=str(tmp_path), layout="volumes", image_size=24, in_channels=1, slice_axis=axis)
    train, _ = volume_slice_datasets(cfg, "train")
    res = screen_volume(MarkModel(), tmp_path / "a" / "flair.nii.gz", axis=axis, image_size=24)
    labelled = _labelled(label, res.geometry)
    assert labelled and [train[i]["slice_index"] for i in range(len(train))] == sorted(set(res.slice_scores) - labelled)


@pytest.mark.skipif(not (SHARED_DATA / "lgg_flair").is_dir(), reason=f"real data folder {SHARED_DATA} is absent")
def test_training_and_screening_cut_the_same_slices_of_a_real_scan(tmp_path):
    case = "TCGA_CS_4941_19960909"
    (tmp_path / case).symlink_to(SHARED_DATA / "lgg_flair" / case)
    (tmp_path / "splits.json").write_text(json.dumps({"test": [case]}))
    label = load_volume(tmp_path / case / "mask.nii.gz")[0].numpy()
    _training_and_screening_agree(tmp_path, case, tmp_path / case / "flair.nii.gz", label, "axial", 64)


@pytest.mark.parametrize("name", list(AFFINES))
@pytest.mark.parametrize("axis", ["axial", "sagittal"])
def test_inverse_mapping_puts_the_marked_pixel_on_its_voxel(name, axis):
    rng = np.random.default_rng(0)
    data = rng.uniform(100, 400, size=(24, 24, 24)).astype(np.float32)
    voxel = (5, 17, 9)
    data[voxel] = 1000.0
    vol = MetaTensor(torch.from_numpy(data)[None], affine=torch.as_tensor(AFFINES[name]))
    res = screen_volume(MarkModel(), vol, modality="minmax", axis=axis, image_size=24, top_k=1)
    assert isinstance(res, ScreeningResult)
    amap = res.anomaly_map
    assert amap.shape == (1, 24, 24, 24) and torch.allclose(amap.affine.double(), torch.as_tensor(AFFINES[name]))
    assert float(amap.sum()) == 1.0 and tuple(np.argwhere(amap[0].numpy() == 1)[0]) == voxel
    assert res.scan_score == 1.0 and res.anomalous is False and res.threshold is None
    # the identity model returns its input: the map is the normalised volume, voxel for voxel
    ident = screen_volume(MarkModel(mode="identity"), vol, modality="minmax", axis=axis, image_size=24)
    expected = (data - data.min()) / (data.max() - data.min())
    np.testing.assert_allclose(ident.anomaly_map[0].numpy(), expected, atol=1e-6)
    # with a resize (24 -> 40 px and back), the mark still peaks on its voxel
    big = screen_volume(MarkModel(mode="soft"), vol, modality="minmax", axis=axis, image_size=40, top_k=1)
    assert tuple(np.unravel_index(int(big.anomaly_map[0].argmax()), (24, 24, 24))) == voxel


def test_ct_window_is_used(run_dir, tmp_path):
    hu = np.full((32, 32, 6), -1000.0, np.float32)
    hu[4:28, 4:28] = 40.0
    hu[10:14, 10:14, 3] = 80.0
    spacing, origin, direction = itk_geometry_from_affine(AFFINES["flipped"])
    write_dicom_series(tmp_path / "ct", hu, spacing, origin, direction, modality="CT")
    model = MarkModel(in_channels=3)
    res = screen_volume(model, tmp_path / "ct", modality="ct", window="brain", image_size=32, top_k=1)
    x = torch.cat(model.seen)
    assert x.shape[1] == 3 and set(torch.unique(x).tolist()) == {0.0, 0.5, 1.0}  # level 40 width 80
    assert "ct window brain" in res.info["intensity_normalisation"]
    marked = np.argwhere(res.anomaly_map[0].numpy() == 1)
    assert len(marked) == 16 and set(marked[:, 2].tolist()) == {3} and set(marked[:, 0].tolist()) == {10, 11, 12, 13}
    assert res.top_slices == [2] and res.info["array_axis_flipped"]  # canonical slice 2 is array slice 5 - 2 = 3
    # the run's own modality and window are the defaults
    ct_run = tmp_path / "ct_run"
    cfg = RunConfig(backbone="resnet18", pretrained="none", discriminator=False, in_channels=1, image_size=32,
                    modality="ct", ct_window="40,80")
    save_model(ct_run / "model.pt", MultiAD("resnet18", in_channels=1, pretrained=False, discriminator=False), cfg)
    res = screen_volume(ct_run, tmp_path / "ct", device="cpu")
    assert "level 40, width 80" in res.info["intensity_normalisation"] and res.info["image_size"] == 32


def test_bad_scans_are_reported_and_the_good_one_screened(run_dir, tmp_path, capsys):
    good = _phantom(tmp_path / "p1" / "flair.nii.gz")
    other = _phantom(tmp_path / "p2" / "flair.nii.gz")
    flat = write_nifti(tmp_path / "flat.nii.gz", np.ones((32, 32), np.float32))
    nan = np.ones((16, 16, 8), np.float32)
    nan[3, 3, 3] = np.nan
    nan_file = write_nifti(tmp_path / "nan.nii.gz", nan)
    (tmp_path / "empty").mkdir()
    scans = [flat, nan_file, tmp_path / "empty", tmp_path / "missing.nii.gz", good, other]
    code = main(["screen", *map(str, scans), "--run", str(run_dir), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--batch-size", "4"])
    assert code == 1
    report = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert [r["status"] for r in report] == ["failed"] * 4 + ["ok"] * 2
    assert "2D image" in report[0]["error"] and "NaN" in report[1]["error"]
    assert "empty folder" in report[2]["error"] and "no such file" in report[3]["error"]
    for name in ("p1_flair", "p2_flair"):  # same file names: the parent folder tells them apart
        assert (tmp_path / "out" / name / "anomaly_map.nii.gz").is_file()
    assert len(json.loads((tmp_path / "out" / "report.json").read_text())) == 6
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("name, kwargs", [("CT_small.dcm", {"modality": "ct", "window": "soft_tissue"}),
                                          ("MR_small.dcm", {})])
def test_real_pydicom_files_are_screened(run_dir, tmp_path, name, kwargs):
    pydicom_data = pytest.importorskip("pydicom.data")
    import pydicom

    src = Path(pydicom_data.get_testdata_file(name))
    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(src, folder / name)
    for scan in (src, folder):  # a DICOM file and a folder holding it
        row = screen_path(run_dir, scan, tmp_path / "out", device="cpu", **kwargs)
        amap, vol = nib.load(row["map"]), load_volume(scan)
        assert amap.shape == tuple(vol.shape[1:]) and vol.shape[-1] == 1
        np.testing.assert_allclose(amap.affine, vol.affine.numpy(), atol=1e-4)
        # one slice: its in-plane axes and position as the file's own tags give them
        header = pydicom.dcmread(src, stop_before_pixels=True)
        assert amap.shape[:2] == (int(header.Columns), int(header.Rows))
        iop = np.asarray([float(v) for v in header.ImageOrientationPatient])
        row_spacing, col_spacing = (float(v) for v in header.PixelSpacing)
        lps_to_ras = np.array([-1.0, -1.0, 1.0])
        np.testing.assert_allclose(amap.affine[:3, 0], lps_to_ras * iop[:3] * col_spacing, atol=1e-4)
        np.testing.assert_allclose(amap.affine[:3, 1], lps_to_ras * iop[3:] * row_spacing, atol=1e-4)
        ipp = np.asarray([float(v) for v in header.ImagePositionPatient])
        np.testing.assert_allclose(amap.affine[:3, 3], lps_to_ras * ipp, atol=1e-4)
        assert row["screened_slices"] == 1 and (Path(row["map"]).parent / "montage.png").is_file()
