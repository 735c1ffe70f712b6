"""Re-estimating the student's BatchNorm statistics whenever validation starts: :class:`BatchNormRecalibration`
(the computation is :func:`monai_multiad.engines.batchnorm.recalibrate_batchnorm`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from monai_multiad.engines.batchnorm import recalibrate_batchnorm

__all__ = ["BatchNormRecalibration"]


class BatchNormRecalibration:
    """Ignite handler: re-estimate the student's BatchNorm statistics on normal images when the
    engine it is attached to starts (the validation engine: every validation, hence every saved
    "best" checkpoint, sees the student that was trained).

    Args:
        network: the :class:`~monai_multiad.networks.MultiAD` whose ``student`` is recalibrated.
        loader: batches of dicts with ``"image"`` in [0, 1] (normal training images, fixed order).
        max_images: images used (0 turns the handler into a no-op).
        device: where the network is (default: its parameters' device).
    """

    def __init__(self, network: nn.Module, loader: Iterable, max_images: int = 256, device=None) -> None:
        self.network, self.loader, self.max_images, self.device = network, loader, int(max_images), device

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def _batches(self):
        device = self.device or next(self.network.parameters()).device
        for batch in self.loader:
            images = batch["image"] if isinstance(batch, dict) else batch[0]
            yield self.network.normalize(torch.as_tensor(images).to(device))

    def __call__(self, engine=None) -> int:
        return recalibrate_batchnorm(self.network.student, self._batches(), self.max_images)
