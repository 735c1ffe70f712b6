"""The 2D image dataset: samples loaded, resized to the network's size, and maps restored to the file's.

:class:`AnomalyImageDataset` reads the sample dicts of :mod:`monai_multiad.data.layouts`, each
through :class:`LoadAnomalyImaged` (decoding with :mod:`monai_multiad.data.decoding`, resizing);
:func:`restore_size` brings anomaly maps back to the original image size; :func:`check_masks`
refuses a mask paired with the wrong image before any work.

The readers and layouts are importable from here too (as they were when this module held them).
Every bad input raises :class:`~monai_multiad.errors.MultiADInputError` naming the file or folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.transforms import Transform
from torch.utils.data import Dataset

from monai_multiad.data import decoding, layouts
from monai_multiad.data.decoding import header_size, read_image, read_mask, to_channels
from monai_multiad.errors import input_error

__all__ = ["AnomalyImageDataset", "LoadAnomalyImaged", "resize_image", "restore_size", "check_mask_size", "check_masks",
           *decoding.__all__, *layouts.__all__]


def __getattr__(name: str):
    """The readers and layouts (and the helpers data.preprocess and calibration take), importable from here
    as when this module held them."""
    for module in (decoding, layouts):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_masks(samples: Sequence[dict]) -> None:
    """Check, from the files' headers (fast: nothing is decoded), that every sample's mask has its
    image's aspect ratio (:func:`check_mask_size`): a wrong pairing is reported before any work."""
    for s in samples:
        if s.get("mask"):
            mask_hw, image_hw = header_size(s["mask"]), header_size(s["image"])
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


def size_hw(size) -> tuple[int, int] | None:
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


class LoadAnomalyImaged(Transform):
    """A sample dict of :mod:`monai_multiad.data.layouts` -> the item a model is trained or tested on
    (what the industrial bundle's ``train.json`` shows as ``preprocessing``):

    * ``"image"``: float32 tensor ``(in_channels, H, W)`` in [0, 1], resized to ``image_size``
      (bilinear with anti-aliasing, see :func:`resize_image`); ``image_size=None`` keeps the size.
    * ``"mask"``: float32 tensor ``(1, H, W)`` of 0/1, nearest-resized with
      ``monai.transforms.Resize(mode="nearest")`` (zeros when no mask).
    * ``"label"``: int; ``"has_mask"``: bool (False for an anomalous image without a mask file).
    * ``"path"``, ``"name"``, ``"defect"``: str.
    * ``"original_size"``: int64 tensor ``[H, W]`` of the file (collates to ``(B, 2)``); give it
      to :func:`restore_size` to bring maps back to the original size.

    A mask of another size than its image is resized with it when it has the same aspect ratio
    (to within one mask pixel, see :func:`check_mask_size`); one of another aspect ratio, almost
    always a wrong pairing, raises MultiADInputError naming both files and both sizes.
    """

    def __init__(self, image_size=256, in_channels: int | None = 3) -> None:
        from monai.transforms import Resize

        if in_channels not in (None, 1, 3):
            raise input_error(None, f"in_channels must be 1 or 3, got {in_channels!r}")
        self.image_size = size_hw(image_size)
        self.in_channels = in_channels
        if self.image_size is not None:
            self._resize_mask = Resize(self.image_size, mode="nearest")

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

    def __call__(self, sample: dict) -> dict:
        image, mask, size = self._load(sample)
        label = int(sample["label"])
        return {
            "image": image,
            "mask": mask,
            "label": label,
            "has_mask": bool(sample.get("mask")) or label == 0,
            "path": str(sample["image"]),
            "name": str(sample.get("name", Path(sample["image"]).stem)),
            "defect": str(sample.get("defect", "good" if label == 0 else "anomaly")),
            "original_size": torch.tensor(size, dtype=torch.int64),
        }


class AnomalyImageDataset(Dataset):
    """Torch dataset over sample dicts (from :func:`samples_for` and friends), each loaded by
    ``loader`` (default :class:`LoadAnomalyImaged` of ``image_size`` and ``in_channels``; its
    docstring lists the item's keys).

    ``cache=True`` keeps the loaded items in memory (per process: each DataLoader worker has its
    own cache), as MONAI's ``CacheDataset`` keeps the deterministic transforms' output.
    ``transform`` (optional) is applied to the item dict last, on every read.
    """

    def __init__(
        self,
        samples: Sequence[dict],
        image_size=256,
        in_channels: int | None = 3,
        cache: bool = False,
        transform=None,
        loader=None,
    ):
        self.loader = loader if loader is not None else LoadAnomalyImaged(image_size, in_channels)
        self.samples = list(samples)
        self.cache = bool(cache)
        self.transform = transform
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        if not self.cache:
            item = self.loader(self.samples[index])
        else:
            if index not in self._cache:
                self._cache[index] = self.loader(self.samples[index])
            item = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self._cache[index].items()}
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
