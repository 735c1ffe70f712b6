"""How a scan is screened: :class:`ScreeningSettings`, the one description of the settings that change a
scan's slice scores and scan score, and the one place their defaults are chosen.

The same settings decide whether a run's calibration applies (:meth:`ScreeningSettings.calibration_key`: a
``calibration.json`` made with other settings is not used, :mod:`monai_multiad.inferers.thresholds`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from monai_multiad.errors import MultiADInputError

__all__ = ["DEFAULT_TOP_K", "ScreeningSettings"]

#: scan score = the mean of the ``top_k`` highest slice scores; the default ``top_k`` where neither the user
#: nor the run's calibration sets one
DEFAULT_TOP_K = 3


def _window(window: Any) -> Any:
    """A CT window as given (a preset name, ``"level,width"``) or as a tuple ``(level, width)``; ``None``
    for none."""
    if window in (None, ""):
        return None
    return tuple(window) if isinstance(window, (tuple, list)) else window


@dataclass(frozen=True)
class ScreeningSettings:
    """What screening, volume evaluation and calibration score a scan with.

    Attributes:
        modality: intensity normalisation (``"mri"``, ``"ct"``, ``"minmax"``).
        window: the CT window (a preset name, ``"level,width"`` or ``(level, width)``), else ``None``.
        slice_axis: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        image_size: the slice side the network sees.
        top_k: scan score = mean of the ``top_k`` highest slice scores.
        slice_context: neighbouring slices on each side the network sees as channels (2.5D: 1); the
            run's own, never changed, as it is part of what the network was trained on.
    """

    modality: str = "mri"
    window: Any = None
    slice_axis: str = "axial"
    image_size: int = 256
    top_k: int = DEFAULT_TOP_K
    slice_context: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "modality", str(self.modality).lower())
        object.__setattr__(self, "window", _window(self.window))
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "top_k", int(self.top_k))
        if self.top_k < 1:
            raise MultiADInputError(f"top_k must be at least 1, got {self.top_k}")

    @classmethod
    def for_run(cls, run: Any, *, modality: str | None = None, window: Any = None, slice_axis: str | None = None,
                image_size: int | None = None, top_k: int | None = None) -> "ScreeningSettings":
        """The settings for screening with ``run`` (a :class:`~monai_multiad.inferers.run.LoadedRun`): each
        one given here, else the run's own (those it was trained with); ``top_k``: given, else the one the
        run's calibration was made with, else :data:`DEFAULT_TOP_K`."""
        made = ((run.calibration or {}).get("settings") or {}) if isinstance(run.calibration, dict) else {}
        return cls(modality=modality or run.modality, window=_window(window) or run.window,
                   slice_axis=slice_axis or run.axis, image_size=int(image_size or run.image_size),
                   top_k=int(top_k if top_k is not None else made.get("top_k", DEFAULT_TOP_K)),
                   slice_context=int(getattr(run, "slice_context", 0)))

    def calibration_key(self) -> dict:
        """The settings as a calibration record stores them (JSON: a window tuple becomes a list): a
        calibration applies only where its record's settings equal these."""
        window = list(self.window) if isinstance(self.window, tuple) else self.window
        return {"top_k": self.top_k, "modality": self.modality, "slice_axis": self.slice_axis,
                "image_size": self.image_size, "window": window}

    def reported_window(self) -> Any:
        """The window as results report it: only for CT (a JSON list for ``(level, width)``)."""
        if self.modality != "ct":
            return None
        return list(self.window) if isinstance(self.window, tuple) else self.window
