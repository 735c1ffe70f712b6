"""The segmentation head's trainer: a MONAI ``Trainer`` (an Ignite engine) that corrupts normal images
with synthetic anomalies and teaches the head to draw their masks from the frozen teacher's and
student's features."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.engines import Trainer

from monai_multiad.engines.trainer import prepare_image_batch
from monai_multiad.losses import SegmentationLoss
from monai_multiad.networks import MultiAD
from monai_multiad.transforms.anomaly import SyntheticAnomaly, corrupt_batch

__all__ = ["SegmentationHeadTrainer"]


class SegmentationHeadTrainer(Trainer):
    """Train ``network.segmentation_head`` for ``steps`` iterations; the teacher and student stay frozen
    (eval mode, no gradients).

    Per batch: a ``fraction`` of the images gets a synthetic anomaly (``anomaly``; inside the image
    where it is brighter than ``anomaly_foreground`` when given), both networks' features of the
    batch go to the head, and :class:`~monai_multiad.losses.SegmentationLoss` compares its logits with
    the share of each head position that the masks cover. The engine's output per iteration is
    ``{"segmentation": loss}``.
    """

    def __init__(self, device: torch.device | str, steps: int, train_data_loader, network: MultiAD,
                 optimizer: torch.optim.Optimizer, anomaly: SyntheticAnomaly, fraction: float = 0.5,
                 anomaly_foreground: float | None = None, train_handlers=None) -> None:
        if network.segmentation_head is None:
            raise ValueError("the network has no segmentation head to train")
        super().__init__(device=torch.device(device), max_epochs=1, data_loader=train_data_loader,
                         epoch_length=int(steps), prepare_batch=prepare_image_batch, handlers=train_handlers,
                         decollate=False)
        self.network, self.optimizer = network.to(device), optimizer
        self.anomaly, self.fraction, self.anomaly_foreground = anomaly, float(fraction), anomaly_foreground
        self.loss_function = SegmentationLoss()

    def _iteration(self, engine: SegmentationHeadTrainer, batchdata: Any) -> dict[str, float]:
        images, _ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        corrupted, masks = corrupt_batch(images, engine.anomaly, engine.fraction, engine.anomaly_foreground)
        net = engine.network
        net.eval()
        head = net.segmentation_head.train()
        with torch.no_grad():
            teacher, student = net.features(corrupted)
        logits = head(teacher, student)
        loss = engine.loss_function(logits, F.adaptive_avg_pool2d(masks, logits.shape[-2:]))
        engine.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        engine.optimizer.step()
        head.eval()
        return {"segmentation": float(loss.detach())}
