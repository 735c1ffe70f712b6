"""A trained run, loaded once for scoring: :class:`LoadedRun` and :func:`load_run`, the one way screening,
calibration, prediction and volume evaluation load a run folder (or take a network built in Python)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_multiad.config import RunConfig
from monai_multiad.inferers.settings import ScreeningSettings
from monai_multiad.inferers.thresholds import Threshold, image_threshold, load_calibration, model_sha256, \
    volume_thresholds
from monai_multiad.errors import input_error

__all__ = ["LoadedRun", "load_run"]


@dataclass
class LoadedRun:
    """A network in eval mode with what it was trained with: its settings, its fusion's normal threshold
    and the run folder's calibration (``calibration.json``, :mod:`monai_multiad.calibration`)."""

    model: nn.Module
    device: torch.device
    image_size: int = 256
    modality: str = "mri"
    window: Any = None
    axis: str = "axial"
    threshold: float | None = None  #: the fusion's normal threshold, fitted at training
    amp: bool = False
    threshold_quantile: float = 0.99
    calibration: dict | None = None  #: the run folder's calibration.json (None: none, or a bare network)
    config: RunConfig | None = None  #: the run's configuration (None for a bare network)
    fusion: dict = field(default_factory=dict)  #: the fusion statistics model.pt holds
    source: Path | None = None  #: the run folder or model.pt it was loaded from
    slice_context: int = 0  #: neighbouring slices on each side the network sees as channels (2.5D: 1)

    @classmethod
    def from_parts(cls, network: nn.Module | None, cfg: RunConfig, fusion: dict, device: torch.device,
                   source: str | Path | None = None) -> "LoadedRun":
        """A run from what :func:`~monai_multiad.run_folder.load_model` returns (and the folder it read);
        ``network`` ``None`` where only the run's settings and thresholds are wanted."""
        thr = fusion.get("threshold")
        return cls(network, device, cfg.image_size, cfg.modality, cfg.ct_window or None, cfg.slice_axis,
                   None if thr is None else float(thr), bool(cfg.amp) and device.type == "cuda",
                   float(fusion.get("threshold_quantile", cfg.threshold_quantile)),
                   load_calibration(source) if source is not None else None, cfg, dict(fusion),
                   None if source is None else Path(source), int(cfg.slice_context))

    def settings(self, **given: Any) -> ScreeningSettings:
        """:meth:`ScreeningSettings.for_run` of this run: ``given`` (modality, window, slice_axis,
        image_size, top_k) where not ``None``, else the run's."""
        return ScreeningSettings.for_run(self, **given)

    def volume_thresholds(self, settings: ScreeningSettings,
                          given: float | None = None) -> tuple[Threshold, Threshold]:
        """(scan threshold, slice threshold) for screening with ``settings``: the run's calibrated ones
        where its calibration was made with these settings, else its normal threshold; ``given``
        overrides the scan's."""
        return volume_thresholds(self.calibration, self.threshold, self.threshold_quantile,
                                 settings.calibration_key(), given)

    def image_settings(self) -> dict:
        """What a calibration on 2D images must have been made with to apply to this run's predictions."""
        channels = self.config.in_channels if self.config is not None else getattr(self.model, "in_channels", 3)
        return {"image_size": self.image_size, "in_channels": int(channels)}

    def image_threshold(self) -> Threshold:
        """The threshold on 2D image scores: calibrated on images, else the fusion's normal threshold."""
        return image_threshold(self.calibration, self.threshold, self.threshold_quantile, self.image_settings())

    def identity(self) -> str:
        """SHA-256 of the run's ``model.pt``, or of a bare network's weights: what screened a scan."""
        if self.source is not None:
            digest = model_sha256(self.source)
            if digest is not None:
                return digest
        h = hashlib.sha256()
        for name, value in self.model.state_dict().items():
            h.update(name.encode())
            h.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def load_run(model_or_run: Any, device: Any = None) -> LoadedRun:
    """A :class:`LoadedRun` from a run folder or its ``model.pt`` (BatchNorm folded, on ``device``:
    "auto" by default), from a network (``model(x) -> (maps, scores)``, on its own device unless one is
    given; its fusion's threshold, if finite, is its normal threshold), or a :class:`LoadedRun` as is."""
    if isinstance(model_or_run, LoadedRun):
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
        return LoadedRun(model.to(dev).eval(), dev, threshold=thr)
    if not isinstance(model_or_run, (str, Path)):
        raise input_error(None, f"expected a run folder, a model.pt or a network, got {type(model_or_run).__name__}")
    dev = resolve_device(device or "auto")
    network, cfg, fusion = load_model(model_or_run, dev, fold_batchnorm=True)
    return LoadedRun.from_parts(network, cfg, fusion, dev, model_or_run)
