"""2D image datasets: reading images and masks, dataset layouts and a resizing torch Dataset.

Layouts (see ``MULTIAD_SPEC.md``):

* MVTec AD: ``<root>/train/good``, ``<root>/test/{good,<defect>}``,
  ``<root>/ground_truth/<defect>/<stem>_mask.png``  -> :func:`mvtec_samples`
* a pair of plain folders (normal, abnormal, optional masks)  -> :func:`folder_samples`
* the plain-folder layout (anomalib's ``Folder``): ``<root>/good``, ``<root>/<defect>``, optional
  ``<root>/normal_test`` and ``<root>/mask/<defect>``  -> :func:`folder_layout_samples`
* BMAD slices: ``<root>/train/good[/img]``, ``<root>/{valid,test}/{good,Ungood}/img``,
  masks in ``<root>/{valid,test}/Ungood/label`` with the image's file name  -> :func:`bmad_samples`

Every layout function returns a list of sample dicts
``{"image": str, "mask": str | None, "label": 0 | 1, "defect": str, "name": str}``
(``defect`` is ``"good"`` for normal samples; ``name`` is ``"<defect>_<file stem>"``, unique
within a split and safe to use as a file name). :class:`AnomalyImageDataset` loads them.

Every bad input raises :class:`~monai_multiad.errors.MultiADInputError` naming the file or folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from monai_multiad.errors import MultiADInputError, input_error

__all__ = [
    "IMAGE_EXTENSIONS",
    "read_image",
    "read_image_array",
    "unit_image",
    "read_mask",
    "resize_image",
    "to_channels",
    "list_images",
    "mvtec_samples",
    "folder_samples",
    "folder_layout_samples",
    "bmad_samples",
    "LAYOUTS",
    "detect_layout",
    "samples_for",
    "split_normals",
    "check_mask_size",
    "check_masks",
    "AnomalyImageDataset",
    "restore_size",
]

#: Image file extensions recognised (compared case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_TIFF_EXTENSIONS = (".tif", ".tiff")
#: ITU-R 601-2 luma weights (the ones ``PIL.Image.convert("L")`` uses).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# ----------------------------------------------------------------------------- reading files


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


def _to_unit_float(arr: np.ndarray) -> np.ndarray:
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
            return np.tensordot(_LUMA, image, axes=1)[None].astype(image.dtype, copy=False)
        w = torch.as_tensor(_LUMA, dtype=image.dtype, device=image.device)
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
    img = np.ascontiguousarray(np.moveaxis(_to_unit_float(arr), -1, 0))
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


# ----------------------------------------------------------------------------- layouts


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".")


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(p) and p.is_file()


def _require_dir(folder: Path, what: str = "folder") -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise input_error(folder, f"{what} not found")
    if not folder.is_dir():
        raise input_error(folder, f"{what} is not a folder")
    return folder


def list_images(folder, required: bool = True) -> list[Path]:
    """Image files in ``folder`` (not recursive), by extension (case-insensitive), sorted by name.

    Hidden files are skipped. With ``required`` a missing folder or one without images raises
    MultiADInputError naming it; otherwise an empty list is returned.
    """
    folder = Path(folder)
    if not folder.is_dir():
        if required:
            _require_dir(folder)
        return []
    files = sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)
    if not files and required:
        raise input_error(folder, f"no image files ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) in this folder")
    return files


def _subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p)), key=lambda p: p.name)


def _mask_index(mask_dir: Path | None) -> dict[str, Path]:
    """stem -> mask file; ``<stem>_mask.*`` wins over ``<stem>.*``."""
    if mask_dir is None or not Path(mask_dir).is_dir():
        return {}
    index: dict[str, Path] = {}
    files = list_images(mask_dir, required=False)
    for p in files:  # plain stems first, then *_mask overrides
        index.setdefault(p.stem, p)
    for p in files:
        if p.stem.endswith("_mask"):
            index[p.stem[: -len("_mask")]] = p
    return index


def _sample(image: Path, mask: Path | None, label: int, defect: str) -> dict:
    return {
        "image": str(image),
        "mask": str(mask) if mask is not None else None,
        "label": int(label),
        "defect": defect,
        "name": f"{defect}_{image.stem}",
    }


def _check_split(split: str, allowed: Sequence[str], root) -> str:
    if split not in allowed:
        raise input_error(root, f"unknown split {split!r}; expected one of {', '.join(allowed)}")
    return split


def mvtec_samples(root, split: str = "train") -> list[dict]:
    """Samples of an MVTec AD category folder.

    ``split="train"``: ``train/good`` (label 0). ``split="test"``: ``test/good`` (label 0) and
    every ``test/<defect>`` (label 1) with masks from ``ground_truth/<defect>/<stem>_mask.png``
    (also ``<stem>.<ext>``); a defect image without a mask gets ``mask=None``. Mask sizes are
    checked when loaded (:class:`AnomalyImageDataset`).
    """
    root = _require_dir(Path(root), "dataset folder")
    _check_split(split, ("train", "test"), root)
    if split == "train":
        return [_sample(p, None, 0, "good") for p in list_images(root / "train" / "good")]
    test = _require_dir(root / "test", "test folder")
    classes = _subdirs(test)
    if not classes:
        raise input_error(test, "no class folders (good, <defect>...) in this folder")
    samples = []
    for cls in classes:
        files = list_images(cls)
        if cls.name == "good":
            samples += [_sample(p, None, 0, "good") for p in files]
        else:
            masks = _mask_index(root / "ground_truth" / cls.name)
            samples += [_sample(p, masks.get(p.stem), 1, cls.name) for p in files]
    return samples


def folder_samples(normal_dir, abnormal_dir=None, mask_dir=None, split: str = "test") -> list[dict]:
    """Samples from plain folders.

    ``split="train"``: the images of ``normal_dir`` (label 0). ``"valid"``/``"test"``: those
    plus the images of ``abnormal_dir`` (label 1, defect = that folder's name), whose masks are
    matched by stem in ``mask_dir`` (``<stem>.<ext>`` or ``<stem>_mask.<ext>``; none -> ``None``).
    """
    normal_dir = Path(normal_dir)
    _check_split(split, ("train", "valid", "test"), normal_dir)
    samples = [_sample(p, None, 0, "good") for p in list_images(normal_dir)]
    if split == "train" or abnormal_dir is None:
        return samples
    abnormal_dir = Path(abnormal_dir)
    files = list_images(abnormal_dir)
    if mask_dir is not None:
        _require_dir(Path(mask_dir), "mask folder")
    masks = _mask_index(mask_dir)
    defect = abnormal_dir.name or "anomaly"
    if defect == "good":
        defect = "anomaly"
    return samples + [_sample(p, masks.get(p.stem), 1, defect) for p in files]


def _child(folder: Path, name: str) -> Path:
    """``folder/name``, matching ``name`` case-insensitively when the exact one is absent."""
    exact = folder / name
    if exact.is_dir() or not folder.is_dir():
        return exact
    for p in folder.iterdir():
        if p.is_dir() and p.name.lower() == name.lower():
            return p
    return exact


def _img_dir(folder: Path) -> Path:
    """``folder/img`` if it exists, else ``folder`` itself (BMAD's optional ``img`` level)."""
    img = _child(folder, "img")
    return img if img.is_dir() else folder


def bmad_samples(root, split: str = "train") -> list[dict]:
    """Samples of a BMAD slice dataset.

    ``train``: ``train/good[/img]`` (label 0). ``valid``/``test``: ``<split>/good/img`` (label 0)
    and ``<split>/Ungood/img`` (label 1), masks in ``<split>/Ungood/label`` with the same file
    name (or the same stem with another image extension).
    """
    root = _require_dir(Path(root), "dataset folder")
    _check_split(split, ("train", "valid", "test"), root)
    if split == "train":
        good = _require_dir(_child(root / "train", "good"), "train/good folder")
        return [_sample(p, None, 0, "good") for p in list_images(_img_dir(good))]
    base = _require_dir(root / split, f"{split} folder")
    good, ungood = _child(base, "good"), _child(base, "Ungood")
    if not good.is_dir() and not ungood.is_dir():
        raise input_error(base, "expected the class folders good/img and Ungood/img in this folder")
    samples = []
    if good.is_dir():
        samples += [_sample(p, None, 0, "good") for p in list_images(_img_dir(good))]
    if ungood.is_dir():
        label_dir = _child(ungood, "label")
        by_name = {p.name: p for p in list_images(label_dir, required=False)}
        by_stem = _mask_index(label_dir)
        for p in list_images(_img_dir(ungood)):
            samples.append(_sample(p, by_name.get(p.name, by_stem.get(p.stem)), 1, ungood.name))
    return samples


#: reserved sub-folder names of the plain-folder layout (everything else is a class of anomaly)
FOLDER_NORMAL, FOLDER_NORMAL_TEST, FOLDER_MASKS = "good", "normal_test", ("mask", "masks")
#: every ``FOLDER_TEST_EVERY``-th image of ``good/`` (by name) is a test image when there is no ``normal_test/``
FOLDER_TEST_EVERY = 5


def folder_layout_samples(root, split: str = "train") -> list[dict]:
    """Samples of a plain-folder dataset, the layout of anomalib's ``Folder``::

        <root>/good/                  normal images
        <root>/<defect>/              anomalous images, one folder per kind (any other name)
        <root>/normal_test/           optional: normal test images
        <root>/mask/<defect>/         optional: masks, <stem>.<ext> or <stem>_mask.<ext>

    ``split="train"``: the images of ``good/``, except, when there is no ``normal_test/``, every
    fifth one by name (the 5th, 10th, ...), which is kept for testing. ``"test"``: those held-out
    (or ``normal_test/``'s) normal images (label 0) and every ``<defect>/`` image (label 1) with its
    mask when ``mask/<defect>/`` has one (else ``mask=None``: image-level metrics only).
    """
    root = _require_dir(Path(root), "dataset folder")
    _check_split(split, ("train", "test"), root)
    good = list_images(_require_dir(root / FOLDER_NORMAL, f"{FOLDER_NORMAL}/ folder of normal images"))
    normal_test = root / FOLDER_NORMAL_TEST
    if normal_test.is_dir():
        train, test_normal = good, list_images(normal_test)
    else:
        held = {i for i in range(len(good)) if i % FOLDER_TEST_EVERY == FOLDER_TEST_EVERY - 1}
        train = [p for i, p in enumerate(good) if i not in held]
        test_normal = [p for i, p in enumerate(good) if i in held]
    if split == "train":
        return [_sample(p, None, 0, "good") for p in train]
    samples = [_sample(p, None, 0, "good") for p in test_normal]
    reserved = {FOLDER_NORMAL, FOLDER_NORMAL_TEST, *FOLDER_MASKS}
    mask_root = next((root / m for m in FOLDER_MASKS if (root / m).is_dir()), None)
    for cls in _subdirs(root):
        if cls.name.lower() in reserved:
            continue
        files = list_images(cls, required=False)
        masks = _mask_index(mask_root / cls.name) if mask_root is not None else {}
        samples += [_sample(p, masks.get(p.stem), 1, cls.name) for p in files]
    return samples


_EXPECTED = (
    "expected MVTec AD (train/good, test/good, test/<defect>, ground_truth/<defect>/<name>_mask.png), "
    "BMAD (train/good[/img], {valid,test}/{good,Ungood}/img, {valid,test}/Ungood/label) "
    "or plain folders (good/, <defect>/, optional normal_test/ and mask/<defect>/)"
)

#: the 2D image layouts :func:`samples_for` reads
LAYOUTS = ("mvtec", "bmad", "folder")


def detect_layout(root) -> str:
    """``"mvtec"``, ``"bmad"`` or ``"folder"`` from the folder structure; MultiADInputError when none."""
    root = _require_dir(Path(root), "dataset folder")
    for split in ("valid", "test"):
        if _child(root / split, "Ungood").is_dir() or _child(_child(root / split, "good"), "img").is_dir():
            return "bmad"
    if _child(_child(root / "train", "good"), "img").is_dir():
        return "bmad"
    if (root / "train" / "good").is_dir() and ((root / "test").is_dir() or (root / "ground_truth").is_dir()):
        return "mvtec"
    if (root / FOLDER_NORMAL).is_dir() and not (root / "train").is_dir():
        return "folder"
    found = [p.name + "/" for p in _subdirs(root)]
    found_txt = ", ".join(found[:12]) + (" ..." if len(found) > 12 else "") if found else "no subfolders"
    raise input_error(root, f"unknown dataset layout: {_EXPECTED}; found {found_txt}")


def samples_for(root, split: str = "train", layout: str = "auto") -> list[dict]:
    """Samples of ``root`` for ``split`` in ``layout`` (one of :data:`LAYOUTS`; ``"auto"``: the
    one :func:`detect_layout` finds). The layout given is the one read: a folder that does not
    follow it is an error naming what is missing.

    MVTec AD and the plain-folder layout have no ``valid`` split: use :func:`split_normals` on
    the train samples instead.
    """
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise input_error(root, f"unknown image layout {layout!r}; expected auto or one of {', '.join(LAYOUTS)}")
    if layout == "bmad":
        return bmad_samples(root, split)
    if split == "valid":
        raise input_error(root, f"a {layout} dataset has no 'valid' split; hold out normal train images with "
                                "split_normals")
    return mvtec_samples(root, split) if layout == "mvtec" else folder_layout_samples(root, split)


def split_normals(samples: Sequence[dict], fraction: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic hold-out of normal samples: ``(train, val)``.

    ``round(fraction * n_normal)`` normal samples (at least 1 when ``fraction > 0`` and there
    are at least 2) go to ``val``, chosen by ``seed``; everything else stays in ``train``. Both
    keep the input order.
    """
    if not 0.0 <= float(fraction) < 1.0:
        raise input_error(None, f"fraction must be in [0, 1), got {fraction!r}")
    normal = [i for i, s in enumerate(samples) if int(s["label"]) == 0]
    n_val = int(round(fraction * len(normal)))
    if fraction > 0 and len(normal) >= 2:
        n_val = min(max(n_val, 1), len(normal) - 1)
    else:
        n_val = 0
    rng = np.random.default_rng(seed)
    val_idx = {normal[i] for i in rng.permutation(len(normal))[:n_val]}
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val


# ----------------------------------------------------------------------------- dataset


def _header_size(path) -> tuple[int, int] | None:
    """(H, W) from the file's header without decoding it, or None when the header is not readable."""
    from PIL import Image

    try:
        with Image.open(str(path)) as im:
            w, h = im.size
        return int(h), int(w)
    except Exception:  # noqa: BLE001 - the full read reports what is wrong with the file
        return None


def check_masks(samples: Sequence[dict]) -> None:
    """Check, from the files' headers (fast: nothing is decoded), that every sample's mask has its
    image's aspect ratio (:func:`check_mask_size`): a wrong pairing is reported before any work."""
    for s in samples:
        if s.get("mask"):
            mask_hw, image_hw = _header_size(s["mask"]), _header_size(s["image"])
            if mask_hw is not None and image_hw is not None:
                check_mask_size(mask_hw, image_hw, s["mask"], s["image"])


def check_mask_size(mask_hw: Sequence[int], image_hw: Sequence[int], mask_path, image_path) -> None:
    """Refuse a mask whose aspect ratio differs from its image's: MultiADInputError naming both
    files and both sizes. Sizes that differ at the same aspect ratio pass (the mask is then
    resized with its image); the ratios may differ by the rounding of one mask pixel."""
    (mh, mw), (h, w) = (int(v) for v in mask_hw[-2:]), (int(v) for v in image_hw[-2:])
    if (mh, mw) == (h, w):
        return
    sy, sx = h / mh, w / mw  # image pixels per mask pixel, down and across
    if abs(sy - sx) <= max(sy, sx) / min(mh, mw):
        return
    raise input_error(mask_path, f"mask is {mh}x{mw} (HxW) but its image {image_path} is {h}x{w}: another aspect "
                                 "ratio, so probably not this image's mask")




def _hw(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise input_error(None, f"image_size must be a positive int or (H, W), got {size!r}")
    return size


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) -> (C, *size), bilinear with anti-aliasing when shrinking.

    torch's ``antialias=True`` (a PIL-style triangle filter whose support grows with the
    scale) instead of ``monai.transforms.Resize(anti_aliasing=True)``: MONAI's Gaussian
    pre-smoothing is a separable conv2d that takes ~120 ms per 400 px RGB image on 2 CPU
    cores, against ~10 ms here.
    """
    return torch.nn.functional.interpolate(
        image[None], size=size, mode="bilinear", align_corners=False, antialias=True
    )[0]


class AnomalyImageDataset(Dataset):
    """Torch dataset over sample dicts (from :func:`samples_for` and friends).

    Each item is a dict:

    * ``"image"``: float32 tensor ``(in_channels, H, W)`` in [0, 1], resized to ``image_size``
      (bilinear with anti-aliasing, see :func:`resize_image`); ``image_size=None`` keeps the size.
    * ``"mask"``: float32 tensor ``(1, H, W)`` of 0/1, nearest-resized with
      ``monai.transforms.Resize(mode="nearest")`` (zeros when no mask).
    * ``"label"``: int; ``"has_mask"``: bool (False for an anomalous image without a mask file).
    * ``"path"``, ``"name"``, ``"defect"``: str.
    * ``"original_size"``: int64 tensor ``[H, W]`` of the file (collates to ``(B, 2)``); give it
      to :func:`restore_size` to bring maps back to the original size.

    ``cache=True`` keeps the decoded, resized tensors in memory (per process: each DataLoader
    worker has its own cache). ``transform`` (optional) is applied to the item dict last.
    A mask of another size than its image is resized with it when it has the same aspect ratio
    (to within one mask pixel, see :func:`check_mask_size`); one of another aspect ratio, almost
    always a wrong pairing, raises MultiADInputError naming both files and both sizes.
    """

    def __init__(
        self,
        samples: Sequence[dict],
        image_size=256,
        in_channels: int | None = 3,
        cache: bool = False,
        transform=None,
    ):
        from monai.transforms import Resize

        if in_channels not in (None, 1, 3):
            raise input_error(None, f"in_channels must be 1 or 3, got {in_channels!r}")
        self.samples = list(samples)
        self.image_size = _hw(image_size)
        self.in_channels = in_channels
        self.cache = bool(cache)
        self.transform = transform
        self._cache: dict[int, tuple] = {}
        if self.image_size is not None:
            self._resize_mask = Resize(self.image_size, mode="nearest")

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        from monai.transforms import Resize
        from monai.utils import convert_to_tensor

        image = read_image(sample["image"])
        h, w = image.shape[-2:]
        if self.in_channels == 1:  # RGB -> gray before resizing, gray -> RGB after (less work)
            image = to_channels(image, 1)
        out_hw = self.image_size if self.image_size is not None else (h, w)
        mask_path = sample.get("mask")
        if mask_path:
            mask = read_mask(mask_path)
            check_mask_size(mask.shape, (h, w), mask_path, sample["image"])
            mask = mask[None].astype(np.float32)
            if mask.shape[1:] != out_hw:  # a same-aspect mask of another size is resized like its image
                mask = Resize(out_hw, mode="nearest")(mask) if self.image_size is None else self._resize_mask(mask)
            mask = (convert_to_tensor(mask, dtype=torch.float32, track_meta=False) > 0.5).float().contiguous()
        else:
            mask = torch.zeros((1, *out_hw), dtype=torch.float32)
        image = torch.from_numpy(image)
        if out_hw != (h, w):
            image = resize_image(image, out_hw).clamp_(0.0, 1.0)
        image = to_channels(image, self.in_channels).contiguous()
        return image, mask, (int(h), int(w))

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        if self.cache and index in self._cache:
            image, mask, size = self._cache[index]
        else:
            image, mask, size = self._load(sample)
            if self.cache:
                self._cache[index] = (image, mask, size)
        item = {
            "image": image.clone() if self.cache else image,
            "mask": mask.clone() if self.cache else mask,
            "label": int(sample["label"]),
            "has_mask": bool(sample.get("mask")) or int(sample["label"]) == 0,
            "path": str(sample["image"]),
            "name": str(sample.get("name", Path(sample["image"]).stem)),
            "defect": str(sample.get("defect", "good" if int(sample["label"]) == 0 else "anomaly")),
            "original_size": torch.tensor(size, dtype=torch.int64),
        }
        return self.transform(item) if self.transform is not None else item


def _parse_sizes(original_size) -> list[tuple[int, int]]:
    if isinstance(original_size, torch.Tensor):
        t = original_size.detach().cpu().long()
        if t.ndim == 1 and t.numel() == 2:
            return [(int(t[0]), int(t[1]))]
        if t.ndim == 2 and t.shape[1] == 2:
            return [(int(a), int(b)) for a, b in t.tolist()]
    elif isinstance(original_size, np.ndarray):
        return _parse_sizes(torch.as_tensor(original_size))
    elif isinstance(original_size, (list, tuple)) and len(original_size) == 2:
        a, b = original_size
        if isinstance(a, torch.Tensor) and a.ndim == 1:  # default_collate of (H, W) tuples
            return [(int(x), int(y)) for x, y in zip(a.tolist(), b.tolist())]
        return [(int(a), int(b))]
    raise input_error(None, f"original_size must be (H, W) or a (B, 2) tensor, got {original_size!r}")


def restore_size(maps, original_size):
    """Resize anomaly maps back to the original image size (bilinear, anti-aliased when shrinking).

    ``maps``: ``(1, S, S)`` or ``(B, 1, S, S)`` tensor (or numpy array: the result is numpy too).
    ``original_size``: ``(H, W)``, or per item a ``(B, 2)`` tensor (a batch's ``"original_size"``).
    One size -> a tensor of the input's rank at ``(H, W)``; per-item sizes that differ -> a list of
    ``(1, H_i, W_i)`` tensors.
    """
    as_numpy = isinstance(maps, np.ndarray)
    x = torch.as_tensor(maps)
    if x.ndim not in (3, 4):
        raise input_error(None, f"maps must be (1, S, S) or (B, 1, S, S), got shape {tuple(x.shape)}")
    batched = x.ndim == 4
    xb = x if batched else x[None]
    if not torch.is_floating_point(xb):
        xb = xb.float()
    sizes = _parse_sizes(original_size)

    def _resize(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        if tuple(t.shape[-2:]) == hw:
            return t
        return torch.nn.functional.interpolate(t, size=hw, mode="bilinear", align_corners=False, antialias=True)

    if len(sizes) == 1 or len(set(sizes)) == 1:
        if len(sizes) > 1 and len(sizes) != xb.shape[0]:
            raise input_error(None, f"{len(sizes)} sizes for {xb.shape[0]} maps")
        out = _resize(xb, sizes[0])
        out = out if batched else out[0]
        return out.numpy() if as_numpy else out
    if len(sizes) != xb.shape[0]:
        raise input_error(None, f"{len(sizes)} sizes for {xb.shape[0]} maps")
    outs = [_resize(xb[i : i + 1], hw)[0] for i, hw in enumerate(sizes)]
    return [o.numpy() for o in outs] if as_numpy else outs
