"""Overlays and contact sheets (visualize.py) against hand-computed references."""

from __future__ import annotations

import numpy as np
import pytest

from monai_multiad.visualize import caption, contact_sheet, overlay


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


def test_caption_adds_the_text_below_the_tile():
    from PIL import Image, ImageDraw, ImageFont

    tile = np.full((40, 120, 3), 90, np.uint8)
    out = caption(tile, ["bottle/000.png", "score 2.5 > 1.2  DEFECT"])
    assert out.shape == (40 + 2 * 12 + 4, 120, 3) and np.array_equal(out[:40], tile)  # the tile untouched
    strip = out[40:]
    inked = (strip > 0).any(axis=(1, 2))  # rows of the strip with text
    assert strip.max() > 200 and inked[2:14].any() and inked[14:26].any()
    # the first line as Pillow draws it, at the same place
    ref = Image.new("RGB", (120, 28), (0, 0, 0))
    ImageDraw.Draw(ref).text((2, 2), "bottle/000.png", fill=(255, 255, 255), font=ImageFont.load_default())
    assert np.array_equal(strip[:14], np.asarray(ref)[:14])
    long = caption(tile, ["x" * 200])
    assert long.shape[1] == 120  # a line longer than the tile is cut, not the tile widened


def test_sheet_picks_the_top_and_the_informative_bottom():
    from monai_multiad.inference import _sheet_caption, _sheet_rows

    # one scan of slices 0..19: the lowest scores at its ends (near-empty slices), a lesion at 9-11
    rows = [{"case": "s", "slice_index": k, "score": float(abs(k - 9.5)) * -0.1 + (5.0 if 9 <= k <= 11 else 1.0),
             "label": int(9 <= k <= 11), "path": "s.nii.gz", "index": k} for k in range(20)]
    picks = _sheet_rows(rows, 3)
    assert [r["slice_index"] for r in picks[:3]] == [9, 10, 11]
    assert all(5 <= r["slice_index"] <= 14 for r in picks[3:])  # the middle half of the scan's slices
    assert _sheet_caption(picks[0], 2.0) == ["s", "slice 9  DEFECT", "score 4.95 > 2"]
    images = [{"path": f"/d/test/good/{i:03d}.png", "score": float(i), "label": 0, "index": i} for i in range(10)]
    assert [r["index"] for r in _sheet_rows(images, 2)] == [9, 8, 1, 0]
    assert _sheet_caption(images[1], None) == ["good/001.png", "normal", "score 1"]
