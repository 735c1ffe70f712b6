"""Pictures a person looks at: anomaly maps over their images, and contact sheets of the most
and least anomalous test images, each tile captioned. Numpy in, uint8 RGB out (no plotting library):
the ground truth's outline is ``skimage.segmentation.find_boundaries``, the sheet ``skimage.util.montage``,
the captions Pillow's built-in font."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.segmentation import find_boundaries
from skimage.util import montage

__all__ = ["colorize", "overlay", "contact_sheet", "caption", "to_rgb_uint8"]

# a perceptually ordered dark-blue -> cyan -> yellow -> red ramp (sampled, linearly interpolated)
_RAMP = np.array(
    [[0.0, 0.0, 0.5], [0.0, 0.3, 1.0], [0.0, 0.9, 0.9], [0.6, 1.0, 0.3], [1.0, 0.9, 0.0], [1.0, 0.3, 0.0], [0.6, 0.0, 0.0]]
)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """(C, H, W) or (H, W) float in [0, 1] -> (H, W, 3) uint8."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = image[0] if image.shape[0] == 1 else np.moveaxis(image[:3], 0, -1)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def colorize(amap: np.ndarray, vmin: float = 0.0, vmax: float | None = None) -> np.ndarray:
    """(H, W) map -> (H, W, 3) float RGB in [0, 1] with the ramp, ``vmax`` defaulting to the map's max."""
    amap = np.asarray(amap, dtype=np.float32)
    vmax = float(amap.max()) if vmax is None else float(vmax)
    t = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_RAMP) - 2)
    frac = (t - lo)[..., None]
    return _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac


def overlay(image: np.ndarray, amap: np.ndarray, vmax: float | None = None, alpha: float = 0.5,
            mask: np.ndarray | None = None) -> np.ndarray:
    """Blend the coloured map over the image; outline ``mask`` (ground truth) in white. -> (H, W, 3) uint8."""
    base = to_rgb_uint8(image).astype(np.float32) / 255.0
    amap = np.asarray(amap, dtype=np.float32).reshape(base.shape[:2])
    weight = alpha * np.clip(amap / max(vmax or float(amap.max()), 1e-12), 0, 1)[..., None]
    out = base * (1 - weight) + colorize(amap, vmax=vmax) * weight
    if mask is not None:  # its inner 4-connected outline; outside the image counts as background
        m = np.pad(np.asarray(mask, dtype=bool).reshape(base.shape[:2]), 1)
        out[find_boundaries(m, connectivity=1, mode="inner")[1:-1, 1:-1]] = 1.0
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def contact_sheet(tiles: Sequence[np.ndarray], columns: int = 4, pad: int = 4) -> np.ndarray:
    """Lay equally sized (H, W, 3) uint8 tiles out in a grid of ``columns`` (fewer when there are fewer
    tiles), row by row, with ``pad`` px of black between them and around them."""
    if not tiles:
        raise ValueError("no images for the contact sheet")
    grid = (-(-len(tiles) // columns), min(columns, len(tiles)))
    return montage(np.stack(tiles), fill=(0, 0, 0), grid_shape=grid, padding_width=pad, channel_axis=-1)


def caption(tile: np.ndarray, lines: Sequence[str], color: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """``tile`` (H, W, 3) uint8 with a black strip below it holding ``lines`` of text (Pillow's built-in
    font; a line longer than the tile is cut with "~")."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    height = 12
    strip = Image.new("RGB", (tile.shape[1], height * len(lines) + 4), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    for i, text in enumerate(lines):
        while text and draw.textlength(text, font=font) > tile.shape[1] - 4:
            text = text[:-2] + "~"
        draw.text((2, 2 + height * i), text, fill=color, font=font)
    return np.concatenate([tile, np.asarray(strip, dtype=np.uint8)], axis=0)
