"""Screening 3D scans (NIfTI files, DICOM series) with a model trained on 2D slices.

A scan is normalised (the run's modality and CT window unless overridden), cut into canonical
slices along the run's axis by a :class:`~monai_multiad.transforms.VolumeToSlices` (every foreground
slice: the transform and rule the run's training slices came from, :mod:`monai_multiad.data.volumes`),
run through the network ``batch_size`` slices at a time, and the per-slice maps are put back voxel for
voxel on the scan's own grid by a :class:`~monai_multiad.transforms.SlicesToVolume`: the 3D anomaly map
has the scan's shape and affine. Background slices get 0.

* slice score: the network's image score of the slice (its map's maximum);
* **scan score: the mean of the ``top_k`` highest slice scores** (all slices when fewer), robust
  to one noisy slice yet sensitive to a lesion that spans a few slices;
* ``anomalous``: scan score > threshold: the run's calibrated scan threshold (``multiad calibrate``:
  a known false-positive rate on normal scans, :mod:`monai_multiad.calibration`) when it has one for
  these settings, else its normal threshold (the ``threshold_quantile`` of the normal validation
  *slice* scores) unless one is given; ``False`` when none is known. Slices are marked against the
  calibrated slice threshold, or that same normal threshold.

For research scripts, the torch-level call is :func:`screen_volume`::

    from monai_multiad.screening import screen_volume
    from monai_multiad.transforms import load_volume
    result = screen_volume("runs/brain", load_volume("scan.nii.gz"))  # a run folder or a MultiAD
    result.anomaly_map   # MetaTensor (1, X, Y, Z) on the scan's grid, with its affine
    result.scan_score, result.top_slices, result.slice_scores

Slice indices are canonical (RAS-reoriented) indices along the axis; ``slice_scores.csv`` also
gives the matching index along the scan's own array axis. For DICOM input, the map is written as
NIfTI with the series' geometry (its LPS position/orientation converted to NIfTI's RAS affine by
:func:`~monai_multiad.transforms.load_volume`), so it overlays the series in any viewer, and, with the
``[dicom]`` extra, as a DICOM Parametric Map over the series (:mod:`monai_multiad.dicom_output`).
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from monai_multiad.data.volumes import intensity_kwargs
from monai_multiad.errors import MultiADInputError, input_error
from monai_multiad.outputs import atomic_path, write_json, write_png, write_text
from monai_multiad.transforms.volume import SliceGeometry, SlicesToVolume, VolumeToSlices, load_volume, \
    scale_intensity
from monai_multiad.visualize import contact_sheet, overlay

__all__ = ["ScreeningResult", "rank_slices", "screen_volume", "screen_path", "screen_paths"]

REPORT_FIELDS = ("scan", "name", "status", "scan_score", "anomalous", "threshold", "num_slices", "screened_slices",
                 "top_slices", "map", "seconds", "error", "threshold_source", "slice_threshold",
                 "dicom_map", "dicom_seg", "dicom_note")  # dicom_*: DICOM series only (monai_multiad.dicom_output)


@dataclass
class ScreeningResult:
    """What :func:`screen_volume` found in one scan."""

    anomaly_map: MetaTensor  #: (1, X, Y, Z) on the input grid, with the input's affine; 0 on background slices
    slice_scores: dict[int, float]  #: canonical slice index -> slice score (screened slices only)
    scan_score: float  #: mean of the top-k slice scores
    top_slices: list[int]  #: the k highest-scored slice indices, highest first
    anomalous: bool  #: scan_score > threshold (False when no threshold is known)
    threshold: float | None = None
    info: dict = field(default_factory=dict)  #: JSON-friendly settings and sizes
    geometry: SliceGeometry | None = field(default=None, repr=False)  #: where the slices lie in the scan
    montage_slices: list[int] = field(default_factory=list)  #: the most anomalous slices, highest first (<= 6)
    montage_images: torch.Tensor | None = field(default=None, repr=False)  #: their (n, 1, S, S) images in [0, 1]
    montage_maps: torch.Tensor | None = field(default=None, repr=False)  #: their (n, 1, S, S) maps
    threshold_source: str = ""  #: where ``threshold`` comes from, in words (calibrated, uncalibrated, given)
    slice_threshold: float | None = None  #: the slice-level threshold (calibrated, else the run's normal one)
    slice_threshold_source: str = ""


@dataclass
class _Run:
    """A network with the defaults it was trained with."""

    model: nn.Module
    device: torch.device
    image_size: int = 256
    modality: str = "mri"
    window: str | None = None
    axis: str = "axial"
    threshold: float | None = None
    amp: bool = False
    threshold_quantile: float = 0.99
    calibration: dict | None = None  #: the run folder's calibration.json (monai_multiad.calibration)


def _load_run(model_or_run: Any, device=None) -> _Run:
    """A :class:`_Run` from a run folder / model.pt path, a network, or a :class:`_Run`."""
    if isinstance(model_or_run, _Run):
        return model_or_run
    from monai_multiad.run_folder import load_model, resolve_device

    if isinstance(model_or_run, nn.Module):
        model = model_or_run
        param = next(iter(model.parameters()), None)
        dev = torch.device(device) if device not in (None, "auto") else (param.device if param is not None else
                                                                          torch.device("cpu"))
        fusion = getattr(model, "fusion", None)
        thr = getattr(fusion, "threshold", None)
        thr = float(thr) if thr is not None and bool(torch.isfinite(torch.as_tensor(thr))) else None
        return _Run(model.to(dev).eval(), dev, threshold=thr)
    dev = resolve_device(device or "auto")
    model, cfg, fusion = load_model(model_or_run, dev, fold_batchnorm=True)
    thr = fusion.get("threshold")
    from monai_multiad.calibration import load_calibration

    return _Run(model, dev, cfg.image_size, cfg.modality, cfg.ct_window or None, cfg.slice_axis,
                None if thr is None else float(thr), bool(cfg.amp) and dev.type == "cuda",
                float(fusion.get("threshold_quantile", cfg.threshold_quantile)), load_calibration(model_or_run))


def _thresholds(run: _Run, top_k: int | None, modality: str, window: Any, axis: str, size: int,
                given: float | None = None):
    """(top_k, scan Threshold, slice Threshold): the run's calibrated thresholds where its calibration.json
    was made with these settings, else its normal threshold; ``top_k`` None: the calibration's, else 3."""
    from monai_multiad.calibration import volume_thresholds

    made = (run.calibration or {}).get("settings", {})
    top_k = int(top_k if top_k is not None else made.get("top_k", 3))
    settings = {"top_k": top_k, "modality": modality, "slice_axis": axis, "image_size": size,
                "window": list(window) if isinstance(window, (tuple, list)) else window}
    scan, slc = volume_thresholds(run.calibration, run.threshold, run.threshold_quantile, settings, given)
    return top_k, scan, slc


def rank_slices(scores: Sequence[float], indices: Sequence[int]) -> list[int]:
    """Positions of the slices from the most anomalous down (ties: the lower slice index first): the
    order of the top slices, the montage and the scan score (the mean of the first ``top_k``).
    ``multiad evaluate`` ranks a volume's slices with it too."""
    return sorted(range(len(indices)), key=lambda i: (-float(scores[i]), indices[i]))


def _as_volume(volume: Any, series_uid: str | None = None) -> MetaTensor:
    if isinstance(volume, (str, Path)):
        return load_volume(volume, series_uid=series_uid)
    if not isinstance(volume, MetaTensor):
        volume = MetaTensor(torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume))
    if volume.ndim == 3:
        volume = volume[None]
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise input_error(volume.meta.get("filename_or_obj"), f"expected a volume (1, X, Y, Z), got shape "
                                                             f"{tuple(volume.shape)}")
    return volume


@torch.no_grad()
def screen_volume(model: Any, volume: Any, *, modality: str | None = None, window: Any = None,
                  axis: str | None = None, image_size: int | None = None, batch_size: int = 32,
                  top_k: int | None = None, threshold: float | None = None, device=None, series_uid: str | None = None,
                  progress: bool = False) -> ScreeningResult:
    """Screen one scan slice by slice and put the maps back on its grid.

    Args:
        model: a run folder (or its ``model.pt``), or a network with the MultiAD eval interface
            (``model(x (B, C, S, S) in [0, 1]) -> (maps (B, 1, S, S), scores (B,))``, ``in_channels``).
        volume: ``MetaTensor`` ``(1, X, Y, Z)`` with its affine, or a NIfTI file / DICOM folder path.
        modality, window: intensity normalisation ("mri", "ct", "minmax"; window: a preset name,
            "level,width" or ``(level, width)``); default the run's ("mri" for a bare network).
        axis: "axial", "coronal" or "sagittal" (default the run's). image_size: slice side the
            network sees (default the run's, 256 for a bare network).
        batch_size: slices per forward pass: memory is one batch at model resolution, the map stack
            ``(N, 1, S, S)`` and the output volume; the scan is never copied at model resolution at once.
        top_k: scan score = mean of the ``top_k`` highest slice scores (default: the run's
            calibration's, else 3).
        threshold: decision threshold on the scan score (default the run's calibrated scan threshold
            for these settings, else its normal threshold).
        device: where to run a run folder's network ("auto" default). series_uid: for DICOM folders.
    """
    run = _load_run(model, device)
    modality = (modality or run.modality).lower()
    window = window if window not in (None, "") else run.window
    axis, size = axis or run.axis, int(image_size or run.image_size)
    top_k, scan_threshold, slice_threshold = _thresholds(run, top_k, modality, window, axis, size, threshold)
    if batch_size < 1 or top_k < 1:
        raise MultiADInputError(f"batch_size and top_k must be at least 1, got {batch_size} and {top_k}")
    in_channels = int(getattr(run.model, "in_channels", 3))
    threshold = scan_threshold.value
    vol = _as_volume(volume, series_uid)
    scaled = scale_intensity(vol, **intensity_kwargs(modality, window))
    if isinstance(volume, (str, Path)):
        del vol  # loaded here: keep only the normalised copy
    slicer = VolumeToSlices(axis, spatial_size=(size, size), chunk_size=batch_size)
    geometry, kept = slicer.select(scaled)
    if not kept:
        raise input_error(scaled.meta.get("filename_or_obj"), "no foreground slice: the volume is empty or constant "
                                                              f"after normalisation ({modality})")
    maps = torch.empty((len(kept), 1, size, size), dtype=torch.float32)
    scores = torch.empty(len(kept), dtype=torch.float64)
    chunks = range(0, len(kept), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="slices", unit="batch", leave=False)
    for start in chunks:
        ks = kept[start:start + batch_size]
        x, _, _ = slicer.slices(scaled, ks)
        x = x.expand(-1, in_channels, -1, -1) if in_channels != 1 else x
        with torch.autocast(run.device.type, enabled=run.amp):
            amap, score = run.model(x.to(run.device))
        maps[start:start + len(ks)] = amap.float().cpu()
        scores[start:start + len(ks)] = score.double().cpu()
    slice_scores = {k: float(s) for k, s in zip(kept, scores.tolist())}
    order = rank_slices(scores.tolist(), kept)
    top = [kept[i] for i in order[:top_k]]
    scan_score = float(np.mean([slice_scores[k] for k in top]))
    shown = order[:max(top_k, 6)]
    shown_images, _, _ = slicer.slices(scaled, [kept[i] for i in shown])
    normalisation = scaled.meta.get("intensity_normalisation")
    del scaled  # before the output volume is allocated: peak memory is the load and scaling, not this
    amap_volume = SlicesToVolume(mode="bilinear", fill=0.0, chunk_size=batch_size)(maps, kept, geometry)
    result_info = {
        "modality": modality, "window": None if modality != "ct" else (list(window) if isinstance(window, (tuple, list))
                                                                       else window),
        "intensity_normalisation": normalisation, "slice_axis": axis,
        "image_size": size, "in_channels": in_channels, "num_slices": geometry.num_slices,
        "screened_slices": len(kept), "top_k": top_k, "spatial_shape": list(geometry.spatial_shape),
        "array_axis": geometry.array_axis, "array_axis_flipped": geometry.array_axis_flipped,
        "foreground_rule": slicer.foreground_rule,
    }
    return ScreeningResult(amap_volume, slice_scores, scan_score, top,
                           bool(threshold is not None and scan_score > threshold), threshold, result_info,
                           geometry, [kept[i] for i in shown], shown_images, maps[shown],
                           threshold_source=scan_threshold.description, slice_threshold=slice_threshold.value,
                           slice_threshold_source=slice_threshold.description)


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
    threshold, device, progress). Returns the report row (see :data:`REPORT_FIELDS`); errors raise.
    """
    t0 = time.perf_counter()
    run = _load_run(model_or_run, kwargs.pop("device", None))
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
    row = {"scan": str(path), "name": folder.name, "status": "ok", "scan_score": res.scan_score,
           "anomalous": res.anomalous, "threshold": res.threshold, "num_slices": res.info["num_slices"],
           "screened_slices": res.info["screened_slices"], "top_slices": res.top_slices,
           "map": str(files["anomaly_map"]), "seconds": seconds, "error": "",
           "threshold_source": res.threshold_source, "slice_threshold": res.slice_threshold,
           "slice_threshold_source": res.slice_threshold_source}
    row.update(dicom)
    write_json(files["result"], {**row, **res.info, "affine": res.anomaly_map.affine.tolist(),
                                 "format": res.anomaly_map.meta.get("format"),
                                 "files": {k: str(v) for k, v in files.items()},
                                 **({"screened_with": screened_with} if screened_with is not None else {})})
    return row


def _write_report(out_dir: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(REPORT_FIELDS), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "top_slices": ";".join(map(str, r.get("top_slices") or []))})
    write_text(out_dir / "report.csv", buf.getvalue())
    write_json(out_dir / "report.json", rows)


def _unique_names(scans: Sequence[str | Path]) -> list[str]:
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


def screen_paths(run: Any, scans: Sequence[str | Path], out_dir: str | Path, **kwargs) -> list[dict]:
    """Screen several scans with one run: one output folder per scan, ``report.csv``, ``report.json`` and
    ``report.html``; resumable, and sharded in an ``ignite.distributed`` group. See
    :func:`monai_multiad.cohort.screen_paths`, which this calls."""
    from monai_multiad.cohort import screen_paths as screen_cohort

    return screen_cohort(run, scans, out_dir, **kwargs)
