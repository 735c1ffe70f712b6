"""Screening 3D scans (NIfTI files, DICOM series) with a model trained on 2D slices.

A scan is normalised (the run's modality and CT window unless overridden) and screened by a
:class:`~monai_multiad.inferers.VolumeSliceInferer`: every foreground slice along the run's axis (the rule
the run's training slices came from, :mod:`monai_multiad.data.volumes`) through the network, the maps put
back voxel for voxel on the scan's own grid (the 3D anomaly map has the scan's shape and affine; background
slices get 0), the slice scores (each slice map's maximum) and the scan score
(:func:`~monai_multiad.inferers.scan_score`: the mean of the ``top_k`` highest slice scores).

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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from monai_multiad.errors import MultiADInputError, input_error
from monai_multiad.inferers import VolumeSliceInferer, load_run
from monai_multiad.transforms.intensity import intensity_kwargs
from monai_multiad.transforms.volume import SliceGeometry, load_volume, scale_intensity

__all__ = ["ScreeningResult", "screen_volume"]


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
    threshold_kind: str = ""  #: ``threshold``'s :attr:`~monai_multiad.inferers.Threshold.source`



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
        model: a run folder (or its ``model.pt``), a :class:`~monai_multiad.inferers.LoadedRun`, or a network
            with the MultiAD eval interface (``model(x (B, C, S, S) in [0, 1]) -> (maps (B, 1, S, S), scores
            (B,))``, ``in_channels``).
        volume: ``MetaTensor`` ``(1, X, Y, Z)`` with its affine, or a NIfTI file / DICOM folder path.
        modality, window, axis, image_size, top_k: the :class:`~monai_multiad.inferers.ScreeningSettings`
            (default: the run's; ``top_k``: its calibration's, else
            :data:`~monai_multiad.inferers.DEFAULT_TOP_K`).
        batch_size: slices per forward pass (:class:`~monai_multiad.inferers.VolumeSliceInferer`).
        threshold: decision threshold on the scan score (default the run's calibrated scan threshold
            for these settings, else its normal threshold).
        device: where to run a run folder's network ("auto" default). series_uid: for DICOM folders.
    """
    run = load_run(model, device)
    settings = run.settings(modality=modality, window=window, slice_axis=axis, image_size=image_size, top_k=top_k)
    scan_threshold, slice_threshold = run.volume_thresholds(settings, threshold)
    inferer = VolumeSliceInferer(settings.slice_axis, settings.image_size, batch_size, settings.top_k,
                                 amp=run.amp, progress=progress, slice_context=settings.slice_context)
    vol = _as_volume(volume, series_uid)
    scaled = scale_intensity(vol, **intensity_kwargs(settings.modality, settings.window))
    if isinstance(volume, (str, Path)):
        del vol  # loaded here: keep only the normalised copy
    try:
        found = inferer.slice_maps(scaled, run.model, run.device)
    except MultiADInputError as e:
        raise MultiADInputError(f"{e} ({settings.modality})") from None
    normalisation = scaled.meta.get("intensity_normalisation")
    del scaled  # before the output volume is allocated: peak memory is the load and scaling, not this
    res = inferer.to_volume(found)
    geometry = res.geometry
    result_info = {
        "modality": settings.modality, "window": settings.reported_window(),
        "intensity_normalisation": normalisation, "slice_axis": settings.slice_axis,
        "image_size": settings.image_size, "in_channels": int(getattr(run.model, "in_channels", 3)),
        "num_slices": geometry.num_slices, "screened_slices": len(res.slices), "top_k": settings.top_k,
        "spatial_shape": list(geometry.spatial_shape), "array_axis": geometry.array_axis,
        "array_axis_flipped": geometry.array_axis_flipped, "foreground_rule": res.foreground_rule,
    }
    value = scan_threshold.value
    return ScreeningResult(res.anomaly_map, res.slice_scores, res.ranked.score, res.ranked.top,
                           bool(value is not None and res.ranked.score > value), value, result_info,
                           geometry, res.montage_slices, res.montage_images, res.montage_maps,
                           threshold_source=scan_threshold.description, slice_threshold=slice_threshold.value,
                           slice_threshold_source=slice_threshold.description, threshold_kind=scan_threshold.source)
