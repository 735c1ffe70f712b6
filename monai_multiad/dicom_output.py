"""A screening's anomaly map back in the DICOM world: a DICOM Parametric Map over the source series.

For a scan read from a DICOM series, the map (on the series' own grid, see
:mod:`monai_multiad.screening`) is written as a multi-frame Parametric Map (``anomaly_map.dcm``)
built by `highdicom <https://highdicom.readthedocs.io>`_: one frame per source instance, with that
instance's ImagePositionPatient, the series' ImageOrientationPatient and PixelSpacing, the
source's FrameOfReferenceUID, study and patient, and references to the source series and instances,
so a PACS viewer shows the map over the scan. Values are stored as unsigned 16-bit integers with a
RealWorldValueMapping (anomaly score = stored * slope + intercept, intercept the map's minimum or 0,
slope the quantisation step, its range / 65535) that viewers read, or as 32-bit floats
(``dtype="float32"``). When the scan is flagged, the voxels above the threshold that flagged it are
also written as a binary DICOM Segmentation (``anomalous_region.seg.dcm``).

highdicom (0.28 or later) is an optional dependency (``pip install 'monai-multiad[dicom]'``), imported
only here and only when a map is written. Frames are matched to source instances by position (each instance's
plane is located on the map's grid), never by file or array order.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from monai_multiad import __version__
from monai_multiad.outputs import atomic_path

__all__ = ["MAP_FILE", "SEG_FILE", "HIGHDICOM_MISSING", "DicomMapError", "highdicom_problem", "source_datasets",
           "frame_indices", "map_frames", "parametric_map", "segmentation", "write_dataset", "write_scan_dicom"]

logger = logging.getLogger("monai_multiad")

MAP_FILE, SEG_FILE = "anomaly_map.dcm", "anomalous_region.seg.dcm"
#: the report's note for a DICOM scan screened without highdicom
HIGHDICOM_MISSING = "DICOM map skipped: highdicom is not installed (pip install 'monai-multiad[dicom]')"
#: the oldest highdicom that references each frame's source instance (pyproject's [dicom] extra)
HIGHDICOM_MIN = (0, 28)
#: SeriesNumber of the map and segmentation series (the sources' numbers are often absent)
MAP_SERIES_NUMBER, SEG_SERIES_NUMBER = 9901, 9902
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_UINT16_MAX = 65535
_warned_missing = False


class DicomMapError(ValueError):
    """The anomaly map cannot be put on the source series (geometry mismatch, missing attributes)."""


def highdicom_problem() -> str:
    """Why no DICOM map can be written here ("" when highdicom, the ``[dicom]`` extra, is usable)."""
    try:
        import highdicom
    except ImportError as e:
        if getattr(e, "name", None) == "highdicom":
            return HIGHDICOM_MISSING
        return f"DICOM map skipped: highdicom cannot be imported ({e}); pip install -U 'monai-multiad[dicom]'"
    version = tuple(int(p) if p.isdigit() else 0 for p in highdicom.__version__.split(".")[:2])
    if version < HIGHDICOM_MIN:
        return (f"DICOM map skipped: highdicom {highdicom.__version__} is older than "
                f"{'.'.join(map(str, HIGHDICOM_MIN))}; pip install -U 'monai-multiad[dicom]'")
    return ""


def _highdicom():
    import highdicom

    return highdicom


def source_datasets(scan: str | Path, series_uid: str | None = None) -> list:
    """The headers (no pixel data) of the image instances of the series read from ``scan`` (a DICOM
    file or a folder searched recursively, as :func:`~monai_multiad.transforms.load_volume` does),
    those of ``series_uid`` where given."""
    import pydicom
    from pydicom.misc import is_dicom

    scan = Path(scan)
    files = [scan] if scan.is_file() else sorted(f for f in scan.rglob("*") if f.is_file() and not f.name.startswith("."))
    out = []
    for f in files:
        try:
            if not is_dicom(f):
                continue
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - load_volume has already judged the files it uses
            continue
        if "Rows" in ds and "Columns" in ds and (series_uid is None or str(ds.get("SeriesInstanceUID", "")) == series_uid):
            out.append(ds)
    if not out:
        raise DicomMapError(f"{scan}: no DICOM image of series {series_uid or '(any)'} found again to reference")
    return out


def frame_indices(affine: Any, sources: Sequence, shape: Sequence[int], tol: float = 0.01) -> list[int]:
    """For each source instance, the index ``k`` of its plane along the third array axis of a map
    ``(X, Y, Z)`` with RAS ``affine`` (the grid :func:`~monai_multiad.transforms.load_volume` gives a
    DICOM series: X along the rows' direction, Y down the columns). Checks that each instance's
    first pixel sits at voxel ``(0, 0, k)`` (within ``tol`` voxels), that its orientation, pixel
    spacing and size are the grid's, and that no two instances share a plane."""
    lps = _RAS_TO_LPS @ np.asarray(affine, dtype=float)
    inv = np.linalg.inv(lps)
    steps = np.linalg.norm(lps[:3, :3], axis=0)
    dirs = lps[:3, :3] / steps
    ks: list[int] = []
    for ds in sources:
        where = f"instance {ds.get('InstanceNumber', '?')} ({ds.get('SOPInstanceUID', '?')})"
        try:
            ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            spacing = [float(v) for v in ds.PixelSpacing]
        except (AttributeError, TypeError, ValueError):
            raise DicomMapError(f"{where} lacks ImagePositionPatient, ImageOrientationPatient or PixelSpacing") from None
        if (int(ds.Rows), int(ds.Columns)) != (int(shape[1]), int(shape[0])):
            raise DicomMapError(f"{where} is {ds.Rows} x {ds.Columns} pixels; the map's planes are "
                                f"{shape[1]} x {shape[0]}")
        if np.abs(iop[:3] - dirs[:, 0]).max() > 1e-3 or np.abs(iop[3:] - dirs[:, 1]).max() > 1e-3:
            raise DicomMapError(f"{where} has ImageOrientationPatient {iop.tolist()}; the map's grid "
                                f"{np.round(np.r_[dirs[:, 0], dirs[:, 1]], 6).tolist()}")
        if abs(spacing[0] - steps[1]) > 1e-3 * steps[1] or abs(spacing[1] - steps[0]) > 1e-3 * steps[0]:
            raise DicomMapError(f"{where} has PixelSpacing {spacing}; the map's grid {[steps[1], steps[0]]}")
        ijk = (inv @ np.r_[ipp, 1.0])[:3]
        k = int(round(ijk[2]))
        if np.abs(ijk[:2]).max() > tol or abs(ijk[2] - k) > tol or not 0 <= k < int(shape[2]):
            raise DicomMapError(f"{where} at ImagePositionPatient {ipp.tolist()} is at voxel "
                                f"{np.round(ijk, 3).tolist()} of the map, not on one of its {shape[2]} planes")
        ks.append(k)
    if len(set(ks)) != len(ks):
        raise DicomMapError(f"{len(ks) - len(set(ks))} source instances share a plane of the map (4D series?)")
    return ks


def map_frames(volume: np.ndarray, affine: Any, sources: Sequence) -> tuple[np.ndarray, list]:
    """The map's planes as DICOM frames ``(N, Rows, Columns)``, one per source instance, and the
    sources in the same order (by position along the slice normal)."""
    volume = np.asarray(volume)
    ks = frame_indices(affine, sources, volume.shape)
    order = sorted(range(len(ks)), key=ks.__getitem__)
    frames = np.stack([volume[:, :, ks[i]].T for i in order])
    return frames, [sources[i] for i in order]


def _with_frame_of_reference(sources: Sequence) -> tuple[list, str]:
    """``sources``, copied with a FrameOfReferenceUID derived from the series UID where it is missing
    (required by DICOM, absent from some exports), and a note saying so ("" when present)."""
    if all(ds.get("FrameOfReferenceUID") for ds in sources):
        return list(sources), ""
    import pydicom.uid

    uid = pydicom.uid.generate_uid(entropy_srcs=[str(sources[0].get("SeriesInstanceUID", "")), "frame of reference"])
    out = []
    for ds in sources:
        ds = copy.deepcopy(ds)
        ds.FrameOfReferenceUID = ds.get("FrameOfReferenceUID") or uid
        out.append(ds)
    return out, ("the source series has no FrameOfReferenceUID: the DICOM map carries one derived from its series "
                 "UID, so a viewer may not overlay it on the scan by itself")


def _geometry(hd, sources: Sequence) -> dict:
    first = sources[0]
    thickness = first.get("SliceThickness")
    return {"plane_positions": [hd.PlanePositionSequence("PATIENT", [float(v) for v in ds.ImagePositionPatient])
                                for ds in sources],
            "plane_orientation": hd.PlaneOrientationSequence("PATIENT", [float(v) for v in first.ImageOrientationPatient]),
            "pixel_measures": hd.PixelMeasuresSequence([float(v) for v in first.PixelSpacing],
                                                       float(thickness) if thickness not in (None, "") else None)}


def _set_slice_spacing(ds, affine: Any) -> None:
    """SpacingBetweenSlices from the grid: highdicom copies the source's, which some writers (GDCM)
    set to 1 whatever the spacing."""
    from pydicom.valuerep import DSfloat

    step = float(np.linalg.norm(np.asarray(affine, dtype=float)[:3, 2]))
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    measures.SpacingBetweenSlices = DSfloat(step, auto_format=True)


def _equipment() -> dict:
    return {"manufacturer": "monai-multiad", "manufacturer_model_name": "Multi-AD", "software_versions": __version__,
            "device_serial_number": "none"}


def parametric_map(volume: np.ndarray, affine: Any, sources: Sequence, *, dtype: str = "uint16",
                   series_number: int = MAP_SERIES_NUMBER, description: str = "Multi-AD anomaly map"):
    """A ``highdicom.pm.ParametricMap`` of the anomaly map ``volume`` ``(X, Y, Z)`` (RAS ``affine``, the
    grid of the series ``sources`` were read as) over the source instances ``sources`` (pydicom
    headers; each instance must lie on a plane of the grid, see :func:`frame_indices`).

    ``dtype``: "uint16" (stored = round((score - intercept) / slope), slope = range / 65535, the
    quantisation step) or "float32" (the scores as they are, slope 1). Both carry a
    RealWorldValueMapping (unit "no units", label "ANOMALY") that turns stored values into scores.
    """
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    frames, sources = map_frames(volume, affine, sources)
    sources, _ = _with_frame_of_reference(sources)
    lo, hi = float(min(frames.min(), 0.0)), float(frames.max())
    if dtype == "float32":
        pixels, slope, intercept = frames.astype(np.float32), 1.0, 0.0
        value_range: tuple = (lo, hi)
        center, width = (lo + hi) / 2, max(hi - lo, 1e-6)
    elif dtype == "uint16":
        slope = (hi - lo) / _UINT16_MAX if hi > lo else 1.0
        intercept = lo
        pixels = np.clip(np.rint((frames.astype(np.float64) - lo) / slope), 0, _UINT16_MAX).astype(np.uint16)
        value_range = (0, _UINT16_MAX)
        center, width = _UINT16_MAX / 2, _UINT16_MAX + 1
    else:
        raise ValueError(f"dtype must be 'uint16' or 'float32', got {dtype!r}")
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ANOMALY", lut_explanation="Multi-AD anomaly score (student-teacher feature discrepancy)",
        unit=codes.UCUM.NoUnits, value_range=value_range, slope=slope, intercept=intercept)
    pm = hd.pm.ParametricMap(
        source_images=sources, pixel_array=pixels, series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, **_equipment(), contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping], content_label="ANOMALY_MAP", content_description=description[:64],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=center, window_width=width)],
        **_geometry(hd, sources))
    _set_slice_spacing(pm, affine)
    pm.SeriesDescription = f"{description} ({sources[0].get('SeriesDescription', '')})"[:64]
    return pm


def segmentation(volume: np.ndarray, affine: Any, sources: Sequence, threshold: float, *,
                 series_number: int = SEG_SERIES_NUMBER):
    """A binary ``highdicom.seg.Segmentation`` of the voxels of ``volume`` above ``threshold``
    (segment 1, "anomalous region"), over the source instances as :func:`parametric_map`."""
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    frames, sources = map_frames(volume, affine, sources)
    sources, _ = _with_frame_of_reference(sources)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="anomalous region",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.MorphologicallyAbnormalStructure, algorithm_type="AUTOMATIC",
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="Multi-AD", version=__version__, family=codes.cid7162.ArtificialIntelligence))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=(frames > threshold).astype(np.uint8), segmentation_type="BINARY",
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, **_equipment(), omit_empty_frames=True,
        content_label="ANOMALY", content_description=f"anomaly score > {threshold:.4g}"[:64], **_geometry(hd, sources))
    _set_slice_spacing(seg, affine)
    seg.SeriesDescription = f"Multi-AD anomalous region ({sources[0].get('SeriesDescription', '')})"[:64]
    return seg


def write_dataset(path: str | Path, dataset) -> Path:
    """Write a DICOM dataset atomically: the file appears complete or not at all."""
    path = Path(path)
    with atomic_path(path) as tmp:
        dataset.save_as(str(tmp))
    return path


def write_scan_dicom(scan: str | Path, folder: str | Path, volume: np.ndarray, affine: Any, *,
                     series_uid: str | None = None, threshold: float | None = None, anomalous: bool = False,
                     dtype: str = "uint16") -> dict:
    """Write ``folder/anomaly_map.dcm`` (and ``anomalous_region.seg.dcm`` when ``anomalous``) for the
    DICOM series ``scan`` whose anomaly map is ``volume`` ``(X, Y, Z)`` with RAS ``affine``.

    Never raises for a DICOM problem: returns the report's fields ``dicom_map`` / ``dicom_seg`` (the
    paths written, "" otherwise) and ``dicom_note`` (why a file is missing: highdicom not installed,
    or the failure, in one line; "" when all went well). Nothing half-written is left.
    """
    global _warned_missing
    out = {"dicom_map": "", "dicom_seg": "", "dicom_note": ""}
    folder = Path(folder)
    for name in (MAP_FILE, SEG_FILE):  # a previous screening's files would no longer match this map
        (folder / name).unlink(missing_ok=True)
    problem = highdicom_problem()
    if problem:
        if not _warned_missing:  # once a process, not once a scan; each scan's report row says it
            logger.warning(problem)
            _warned_missing = True
        out["dicom_note"] = problem
        return out
    notes = []
    try:
        sources = source_datasets(scan, series_uid)
        out["dicom_map"] = str(write_dataset(folder / MAP_FILE, parametric_map(volume, affine, sources, dtype=dtype)))
        notes.append(_with_frame_of_reference(sources)[1])
        if anomalous and threshold is not None:
            if bool((np.asarray(volume) > threshold).any()):
                seg = segmentation(volume, affine, sources, threshold)
                out["dicom_seg"] = str(write_dataset(folder / SEG_FILE, seg))
            else:  # the slice scores are taken at model resolution, the map resampled to the scan's grid
                notes.append(f"no DICOM segmentation: no voxel of the map above the threshold {threshold:.4g}")
    except Exception as e:  # noqa: BLE001 - the DICOM output fails alone; the NIfTI map and the report stand
        msg = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).strip().splitlines()
        what = "DICOM segmentation" if out["dicom_map"] else "DICOM map"
        notes.append(f"{what} not written: {type(e).__name__}: {msg[0] if msg else ''}")
        logger.warning("%s: %s", scan, notes[-1])
    out["dicom_note"] = "; ".join(n for n in notes if n)
    return out
