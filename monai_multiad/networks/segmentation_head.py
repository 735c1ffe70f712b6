"""A discriminator that draws a map: a small segmentation head on teacher and student features.

The paper's discriminator judges a whole image's stage-4 features, teacher against student, and it
wins at once. This one is local and supervised: trained on images with synthetic anomalies whose
masks are known (:mod:`monai_multiad.transforms.anomaly`), it reads, position by position, the
element-wise product of the L2-normalised teacher and student features of the first stages
(DeSTSeg, CVPR 2023: where the student fails to reproduce the teacher, the product drops) and
outputs the probability that the position is anomalous. Its map joins the fusion like a stage's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SegmentationHead"]


class SegmentationHead(nn.Module):
    """Anomaly logits ``(B, 1, h, w)`` on the first used stage's grid from teacher and student features.

    Args:
        channels: the teacher's channels of every stage (all four).
        stages: the stages (1-based) whose features it reads.
        width: channels of its hidden layers.
    """

    def __init__(self, channels: Sequence[int], stages: Sequence[int] = (1, 2, 3), width: int = 64) -> None:
        super().__init__()
        self.stages = tuple(int(k) for k in stages)
        dim = sum(int(channels[k - 1]) for k in self.stages)
        # a 1x1 reduction before the one 3x3 layer keeps it cheap at the first stage's grid (64 x 64 at
        # 256 px: about 0.4 GFLOP an image for Lite0's 176 channels)
        self.net = nn.Sequential(
            nn.Conv2d(dim, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, 1),
        )

    def inputs(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
        """The products of the L2-normalised features of the used stages, on the first one's grid."""
        first = teacher[self.stages[0] - 1]
        size = (first.shape[-2], first.shape[-1])
        parts = []
        for k in self.stages:
            p = F.normalize(teacher[k - 1].float(), dim=1) * F.normalize(student[k - 1].float(), dim=1)
            if p.shape[-2:] != first.shape[-2:]:
                p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
            parts.append(p)
        return torch.cat(parts, 1)

    def forward(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
        return self.net(self.inputs(teacher, student))
