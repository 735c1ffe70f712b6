"""Reading 2D image files: PNG, JPEG, TIFF and BMP, gray or colour, 8 or 16 bit (or float TIFF).

:func:`read_image_array` decodes a file to ``(H, W, C)`` in its own dtype (alpha dropped, palette
images made RGB, planar and min-is-white TIFFs put right); :func:`read_image` scales that to float32
``(C, H, W)`` in [0, 1]; :func:`read_mask` reads a mask as bool ``(H, W)``. TIFFs are read with
``tifffile`` (falling back to PIL), everything else with PIL; a truncated file is an error, never a
partial image. Every unreadable file raises :class:`~monai_multiad.errors.MultiADInputError` naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from monai_multiad.errors import MultiADInputError, input_error

__all__ = ["IMAGE_EXTENSIONS", "read_image", "read_image_array", "unit_image", "read_mask", "to_channels"]

#: Image file extensions recognised (compared case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_TIFF_EXTENSIONS = (".tif", ".tiff")
#: ITU-R 601-2 luma weights (the ones ``PIL.Image.convert("L")`` uses).
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise input_error(path, "image file not found")
    if not path.is_file():
        raise input_error(path, "cannot read image: not a file")


def _channels_last(arr: np.ndarray, path: Path) -> np.ndarray:
    """Bring a decoded array to (H, W) or (H, W, C) with C in 1..4 (alpha still present)."""
    arr = np.squeeze(arr) if arr.ndim > 3 else arr
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3:
        if arr.shape[-1] <= 4:
            return arr
        if arr.shape[0] <= 4:  # channel-first (planar TIFF)
            return np.moveaxis(arr, 0, -1)
    raise input_error(path, f"cannot read image: expected a 2D gray or colour image, found an array of shape {tuple(arr.shape)}")


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        page = tif.pages[0]
        arr = page.asarray()
        axes = page.axes
        photometric = int(page.photometric)
        colormap = page.colormap if photometric == int(tifffile.PHOTOMETRIC.PALETTE) else None
    if "S" in axes and arr.ndim == 3:
        arr = np.moveaxis(arr, axes.index("S"), -1)
    if colormap is not None:  # palette -> RGB with the colormap's dtype (uint16 in TIFF)
        cmap = np.asarray(colormap)
        arr = np.moveaxis(cmap[:, arr], 0, -1)
        if arr.dtype == np.uint16 and cmap.max() <= 255:
            arr = arr.astype(np.uint8)
    elif photometric == int(tifffile.PHOTOMETRIC.MINISWHITE) and np.issubdtype(arr.dtype, np.integer):
        arr = np.iinfo(arr.dtype).max - arr
    elif photometric not in (
        int(tifffile.PHOTOMETRIC.MINISBLACK),
        int(tifffile.PHOTOMETRIC.RGB),
    ):
        raise ValueError(f"unsupported TIFF photometric {photometric}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return arr


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, ImageFile

    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not load partially
    try:
        with Image.open(str(path)) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "PA"):
                im = im.convert("RGBA" if ("transparency" in im.info or mode == "PA") else "RGB")
            elif mode == "1":
                im = im.convert("L")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            elif mode == "La":
                im = im.convert("LA")
            elif mode == "RGBa":
                im = im.convert("RGBA")
            arr = np.array(im)
            if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
                arr = arr.astype(np.uint16)  # 16-bit PNG opened as 32-bit "I"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    return arr


def _read_raw(path) -> np.ndarray:
    """Decode a file to (H, W) or (H, W, C) in its own dtype; alpha is still there."""
    path = Path(path)
    _check_file(path)
    arr = None
    errors = []
    if path.suffix.lower() in _TIFF_EXTENSIONS:
        try:
            arr = _read_tiff(path)
        except Exception as exc:  # compressed without imagecodecs, odd photometric: try PIL
            errors.append(f"{type(exc).__name__}: {exc}")
    if arr is None:
        try:
            arr = _read_pil(path)
        except MultiADInputError:
            raise
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            reason = "; ".join(dict.fromkeys(e.strip().replace("\n", " ") for e in errors))
            raise input_error(path, f"cannot read image: {reason}") from exc
    if arr.size == 0:
        raise input_error(path, "cannot read image: the image is empty (0 pixels)")
    return _channels_last(arr, path)


def _drop_alpha(arr: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (H, W, 1 or 3): gray+alpha -> gray, RGBA -> RGB."""
    if arr.ndim == 2:
        return arr[..., None]
    c = arr.shape[-1]
    if c == 2:
        return arr[..., :1]
    if c == 4:
        return arr[..., :3]
    return arr


def to_unit_float(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        out = arr.astype(np.float32) / float(info.max)
        return np.clip(out, 0.0, 1.0) if info.min < 0 else out
    return np.clip(np.nan_to_num(arr.astype(np.float32), nan=0.0), 0.0, 1.0)  # floats: as given


def to_channels(image: np.ndarray, in_channels: int | None) -> np.ndarray:
    """(C, H, W) with C in {1, 3} -> ``in_channels`` channels.

    Gray -> RGB repeats the channel; RGB -> gray is ITU-R 601-2 luminance. ``None`` keeps C.
    Works on numpy arrays and torch tensors.
    """
    if in_channels is None:
        return image
    if in_channels not in (1, 3):
        raise input_error(None, f"in_channels must be 1 or 3, got {in_channels!r}")
    c = image.shape[0]
    if c == in_channels:
        return image
    if c == 1 and in_channels == 3:
        return image.repeat(3, 0) if isinstance(image, np.ndarray) else image.repeat(3, 1, 1)
    if c == 3 and in_channels == 1:
        if isinstance(image, np.ndarray):
            return np.tensordot(LUMA, image, axes=1)[None].astype(image.dtype, copy=False)
        w = torch.as_tensor(LUMA, dtype=image.dtype, device=image.device)
        return torch.tensordot(w, image, dims=1)[None]
    raise input_error(None, f"cannot convert an image with {c} channels to {in_channels} channels")


def read_image_array(path) -> np.ndarray:
    """Read PNG/JPEG/TIFF/BMP to ``(H, W, C)`` in the file's own dtype (uint8, uint16, float...),
    C 1 (gray) or 3 (RGB): alpha dropped, palette images made RGB. What :func:`read_image` scales;
    :class:`~monai_multiad.data.preprocess.DevicePreprocessor` sends it as it is to the device.

    Raises MultiADInputError as :func:`read_image` does.
    """
    arr = _drop_alpha(_read_raw(path))
    if arr.shape[-1] not in (1, 3):
        raise input_error(path, f"cannot read image: expected 1 (gray) or 3 (RGB) channels, found {arr.shape[-1]}")
    return arr


def unit_image(arr: np.ndarray, channels: int | None = None) -> np.ndarray:
    """``(H, W, C)`` array of any dtype (:func:`read_image_array`) -> float32 ``(C, H, W)`` in [0, 1],
    with ``channels`` as in :func:`read_image`."""
    img = np.ascontiguousarray(np.moveaxis(to_unit_float(arr), -1, 0))
    return to_channels(img, channels)


def read_image(path, channels: int | None = None) -> np.ndarray:
    """Read PNG/JPEG/TIFF/BMP to float32 ``(C, H, W)`` in [0, 1].

    Integer images are divided by their dtype's maximum (uint8 / 255, uint16 / 65535); float
    TIFFs are clipped to [0, 1]. RGBA and gray+alpha lose the alpha; palette images become RGB.
    ``channels`` (1 or 3) converts gray <-> RGB (see :func:`to_channels`); ``None`` keeps the
    file's own (1 for gray, 3 for colour).

    Raises MultiADInputError ``"<path>: cannot read image: <reason>"`` for a missing,
    unreadable or truncated file.
    """
    return unit_image(read_image_array(path), channels)


def read_mask(path) -> np.ndarray:
    """Read a mask to bool ``(H, W)``: any nonzero value (in any colour channel) is anomalous.

    An alpha channel is ignored. Raises MultiADInputError naming the path when unreadable.
    """
    arr = _drop_alpha(_read_raw(path))
    return np.ascontiguousarray(np.any(arr != 0, axis=-1))


def header_size(path) -> tuple[int, int] | None:
    """(H, W) from the file's header without decoding it, or None when the header is not readable."""
    from PIL import Image

    try:
        with Image.open(str(path)) as im:
            w, h = im.size
        return int(h), int(w)
    except Exception:  # noqa: BLE001 - the full read reports what is wrong with the file
        return None
