"""Intensity normalisation by modality: MRI percentiles, CT Hounsfield windows, min-max."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRange, Transform
from monai.utils import convert_to_tensor

from monai_multiad.errors import input_error

__all__ = ["CT_WINDOWS", "ScaleIntensityByModality", "intensity_kwargs", "parse_window", "scale_intensity"]

# CT display windows as (level, width) in Hounsfield units; the window maps
# [level - width / 2, level + width / 2] linearly onto [0, 1]. Values are the standard ones
# listed by Radiopaedia, "Windowing (CT)" (head and neck, chest, abdomen, spine sections).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "temporal_bone": (600.0, 2800.0),
    "soft_tissue": (40.0, 400.0),  # head and neck soft tissues (W 350-400, L 20-60)
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (50.0, 400.0),  # abdominal soft tissues
    "liver": (30.0, 150.0),
    "bone": (400.0, 1800.0),
}


def parse_window(window) -> tuple[tuple[float, float] | None, str | None]:
    """A CT window as ``(window, preset)``: a preset name, ``"level,width"``, ``(level, width)`` or empty."""
    if window is None or (isinstance(window, str) and not window.strip()):
        return None, None
    if isinstance(window, str):
        text = window.strip()
        if text.lower() in CT_WINDOWS:
            return None, text.lower()
        try:
            level, width = (float(v) for v in text.replace(";", ",").split(","))
        except ValueError:
            raise input_error(None, f"CT window {window!r}: expected a preset ({', '.join(sorted(CT_WINDOWS))}) "
                                    "or 'level,width' in HU") from None
        return (level, width), None
    level, width = window
    return (float(level), float(width)), None


def intensity_kwargs(modality: str, window=None) -> dict:
    """Keyword arguments of :func:`scale_intensity` for a modality and a CT window (a preset name,
    ``"level,width"``, ``(level, width)`` or empty; read for ``"ct"`` only)."""
    win, preset = parse_window(window) if str(modality).lower() == "ct" else (None, None)
    return {"mode": str(modality).lower(), "window": win, "preset": preset}


def as_meta(img: Any) -> MetaTensor:
    if isinstance(img, MetaTensor):
        return img
    return MetaTensor(torch.as_tensor(np.asarray(img) if not isinstance(img, torch.Tensor) else img))


def scale_intensity(img: Any, mode: str = "mri", lower: float = 0.5, upper: float = 99.5,
                    window: Sequence[float] | None = None, preset: str | None = None) -> MetaTensor:
    """Scale a volume to float32 ``[0, 1]``: see :class:`ScaleIntensityByModality`."""
    img = as_meta(img)
    x = img.as_tensor()
    mode = str(mode).lower()
    if mode == "ct":
        named = preset if window is None else None
        if window is None:
            if preset is None or preset not in CT_WINDOWS:
                raise input_error(None, f"mode='ct' needs window=(level, width) or preset= one of "
                                        f"{sorted(CT_WINDOWS)}; got preset={preset!r}")
            window = CT_WINDOWS[preset]
        level, width = float(window[0]), float(window[1])
        if width <= 0:
            raise input_error(None, f"CT window width must be > 0, got {width}")
        lo, hi = level - width / 2.0, level + width / 2.0
        name = f"ct window {named + ' ' if named else ''}(level {level:g}, width {width:g})"
    elif mode == "mri":
        if not 0.0 <= lower < upper <= 100.0:
            raise input_error(None, f"percentiles must satisfy 0 <= lower < upper <= 100, got ({lower}, {upper})")
        flat = np.ravel(x.detach().cpu().numpy(), order="K")  # memory order: a view, read sequentially
        fg = flat[flat != 0]
        if fg.size:
            lo, hi = (float(v) for v in np.percentile(fg, [lower, upper], overwrite_input=True))
        else:
            lo = hi = 0.0
        del fg
        name = f"mri percentiles {lower:g}-{upper:g} of non-zero voxels ({lo:.6g}, {hi:.6g})"
    elif mode == "minmax":
        lo, hi = float(x.min()), float(x.max())
        name = f"minmax ({lo:.6g}, {hi:.6g})"
    else:
        raise input_error(None, f"unknown intensity mode {mode!r}; expected 'mri', 'ct' or 'minmax'")
    if hi > lo:  # [lo, hi] -> [0, 1] by MONAI; clipped in place here: its clip=True (b_min=0, b_max=1) costs two
        # more copies of the volume (a CT's peak memory twice ours) and 3x the time, for the same numbers
        linear = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=None, b_max=None, dtype=torch.float32)
        out = convert_to_tensor(linear(x.float()), track_meta=False).clamp_(0.0, 1.0)
    elif mode == "mri":  # constant foreground: keep it visible
        out = (x != 0).float()
    else:
        out = torch.zeros_like(x, dtype=torch.float32)
    meta = {k: v for k, v in img.meta.items() if k != "affine"}
    meta["intensity_normalisation"] = name
    return MetaTensor(out, affine=img.affine, meta=meta, applied_operations=list(img.applied_operations))


class ScaleIntensityByModality(Transform):
    """Map a volume's intensities to float32 ``[0, 1]`` (clipped) by modality.

    - ``"mri"``: the ``lower``/``upper`` percentiles (default 0.5, 99.5) of the volume's non-zero
      (foreground) voxels map to 0 / 1. A volume whose foreground is constant gives 1 on it.
    - ``"ct"``: a Hounsfield window ``window=(level, width)`` or ``preset`` from
      :data:`CT_WINDOWS`: ``level - width/2 -> 0``, ``level -> 0.5``, ``level + width/2 -> 1``.
    - ``"minmax"``: the volume's minimum and maximum map to 0 / 1 (a constant volume gives 0).

    The choice is recorded in ``meta["intensity_normalisation"]`` (e.g.
    ``"ct window liver (level 30, width 150)"``).

    Args:
        mode: "mri", "ct" or "minmax".
        lower, upper: percentiles for "mri".
        window: ``(level, width)`` in HU for "ct" (wins over ``preset``), or as text: a preset name or
            ``"level,width"`` (the ``ct_window`` option; ``""`` is none). Ignored by the other modes.
        preset: a name in :data:`CT_WINDOWS` for "ct".
    """

    def __init__(self, mode: str = "mri", lower: float = 0.5, upper: float = 99.5,
                 window: Sequence[float] | str | None = None, preset: str | None = None) -> None:
        settled = intensity_kwargs(mode, window)
        window, preset = settled["window"], settled["preset"] or preset
        self.mode, self.lower, self.upper, self.window, self.preset = mode, lower, upper, window, preset
        scale_intensity(torch.zeros(1, 2, 2, 2), mode, lower, upper, window, preset)  # validate options now

    def __call__(self, img: Any) -> MetaTensor:
        """Args: img: ``(C, X, Y, Z)`` (any shape works). Returns: float32 ``MetaTensor`` in ``[0, 1]``."""
        return scale_intensity(img, self.mode, self.lower, self.upper, self.window, self.preset)
