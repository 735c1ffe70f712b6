"""A MONAI ``Inferer`` for 2D images (:class:`ImageAnomalyInferer`): each image's map with its score in the
map's ``meta``, and :func:`restore_map`, the map back at its image's own size."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ImageAnomalyInferer", "restore_map"]


class ImageAnomalyInferer:
    """A MONAI ``Inferer`` for 2D images: ``inferer(images (B, C, H, W), network)`` runs the network
    (``network(x) -> (maps, scores)``) and returns the maps ``(B, 1, H, W)`` as a ``MetaTensor`` whose
    per-image ``meta`` is the image's with ``"score"`` added (``decollate_batch`` hands each image its own);
    :func:`restore_map` then brings each map back to its image's ``original_size``."""

    def __init__(self, amp: bool = False) -> None:
        self.amp = bool(amp)

    def __call__(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any):
        from monai.data import MetaTensor
        from monai.data.utils import collate_meta_tensor, decollate_batch

        device = inputs.device
        with torch.no_grad(), torch.autocast(device.type, enabled=self.amp and device.type == "cuda"):
            maps, scores = network(torch.as_tensor(inputs), *args, **kwargs)
        metas = [x.meta for x in decollate_batch(inputs)] if isinstance(inputs, MetaTensor) else [{}] * len(maps)
        out = []
        for amap, score, meta in zip(maps.float(), scores.float().tolist(), metas):
            out.append(MetaTensor(amap, meta={**dict(meta), "score": float(score)}))
        return collate_meta_tensor(out)


def restore_map(amap):
    """``postprocessing`` of a 2D map (``(1, S, S)`` ``MetaTensor``): resized back to its image's
    ``original_size`` (:func:`~monai_multiad.data.images.restore_size`, as ``predict`` does), meta kept."""
    from monai.data import MetaTensor

    from monai_multiad.data.images import restore_size

    size = amap.meta.get("original_size") if isinstance(amap, MetaTensor) else None
    if not size:
        return amap
    out = restore_size(torch.as_tensor(amap), tuple(int(v) for v in size))
    return MetaTensor(out, meta=dict(amap.meta))
