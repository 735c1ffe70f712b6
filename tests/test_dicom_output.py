"""The anomaly map of a DICOM series written back as DICOM (monai_multiad.dicom_output): a Parametric
Map over the source series, read back with pydicom and compared with the sources' own tags and, frame by
frame located by position, with the NIfTI map; a Segmentation of the flagged region; screening without
highdicom; a failed DICOM write that leaves nothing behind."""

from __future__ import annotations

import csv
import errno
import logging
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from monai_multiad import dicom_output
from monai_multiad.data.synthetic_volumes import (
    itk_geometry_from_affine,
    make_affine,
    make_phantom_volume,
    rotation_matrix,
    write_dicom_series,
    write_nifti,
)
from monai_multiad.cohort import screen_paths
from monai_multiad.report import REPORT_FIELDS

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NEEDS_HIGHDICOM = "highdicom is not installed: pip install 'monai-multiad[dicom]'"
# RAS affines of the series: axial; axial with the slices running against the normal of their rows and
# columns (a left-handed grid), so the files' and InstanceNumbers' order is the reverse of the loaded
# volume's; oblique with anisotropic voxels
SERIES = {
    "axial": make_affine(np.diag([0.9, 0.8, 2.0]), (10.0, -5.0, 3.0)),
    "reversed": make_affine(np.diag([1.0, 1.1, -2.5]), (40.0, -20.0, 60.0)),
    "oblique": make_affine(rotation_matrix((1, 2, 3), 30) @ np.diag([0.8, 1.2, 2.5]), (12.0, -30.0, 44.0)),
}
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def run_dir(tiny_volume_run) -> Path:
    """A tiny run trained as a user trains one (the ``multiad`` command) on normal NIfTI phantoms (the suite's
    shared volume run; screening only reads it)."""
    return tiny_volume_run / "runs" / "vol"


def _series(folder: Path, name: str, shape=(40, 36, 10)) -> Path:
    affine = SERIES[name]
    image, _ = make_phantom_volume(shape, lesion=True, affine=affine, seed=1)
    write_dicom_series(folder / name, image, *itk_geometry_from_affine(affine), series_description=name)
    return folder / name


def _sources(folder: Path) -> dict[str, pydicom.Dataset]:
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.glob("*.dcm"))]
    return {str(h.SOPInstanceUID): h for h in headers}


def _floats(values) -> np.ndarray:
    return np.asarray([float(v) for v in values])


def _frames(ds: pydicom.Dataset) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(source SOPInstanceUID, ImagePositionPatient, ImageOrientationPatient) of each frame."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    out = []
    for item in ds.PerFrameFunctionalGroupsSequence:
        src = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        iop = (item if "PlaneOrientationSequence" in item else shared).PlaneOrientationSequence[0]
        out.append((str(src), _floats(item.PlanePositionSequence[0].ImagePositionPatient),
                    _floats(iop.ImageOrientationPatient)))
    return out


def _plane_of(affine: np.ndarray, ipp: np.ndarray) -> int:
    """The index along the NIfTI map's third axis of the plane whose first pixel is at ``ipp`` (LPS)."""
    ijk = np.linalg.solve(LPS @ affine, np.r_[ipp, 1.0])[:3]
    k = int(round(ijk[2]))
    np.testing.assert_allclose(ijk, [0, 0, k], atol=1e-3)
    return k


def check_references(dcm: pydicom.Dataset, source_folder: Path) -> None:
    """The object lies on the source series: its study, patient and frame of reference; one frame per
    referenced instance, each at that instance's position, with its orientation and pixel spacing."""
    sources = _sources(source_folder)
    first = next(iter(sources.values()))
    assert dcm.StudyInstanceUID == first.StudyInstanceUID and dcm.PatientID == first.PatientID
    assert dcm.SeriesInstanceUID != first.SeriesInstanceUID
    if "FrameOfReferenceUID" in first:
        assert dcm.FrameOfReferenceUID == first.FrameOfReferenceUID
    (ref,) = dcm.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == first.SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in ref.ReferencedInstanceSequence} == set(sources)
    measures = dcm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    np.testing.assert_allclose(_floats(measures.PixelSpacing), _floats(first.PixelSpacing), rtol=1e-9)
    assert (dcm.Rows, dcm.Columns) == (first.Rows, first.Columns)
    for src, ipp, iop in _frames(dcm):
        np.testing.assert_allclose(ipp, _floats(sources[src].ImagePositionPatient), atol=1e-9)
        np.testing.assert_allclose(iop, _floats(sources[src].ImageOrientationPatient), atol=1e-9)


def check_parametric_map(path: str, nifti_path: str, source_folder: Path) -> None:
    pm = pydicom.dcmread(path)
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    check_references(pm, source_folder)
    nifti = nib.load(nifti_path)
    amap, affine = np.asarray(nifti.dataobj, dtype=np.float64), nifti.affine
    frames = _frames(pm)
    assert int(pm.NumberOfFrames) == len(frames) == amap.shape[2] == len(_sources(source_folder))
    (rwvm,) = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
    slope, intercept = float(rwvm.RealWorldValueSlope), float(rwvm.RealWorldValueIntercept)
    assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == "1"  # UCUM "no units"
    values = pm.pixel_array.astype(np.float64) * slope + intercept
    assert slope <= max(amap.max() - min(amap.min(), 0), 1e-12) / 65535 * (1 + 1e-9)  # 16-bit steps
    seen = set()
    for f, (_, ipp, _) in enumerate(frames):
        k = _plane_of(affine, ipp)
        seen.add(k)
        np.testing.assert_allclose(values[f], amap[:, :, k].T, rtol=0, atol=slope / 2 * (1 + 1e-6) + 1e-7)
    assert seen == set(range(amap.shape[2]))  # every plane once
    steps = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices
    assert float(spacing) == pytest.approx(steps[2], rel=1e-6)
    assert amap.max() > 0


def check_segmentation(path: str, nifti_path: str, source_folder: Path, threshold: float) -> None:
    seg = pydicom.dcmread(path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    check_references(seg, source_folder)
    nifti = nib.load(nifti_path)
    region = np.asarray(nifti.dataobj, dtype=np.float64) > threshold
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    kept = set()
    for f, (_, ipp, _) in enumerate(_frames(seg)):
        k = _plane_of(nifti.affine, ipp)
        kept.add(k)
        assert np.array_equal(pixels[f].astype(bool), region[:, :, k].T)
    assert kept == {k for k in range(region.shape[2]) if region[:, :, k].any()}  # empty planes omitted


def test_screening_a_dicom_series_writes_a_parametric_map_on_it(run_dir, tmp_path):
    pytest.importorskip("highdicom", reason=NEEDS_HIGHDICOM)
    scans = [_series(tmp_path / "dicom", name) for name in SERIES]
    nifti_scan = write_nifti(tmp_path / "plain.nii.gz", np.round(make_phantom_volume((24, 24, 4), seed=2)[0]))
    # threshold 0: every scan is flagged, so the flagged region is written as a segmentation as well
    rows = screen_paths(run_dir, [*scans, nifti_scan], tmp_path / "out", device="cpu", progress=False, threshold=0.0)
    assert [r["status"] for r in rows] == ["ok"] * 4
    for scan, row in zip(scans, rows):
        assert row["dicom_note"] == "" and row["dicom_map"] == str(tmp_path / "out" / scan.name / "anomaly_map.dcm")
        check_parametric_map(row["dicom_map"], row["map"], scan)
        assert row["anomalous"] and row["dicom_seg"].endswith("anomalous_region.seg.dcm")
        check_segmentation(row["dicom_seg"], row["map"], scan, row["threshold"])
    assert rows[-1]["dicom_map"] == rows[-1]["dicom_seg"] == rows[-1]["dicom_note"] == ""  # NIfTI: nothing in DICOM
    with open(tmp_path / "out" / "report.csv", newline="") as f:
        report = list(csv.DictReader(f))
    assert tuple(report[0]) == REPORT_FIELDS and REPORT_FIELDS[:12] == (
        "scan", "name", "status", "scan_score", "anomalous", "threshold", "num_slices", "screened_slices",
        "top_slices", "map", "seconds", "error")  # the old columns first, in their order
    assert [r["dicom_map"] for r in report] == [r["dicom_map"] for r in rows]
    # not flagged: the map only, and a second screening into the same folder leaves no stale segmentation
    rows = screen_paths(run_dir, scans[:1], tmp_path / "out", device="cpu", progress=False, threshold=1e9)
    assert not rows[0]["anomalous"] and rows[0]["dicom_seg"] == "" and rows[0]["dicom_map"]
    assert sorted(p.name for p in (tmp_path / "out" / "axial").glob("*.dcm")) == ["anomaly_map.dcm"]


def test_float_pixel_data_keeps_the_map_exactly(tmp_path):
    pytest.importorskip("highdicom", reason=NEEDS_HIGHDICOM)
    from monai_multiad.transforms import load_volume

    scan = _series(tmp_path, "oblique", shape=(12, 10, 4))
    vol = load_volume(scan)
    amap = np.random.default_rng(0).random(vol.shape[1:]).astype(np.float32) * 3 - 0.5
    pm = dicom_output.parametric_map(amap, vol.affine.numpy(), dicom_output.source_datasets(scan), dtype="float32")
    pm = pydicom.dcmread(dicom_output.write_dataset(tmp_path / "map.dcm", pm))
    nifti = write_nifti(tmp_path / "map.nii.gz", amap, vol.affine.numpy())
    check_references(pm, scan)
    aff = nib.load(nifti).affine
    for f, (_, ipp, _) in enumerate(_frames(pm)):
        assert np.array_equal(pm.pixel_array[f], amap[:, :, _plane_of(aff, ipp)].T)


def test_frames_are_matched_by_position_and_a_mismatch_is_refused(tmp_path):
    scan = _series(tmp_path, "reversed", shape=(6, 5, 4))
    sources = dicom_output.source_datasets(scan)
    from monai_multiad.transforms import load_volume

    affine = load_volume(scan).affine.numpy()
    ks = dicom_output.frame_indices(affine, sources, (6, 5, 4))
    numbers = [int(ds.InstanceNumber) for ds in sources]
    assert sorted(ks) == [0, 1, 2, 3] and [k for _, k in sorted(zip(numbers, ks))] == [3, 2, 1, 0]
    assert affine[2, 2] > 0 > SERIES["reversed"][2, 2]  # loaded bottom to top: the files' order reversed
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, 0] * 0.5  # half a voxel along the rows
    with pytest.raises(dicom_output.DicomMapError, match="not on one of its 4 planes"):
        dicom_output.frame_indices(shifted, sources, (6, 5, 4))
    with pytest.raises(dicom_output.DicomMapError, match="pixels"):
        dicom_output.frame_indices(affine, sources, (5, 6, 4))


def test_without_highdicom_screening_goes_on_and_says_why_once(run_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom -> ImportError
    monkeypatch.setattr(dicom_output, "_warned_missing", False)
    scans = [_series(tmp_path / "dicom", name, shape=(24, 24, 6)) for name in ("axial", "oblique")]
    with caplog.at_level(logging.WARNING, logger="monai_multiad"):
        rows = screen_paths(run_dir, scans, tmp_path / "out", device="cpu", progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(Path(r["map"]).is_file() for r in rows)
    for r in rows:
        assert r["dicom_map"] == "" and r["dicom_note"] == dicom_output.HIGHDICOM_MISSING
    assert "pip install 'monai-multiad[dicom]'" in dicom_output.HIGHDICOM_MISSING
    assert sum("highdicom is not installed" in m for m in caplog.messages) == 1  # once, not per scan or slice
    assert not list((tmp_path / "out").rglob("*.dcm"))
    report = (tmp_path / "out" / "report.csv").read_text()
    assert "highdicom is not installed" in report


def test_a_failed_dicom_write_fails_only_the_dicom_output_and_leaves_nothing(run_dir, tmp_path, monkeypatch):
    pytest.importorskip("highdicom", reason=NEEDS_HIGHDICOM)
    scan = _series(tmp_path, "axial", shape=(24, 24, 6))

    def full_disk(self, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"DICM half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pydicom.Dataset, "save_as", full_disk)
    rows = screen_paths(run_dir, [scan], tmp_path / "out", device="cpu", progress=False, threshold=0.0)
    row = rows[0]
    assert row["status"] == "ok" and row["error"] == "" and Path(row["map"]).is_file()
    assert row["dicom_map"] == row["dicom_seg"] == ""
    assert row["dicom_note"].startswith("DICOM map not written") and "anomaly_map.dcm" in row["dicom_note"]
    assert "No space left on device" in row["dicom_note"] and "\n" not in row["dicom_note"]
    assert sorted(p.name for p in (tmp_path / "out" / "axial").iterdir()) == [
        "anomaly_map.nii.gz", "montage.png", "result.json", "slice_scores.csv"]  # no .dcm, no temporary file


@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED_DATA / "lgg_flair_dicom").is_dir(),
                    reason=f"real data folder {SHARED_DATA / 'lgg_flair_dicom'} is absent")
def test_real_series_map_references_the_series(run_dir, tmp_path):
    pytest.importorskip("highdicom", reason=NEEDS_HIGHDICOM)
    scan = sorted(p for p in (SHARED_DATA / "lgg_flair_dicom").iterdir() if p.is_dir())[0]
    row = screen_paths(run_dir, [scan], tmp_path / "out", device="cpu", progress=False)[0]
    assert row["status"] == "ok" and row["dicom_map"], row
    check_parametric_map(row["dicom_map"], row["map"], scan)
    if "FrameOfReferenceUID" not in next(iter(_sources(scan).values())):  # this export omits it
        assert "no FrameOfReferenceUID" in row["dicom_note"]
        assert pydicom.dcmread(row["dicom_map"], stop_before_pixels=True).FrameOfReferenceUID
