"""The inferer layer: below everything that scores files.

* :mod:`~monai_multiad.inferers.run`: a trained run loaded once (:class:`LoadedRun`, :func:`load_run`);
* :mod:`~monai_multiad.inferers.settings`: how a scan is screened (:class:`ScreeningSettings`, the one
  ``top_k`` default);
* :mod:`~monai_multiad.inferers.thresholds`: decision thresholds and their source (:class:`Threshold`,
  whether a calibration applies);
* :mod:`~monai_multiad.inferers.slice_inferer`: a volume to slice maps, slice scores and the scan score
  (:class:`VolumeSliceInferer`, :func:`scan_score`);
* :mod:`~monai_multiad.inferers.image_inferer`: 2D images to maps and scores (:class:`ImageAnomalyInferer`).

Screening, volume evaluation, prediction, calibration, the cohort job, the CLI and the bundles build on it;
it imports none of them.
"""

from monai_multiad.inferers.image_inferer import ImageAnomalyInferer, restore_map
from monai_multiad.inferers.run import LoadedRun, load_run
from monai_multiad.inferers.settings import DEFAULT_TOP_K, ScreeningSettings
from monai_multiad.inferers.slice_inferer import (
    MONTAGE_SLICES,
    RankedSlices,
    SliceInference,
    SliceMaps,
    VolumeSliceInferer,
    rank_slices,
    scan_score,
)
from monai_multiad.inferers.thresholds import (
    CALIBRATION_FILE,
    Threshold,
    image_threshold,
    load_calibration,
    model_sha256,
    volume_thresholds,
)

__all__ = ["CALIBRATION_FILE", "DEFAULT_TOP_K", "ImageAnomalyInferer", "LoadedRun", "MONTAGE_SLICES", "RankedSlices", "ScreeningSettings",
           "SliceInference", "SliceMaps", "Threshold", "VolumeSliceInferer", "image_threshold", "load_calibration",
           "load_run", "model_sha256", "rank_slices", "restore_map", "scan_score", "volume_thresholds"]
