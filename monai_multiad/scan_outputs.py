"""What screening writes for each scan: :func:`screen_path` (screen one scan file or DICOM folder and write
its folder) and :func:`write_outputs` (the files, each atomic, ``result.json`` last), with the names they go
under (:func:`scan_name`, :func:`unique_names`)."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from monai.data import MetaTensor

from monai_multiad.errors import MultiADInputError
from monai_multiad.inferers import load_run
from monai_multiad.outputs import atomic_path, write_json, write_png, write_text
from monai_multiad.report import ReportRow
from monai_multiad.screening import ScreeningResult, screen_volume
from monai_multiad.visualize import contact_sheet, overlay

__all__ = ["MAP_FORMATS", "scan_name", "screen_path", "unique_names", "write_outputs"]


def _display(tile: np.ndarray) -> np.ndarray:
    """A canonical RAS slice (rows: first plane axis) in radiological display: anterior / superior
    at the top, the patient's right on the image's left."""
    return np.ascontiguousarray(np.flip(tile, (0, 1)).swapaxes(0, 1))


def _montage(result: ScreeningResult) -> np.ndarray:
    images, maps = result.montage_images, result.montage_maps
    vmax = max(float(maps.max()), result.threshold or 0.0, 1e-6)
    rep = max(1, 192 // int(images.shape[-1]))
    tiles = []
    for img, amap in zip(images[:, 0].numpy(), maps[:, 0].numpy()):
        img, amap = (np.kron(_display(a), np.ones((rep, rep), np.float32)) for a in (img, amap))
        tiles.append(overlay(img, amap, vmax=vmax))
    return contact_sheet(tiles, columns=min(len(tiles), 6))


def _write_map(path: Path, amap: MetaTensor) -> None:
    import nibabel as nib

    affine = np.asarray(amap.affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(amap.as_tensor()[0].numpy(), dtype=np.float32), affine)
    codes = {k: int(np.asarray(amap.meta.get(k, 0)).ravel()[0]) for k in ("qform_code", "sform_code")}
    img.set_sform(affine, code=codes["sform_code"] or 1)
    img.set_qform(affine, code=codes["qform_code"] or 1)  # nearest rigid one for an oblique/sheared affine
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _write_dicom(path, folder: Path, res: ScreeningResult, series_uid: str | None) -> dict:
    """For a DICOM series, the map as a DICOM Parametric Map over it (and the flagged region as a
    Segmentation): the report's ``dicom_*`` fields, empty for other scans. Never raises: a DICOM
    output that cannot be written is said in ``dicom_note`` and the scan stays screened."""
    from monai_multiad.dicom_output import write_scan_dicom

    amap = res.anomaly_map
    if amap.meta.get("format") != "dicom":
        return {"dicom_map": "", "dicom_seg": "", "dicom_note": ""}
    return write_scan_dicom(path, folder, amap.as_tensor()[0].numpy(), np.asarray(amap.affine, dtype=np.float64),
                            series_uid=amap.meta.get("series_uid") or series_uid, anomalous=res.anomalous,
                            threshold=res.threshold)


def scan_name(path: str | Path) -> str:
    """Output folder name of a scan: the file name without .nii/.nii.gz/.dcm, or the folder name."""
    p = Path(path)
    for ext in (".nii.gz", ".nii", ".dcm"):
        if p.name.lower().endswith(ext):
            return p.name[: -len(ext)] or "scan"
    return p.name or "scan"


#: anomaly map file formats: gzip-compressed NIfTI (nibabel's level 1, the fastest; every viewer reads it)
#: or uncompressed NIfTI (larger, quicker to write)
MAP_FORMATS = ("nii.gz", "nii")


def screen_path(model_or_run: Any, path: str | Path, out_dir: str | Path, *, name: str | None = None,
                series_uid: str | None = None, screened_with: dict | None = None, volume: MetaTensor | None = None,
                map_format: str = "nii.gz", **kwargs) -> dict:
    """Screen one scan file or DICOM folder and write ``out_dir/<scan name>/``: ``anomaly_map.nii.gz``
    (the scan's shape and affine; ``.nii`` with ``map_format="nii"``), ``slice_scores.csv``,
    ``montage.png`` (the most anomalous slices, map overlaid, radiological display) and ``result.json``,
    each written atomically; for a DICOM series also ``anomaly_map.dcm`` (and ``anomalous_region.seg.dcm``
    when flagged), see :func:`_write_dicom`.

    ``volume``: the scan already loaded (:func:`~monai_multiad.transforms.load_volume` of ``path``), else
    it is read here. ``result.json``, written last, holds the report row and ``screened_with`` (what
    screened the scan: :mod:`monai_multiad.cohort` keeps a scan whose record matches on a rerun).
    ``kwargs`` go to :func:`screen_volume` (modality, window, axis, image_size, batch_size, top_k,
    threshold, device, progress). Returns the report row (a :class:`~monai_multiad.report.ReportRow` as a dict); errors raise.
    """
    t0 = time.perf_counter()
    run = load_run(model_or_run, kwargs.pop("device", None))
    # from a path, the raw scan is freed as soon as it is normalised
    res = screen_volume(run, Path(path) if volume is None else volume, series_uid=series_uid, **kwargs)
    return write_outputs(res, path, Path(out_dir) / (name or scan_name(path)), series_uid=series_uid,
                         screened_with=screened_with, map_format=map_format, started=t0)


def write_outputs(res: ScreeningResult, path: str | Path, folder: Path, *, series_uid: str | None = None,
                  screened_with: dict | None = None, map_format: str = "nii.gz", started: float | None = None) -> dict:
    """Write what :func:`screen_path` writes for the screened scan ``path`` into ``folder``; ``result.json``
    last. Returns the report row (``seconds`` counted from ``started``, a ``time.perf_counter()``)."""
    if map_format not in MAP_FORMATS:
        raise MultiADInputError(f"map format {map_format!r}: expected one of {', '.join(MAP_FORMATS)}")
    t0 = time.perf_counter() if started is None else started
    files = {k: folder / v for k, v in (("anomaly_map", f"anomaly_map.{map_format}"),
                                        ("slice_scores", "slice_scores.csv"), ("montage", "montage.png"),
                                        ("result", "result.json"))}
    _write_map(files["anomaly_map"], res.anomaly_map)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["slice", "array_index", "score", "above_threshold"])
    for k, s in sorted(res.slice_scores.items()):
        above = "" if res.slice_threshold is None else int(s > res.slice_threshold)
        w.writerow([k, res.geometry.array_index(k), f"{s:.6g}", above])
    write_text(files["slice_scores"], buf.getvalue())
    write_png(files["montage"], _montage(res))
    dicom = _write_dicom(path, folder, res, series_uid)
    seconds = round(time.perf_counter() - t0, 3)
    row = ReportRow(str(path), folder.name, "ok", res.scan_score, res.anomalous, res.threshold,
                    res.info["num_slices"], res.info["screened_slices"], res.top_slices, str(files["anomaly_map"]),
                    seconds, "", res.threshold_source, res.threshold_kind, res.slice_threshold,
                    res.slice_threshold_source, **dicom).as_dict()
    write_json(files["result"], {**row, **res.info, "affine": res.anomaly_map.affine.tolist(),
                                 "format": res.anomaly_map.meta.get("format"),
                                 "files": {k: str(v) for k, v in files.items()},
                                 **({"screened_with": screened_with} if screened_with is not None else {})})
    return row



def unique_names(scans: Sequence[str | Path]) -> list[str]:
    """Output folder names: the scan names; where several scans share one (``*/flair.nii.gz``), the
    parent folder's name is prefixed, then a number appended if still needed."""
    names = [scan_name(s) for s in scans]
    names = [f"{Path(s).parent.name}_{n}" if names.count(n) > 1 else n for s, n in zip(scans, names)]
    out: list[str] = []
    for n in names:
        name, i = n, 1
        while name in out:
            i += 1
            name = f"{n}_{i}"
        out.append(name)
    return out


