"""The frozen teacher's features of the training images, computed once and reused in later epochs:
:class:`TeacherFeatureCache`.

The teacher never trains and, without random flips, sees each training image unchanged in every
epoch (a denoising student's anomalies go to the student's input only), so its features of an image
are the same each time. The trainer fills the cache once when a run starts, in the data set's order,
and a training step then runs the student alone: on a CPU the teacher's forward pass is about a fifth
of a step at 256 px. Filled in a fixed order, the cache holds the same numbers in a run and in its
resumption, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["TeacherFeatureCache"]


class TeacherFeatureCache:
    """Teacher stage features per training image, keyed by the image's path (or slice name), held up to
    ``max_bytes``; images beyond that are computed every time.

    Args:
        max_bytes: memory the cached features may take (on the device they were computed on).

    :meth:`features` gives a batch's features, computing (in one teacher pass) only those of the images
    not held yet. ``hits`` and ``misses`` count images.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = self.misses = 0
        self._store: dict[str, list[torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._store)

    def features(self, keys: Sequence[str], images: torch.Tensor,
                 compute: Callable[[torch.Tensor], list[torch.Tensor]]) -> list[torch.Tensor]:
        """The stage features ``[(B, C_k, h_k, w_k)]`` of ``images`` (B, ...) named ``keys``: the held ones,
        and ``compute(images[missing])`` for the others, which are then held while the budget allows."""
        keys = [str(k) for k in keys]
        if len(keys) != images.shape[0]:
            raise ValueError(f"{len(keys)} keys for a batch of {images.shape[0]} images")
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if not missing:
            return [torch.stack(stage) for stage in zip(*(self._store[k] for k in keys))]
        computed = compute(images if len(missing) == len(keys) else images[missing])
        for j, i in enumerate(missing):
            item = [f[j].detach().clone() for f in computed]  # its own memory, not a view of the batch
            size = sum(t.numel() * t.element_size() for t in item)
            if keys[i] not in self._store and self.nbytes + size <= self.max_bytes:
                self._store[keys[i]] = item
                self.nbytes += size
        if len(missing) == len(keys):
            return computed
        row = {i: j for j, i in enumerate(missing)}
        return [torch.stack([computed[s][row[i]] if i in row else self._store[k][s] for i, k in enumerate(keys)])
                for s in range(len(computed))]
