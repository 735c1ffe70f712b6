"""Multi-AD losses: per-stage cosine distillation, the discriminator's BCE and the student's
adversarial term (paper, Sec. 3; the weights are options)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["normalized", "distillation_losses", "DistillationLoss", "DiscriminatorLoss", "AdversarialLoss",
           "SegmentationLoss"]


def normalized(features: torch.Tensor) -> torch.Tensor:
    """Channel-wise L2 normalisation (B, C, h, w), as the losses and the discriminator see features."""
    return F.normalize(features, dim=1, eps=1e-6)


def with_noise(features: torch.Tensor, std: float) -> torch.Tensor:
    """``features`` plus Gaussian noise of standard deviation ``std`` (unchanged when ``std`` is 0)."""
    return features + std * torch.randn_like(features) if std > 0 else features


def _hard_mean(distance: torch.Tensor, quantile: float) -> torch.Tensor:
    """Mean of the distances at or above their ``quantile`` (EfficientAD's hard-feature loss)."""
    flat = distance.flatten()
    if quantile <= 0 or flat.numel() < 2:
        return flat.mean()
    k = max(1, int(round((1.0 - quantile) * flat.numel())))
    return flat.topk(k).values.mean()


def distillation_losses(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], hard_mining: float = 0.0
) -> list[torch.Tensor]:
    """Per-stage ``L_k = mean over positions of (1 - cos(F_Tk, F_Sk))``: 0 when the student equals the teacher.

    With ``hard_mining`` q > 0 only the positions whose distance is in the batch's top ``1 - q``
    fraction count (per stage), so training concentrates on what the student has not learnt yet.
    """
    if len(teacher) != len(student):
        raise ValueError(f"teacher gives {len(teacher)} stages, student {len(student)}")
    return [_hard_mean(1.0 - F.cosine_similarity(t, s, dim=1, eps=1e-6), hard_mining) for t, s in zip(teacher, student)]


class DistillationLoss(nn.Module):
    """Sum over stages of :func:`distillation_losses`, each stage weighted by ``stage_weights``."""

    def __init__(self, stage_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), hard_mining: float = 0.0) -> None:
        super().__init__()
        self.stage_weights = tuple(float(w) for w in stage_weights)
        self.hard_mining = float(hard_mining)

    def forward(self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
        losses = distillation_losses(teacher, student, self.hard_mining)
        return sum(w * loss for w, loss in zip(self.stage_weights, losses))


class DiscriminatorLoss(nn.Module):
    """BCE of the discriminator: normalised teacher stage-4 features real (1), student's fake (0).

    The student's features are detached: this loss trains the discriminator only. Real and fake
    go through the discriminator in one batch, so it is one forward pass (one DDP reduction, one
    set of batch-norm statistics); with equal counts the mean BCE is the mean of the two terms.

    Two balancing levers for a discriminator that wins at once (both off by default):
    ``label_smoothing`` e makes the real target ``1 - e`` (one-sided label smoothing, Salimans et
    al. 2016); ``instance_noise`` s adds Gaussian noise of standard deviation s to the normalised
    features it sees, real and fake alike (Sonderby et al. 2017), so the two distributions overlap.
    """

    def __init__(self, label_smoothing: float = 0.0, instance_noise: float = 0.0) -> None:
        super().__init__()
        self.bce = nn.BCEWithLogitsLoss()
        self.label_smoothing = float(label_smoothing)
        self.instance_noise = float(instance_noise)

    def forward(self, discriminator: nn.Module, teacher_top: torch.Tensor, student_top: torch.Tensor) -> torch.Tensor:
        feats = torch.cat([normalized(teacher_top.detach()), normalized(student_top.detach())]).float()
        logits = discriminator(with_noise(feats, self.instance_noise))
        n = teacher_top.shape[0]
        target = torch.cat([torch.full((n,), 1.0 - self.label_smoothing), torch.zeros(student_top.shape[0])])
        return self.bce(logits, target.to(logits))


class AdversarialLoss(nn.Module):
    """The student's adversarial term: make the discriminator call its stage-4 features real
    (through the same ``instance_noise`` as :class:`DiscriminatorLoss`, so both judge one distribution)."""

    def __init__(self, instance_noise: float = 0.0) -> None:
        super().__init__()
        self.bce = nn.BCEWithLogitsLoss()
        self.instance_noise = float(instance_noise)

    def forward(self, discriminator: nn.Module, student_top: torch.Tensor) -> torch.Tensor:
        logits = discriminator(with_noise(normalized(student_top), self.instance_noise))
        return self.bce(logits, torch.ones_like(logits))


class SegmentationLoss(nn.Module):
    """Focal loss plus L1 between the head's probabilities and the anomaly share of each position
    (DeSTSeg's loss): ``focal_weight * focal(p, m > 0.5) + mean |p - m|``, ``p = sigmoid(logits)``."""

    def __init__(self, gamma: float = 2.0, focal_weight: float = 1.0) -> None:
        super().__init__()
        self.gamma, self.focal_weight = float(gamma), float(focal_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        hard = (target > 0.5).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, hard, reduction="none")
        p_true = torch.where(hard > 0, p, 1.0 - p)
        focal = ((1.0 - p_true).pow(self.gamma) * bce).mean()
        return self.focal_weight * focal + (p - target).abs().mean()
