"""Overlays and contact sheets (visualize.py) against hand-computed references."""

from __future__ import annotations

import numpy as np
import pytest

from monai_multiad.visualize import contact_sheet, overlay


def _grid(tiles: list[np.ndarray], columns: int, pad: int) -> np.ndarray:
    """The sheet written out by hand: black canvas, tile i at row i // columns, column i % columns."""
    h, w = tiles[0].shape[:2]
    rows, cols = -(-len(tiles) // columns), min(columns, len(tiles))
    sheet = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tile
    return sheet


@pytest.mark.parametrize("n, columns", [(1, 4), (3, 4), (4, 4), (5, 4), (7, 3), (9, 3), (2, 1)])
def test_contact_sheet_lays_tiles_out_row_by_row(n, columns):
    rng = np.random.default_rng(n)
    tiles = [rng.integers(1, 256, (5, 7, 3), dtype=np.uint8) for _ in range(n)]
    sheet = contact_sheet(tiles, columns=columns, pad=4)
    assert sheet.dtype == np.uint8 and np.array_equal(sheet, _grid(tiles, columns, 4))
    with pytest.raises(ValueError, match="no images"):
        contact_sheet([])


def _inner_outline(m: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask, the image's outside counting as outside."""
    p = np.pad(m, 1)
    inside = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inside


def test_overlay_outlines_the_mask_in_white():
    rng = np.random.default_rng(0)
    image, amap = rng.random((1, 12, 15)).astype(np.float32), np.zeros((12, 15), np.float32)
    plain = overlay(image, amap)
    assert plain.shape == (12, 15, 3) and plain.dtype == np.uint8
    for density in (0.1, 0.5, 0.9):
        mask = rng.random((12, 15)) < density
        mask[5, :] = True  # a defect across the whole image: its outline is closed along the image's edges
        out = overlay(image, amap, mask=mask)
        edge = _inner_outline(mask)
        assert edge[5, 0] and edge[5, -1]
        assert (out[edge] == 255).all() and np.array_equal(out[~edge], plain[~edge])
