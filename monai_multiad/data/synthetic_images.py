"""Synthetic textures with planted defects, written in the MVTec AD layout (tests, CLI demo).

Normal images share one texture family (the same sinusoid gratings, chosen by
``pattern_seed``) and differ in phase and fine noise, so a CNN sees a consistent "normal"
pattern; defects are a scratch (a thin straight line, dark or bright) or a blob (an ellipse
of another intensity and texture). Everything is deterministic by seed.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from monai_multiad.errors import input_error

__all__ = ["make_texture", "plant_defect", "write_png", "write_mvtec_dataset", "DEFECT_KINDS"]

#: Defect kinds :func:`plant_defect` draws (also the defect class folders of the dataset).
DEFECT_KINDS = ("scratch", "blob")


def size_hw(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    h, w = (int(s) for s in size)
    if h < 8 or w < 8:
        raise input_error(None, f"size must be at least 8 x 8, got {h} x {w}")
    return h, w


def make_texture(size, seed: int = 0, channels: int = 1, pattern_seed: int = 0) -> np.ndarray:
    """A regular-ish texture in [0, 1]: float32 ``(H, W)`` for ``channels=1``, ``(3, H, W)`` for 3.

    Three sinusoid gratings whose orientations and frequencies (in cycles per pixel, so the
    look does not depend on the size) come from ``pattern_seed``; their phases and the fine
    noise come from ``seed``. Colour images tint the pattern per channel.
    """
    if channels not in (1, 3):
        raise input_error(None, f"channels must be 1 or 3, got {channels!r}")
    h, w = size_hw(size)
    prng = np.random.default_rng(pattern_seed)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pattern = np.zeros((h, w), np.float32)
    total = 0.0
    for _ in range(3):
        theta = prng.uniform(0.0, np.pi)
        freq = prng.uniform(0.05, 0.16)
        amp = prng.uniform(0.5, 1.0)
        phase = rng.uniform(0.0, 2 * np.pi)
        proj = xx * np.cos(theta) + yy * np.sin(theta)
        pattern += np.float32(amp) * np.cos(np.float32(2 * np.pi * freq) * proj + np.float32(phase))
        total += amp
    pattern /= np.float32(total)  # in [-1, 1]
    noise = rng.standard_normal((h, w)).astype(np.float32)
    if channels == 1:
        img = 0.5 + 0.3 * pattern + 0.03 * noise
    else:
        tint = prng.uniform(0.6, 1.0, 3).astype(np.float32)
        base = prng.uniform(0.4, 0.6, 3).astype(np.float32)
        img = base[:, None, None] + 0.3 * tint[:, None, None] * pattern[None] + 0.03 * noise[None]
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def plant_defect(image: np.ndarray, seed: int = 0, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Plant one defect into a copy of ``image`` (``(H, W)`` or ``(C, H, W)``, values in [0, 1]).

    ``kind``: ``"scratch"`` or ``"blob"`` (``None``: chosen by ``seed``). Returns
    ``(image, mask)`` with the image float32 like the input's shape and the mask bool ``(H, W)``
    (never empty).
    """
    from skimage.draw import ellipse, polygon

    img = np.array(image, dtype=np.float32, copy=True)
    if img.ndim not in (2, 3):
        raise input_error(None, f"image must be (H, W) or (C, H, W), got shape {img.shape}")
    h, w = img.shape[-2:]
    rng = np.random.default_rng(seed)
    if kind is None:
        kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
    if kind not in DEFECT_KINDS:
        raise input_error(None, f"unknown defect kind {kind!r}; expected one of {', '.join(DEFECT_KINDS)}")
    view = img if img.ndim == 3 else img[None]
    m = min(h, w)
    mask = np.zeros((h, w), bool)
    if kind == "scratch":
        # a straight line through the central region, at least half the image long
        angle = rng.uniform(0.0, np.pi)
        length = rng.uniform(0.5, 0.8) * m
        cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
        dy, dx = np.sin(angle) * length / 2, np.cos(angle) * length / 2
        half = max(0.75, m / 48.0)  # half thickness in px
        ny, nx = np.cos(angle) * half, -np.sin(angle) * half
        rows = [cy - dy + ny, cy + dy + ny, cy + dy - ny, cy - dy - ny]
        cols = [cx - dx + nx, cx + dx + nx, cx + dx - nx, cx - dx - nx]
        rr, cc = polygon(rows, cols, shape=(h, w))
        mask[rr, cc] = True
        value = 0.05 if rng.random() < 0.5 else 0.95
        view[:, mask] = value + 0.02 * rng.standard_normal((view.shape[0], int(mask.sum()))).astype(np.float32)
    else:
        r_rad = rng.uniform(0.08, 0.18) * h
        c_rad = rng.uniform(0.08, 0.18) * w
        cy = rng.uniform(0.25, 0.75) * h
        cx = rng.uniform(0.25, 0.75) * w
        rr, cc = ellipse(cy, cx, r_rad, c_rad, shape=(h, w), rotation=rng.uniform(-np.pi, np.pi))
        mask[rr, cc] = True
        shift = rng.choice([-0.3, 0.3])
        n = int(mask.sum())
        texture = 0.12 * rng.standard_normal((view.shape[0], n)).astype(np.float32)
        view[:, mask] = 0.3 * view[:, mask] + 0.35 + shift + texture
    if not mask.any():  # tiny images: never return an empty defect
        mask[h // 2 - 1 : h // 2 + 2, w // 2 - 1 : w // 2 + 2] = True
        view[:, mask] = 0.95
    np.clip(img, 0.0, 1.0, out=img)
    return img, mask


def write_png(path, array: np.ndarray) -> None:
    """Write uint8/uint16 ``(H, W)`` or ``(H, W, 3)`` as PNG (16-bit RGB too, which PIL cannot write)."""
    arr = np.asarray(array)
    if arr.dtype not in (np.uint8, np.uint16) or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise input_error(path, f"write_png needs uint8/uint16 (H, W) or (H, W, 3), got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    depth = 8 if arr.dtype == np.uint8 else 16
    color = 0 if arr.ndim == 2 else 2
    data = arr.astype(">u2") if depth == 16 else arr
    rows = data.reshape(h, -1).view(np.uint8).reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def _encode(img: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    hwc = img if img.ndim == 2 else np.moveaxis(img, 0, -1)
    if sixteen_bit:
        return np.round(hwc * 65535.0).astype(np.uint16)
    return np.round(hwc * 255.0).astype(np.uint8)


def write_mvtec_dataset(
    root,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 10,
    size=64,
    channels: int = 3,
    seed: int = 0,
    sixteen_bit: bool = False,
) -> Path:
    """Write a synthetic MVTec AD category under ``root`` and return ``root`` as a Path.

    ``train/good/NNN.png`` (``n_train``), ``test/good/NNN.png`` (``n_test_good``) and
    ``n_test_defect`` defect images in total, split over ``test/scratch`` and ``test/blob``
    (scratch gets the extra one when odd), with masks ``ground_truth/<kind>/NNN_mask.png``
    (uint8, 255 = defect). Images are 8-bit PNG, or 16-bit with ``sixteen_bit``; gray for
    ``channels=1``, RGB for 3. Same arguments -> same bytes.
    """
    root = Path(root)
    for name, n in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_defect", n_test_defect)):
        if int(n) < 0:
            raise input_error(root, f"{name} must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, 2**31 - 1, size=(n_train + n_test_good + 2 * n_test_defect))
    it = iter(int(s) for s in seeds)

    def texture() -> np.ndarray:
        return make_texture(size, seed=next(it), channels=channels, pattern_seed=seed)

    (root / "train" / "good").mkdir(parents=True, exist_ok=True)
    (root / "test" / "good").mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        write_png(root / "train" / "good" / f"{i:03d}.png", _encode(texture(), sixteen_bit))
    for i in range(n_test_good):
        write_png(root / "test" / "good" / f"{i:03d}.png", _encode(texture(), sixteen_bit))
    counts = {"scratch": (n_test_defect + 1) // 2, "blob": n_test_defect // 2}
    for kind in DEFECT_KINDS:
        if counts[kind] == 0:
            continue
        (root / "test" / kind).mkdir(parents=True, exist_ok=True)
        (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(counts[kind]):
            img, mask = plant_defect(texture(), seed=next(it), kind=kind)
            write_png(root / "test" / kind / f"{i:03d}.png", _encode(img, sixteen_bit))
            write_png(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    return root
