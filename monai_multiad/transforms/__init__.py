"""MONAI transforms of the project: medical volumes slice by slice (load, scale, slice, reassemble), and
synthetic anomalies for training."""

from __future__ import annotations

from monai_multiad.transforms.anomaly import (
    ANOMALY_MODES,
    SyntheticAnomaly,
    SyntheticAnomalyD,
    SyntheticAnomalyd,
    SyntheticAnomalyDict,
    corrupt_batch,
    perlin_mask,
    perlin_noise,
)
from monai_multiad.transforms.volume import (
    CT_WINDOWS,
    FG_THRESHOLD,
    MIN_FOREGROUND,
    LoadVolume,
    ScaleIntensityByModality,
    SliceGeometry,
    SlicesToVolume,
    VolumeToSlices,
    foreground_slices,
    labelled_slices,
    load_volume,
    scale_intensity,
    slice_affine,
    slice_foreground,
    slice_geometry,
    slices_to_volume,
    volume_to_slices,
)
from monai_multiad.transforms.volume_dict import (
    LoadVolumeD,
    LoadVolumed,
    LoadVolumeDict,
    ScaleIntensityByModalityD,
    ScaleIntensityByModalityd,
    ScaleIntensityByModalityDict,
    SlicesToVolumeD,
    SlicesToVolumed,
    SlicesToVolumeDict,
    VolumeToSlicesD,
    VolumeToSlicesd,
    VolumeToSlicesDict,
)

__all__ = [
    "ANOMALY_MODES", "SyntheticAnomaly", "SyntheticAnomalyD", "SyntheticAnomalyd", "SyntheticAnomalyDict",
    "corrupt_batch", "perlin_mask", "perlin_noise",
    "CT_WINDOWS", "FG_THRESHOLD", "MIN_FOREGROUND", "LoadVolume", "ScaleIntensityByModality", "SliceGeometry",
    "SlicesToVolume", "VolumeToSlices", "foreground_slices", "labelled_slices", "load_volume", "scale_intensity",
    "slice_affine", "slice_foreground", "slice_geometry", "slices_to_volume", "volume_to_slices",
    "LoadVolumeD", "LoadVolumed", "LoadVolumeDict", "ScaleIntensityByModalityD", "ScaleIntensityByModalityd",
    "ScaleIntensityByModalityDict", "SlicesToVolumeD", "SlicesToVolumed", "SlicesToVolumeDict",
    "VolumeToSlicesD", "VolumeToSlicesd", "VolumeToSlicesDict",
]
