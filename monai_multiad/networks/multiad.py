"""Multi-AD: a frozen pretrained teacher, a trained student of the same shape, a discriminator,
and multi-scale fusion of the per-stage maps (Rahmaniar and Suzuki, Pattern Recognition 2026,
arXiv 2602.05426)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from monai_multiad.errors import MultiADInputError
from monai_multiad.networks.backbones import build_feature_extractor
from monai_multiad.networks.discriminator import FeatureDiscriminator
from monai_multiad.networks.folding import fold_batchnorm
from monai_multiad.networks.foreground import ForegroundMask
from monai_multiad.networks.fusion import AnomalyMapFusion, stage_anomaly_maps
from monai_multiad.networks.memory_bank import MemoryBank
from monai_multiad.networks.segmentation_head import SegmentationHead

__all__ = ["MultiAD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MultiAD(nn.Module):
    """Teacher-student anomaly detector with a discriminator and multi-scale fusion.

    The input is an image batch with intensities in [0, 1]; one-channel images are repeated to
    three channels and everything is normalised with ImageNet mean and std inside the network,
    so an exported model takes the same input as the trained one.

    In training mode ``forward`` returns ``{"teacher": [F_T1..F_T4], "student": [F_S1..F_S4]}``
    (what the losses need; see :mod:`monai_multiad.losses`); in eval mode it returns
    ``(anomaly_map (B, 1, H, W), score (B,))`` at the input resolution, the score being the
    map's maximum. The teacher is frozen and stays in eval mode whatever ``train()`` is called with.

    Args:
        backbone: ``"efficientnet_lite0"`` (offline default), ``"efficientnet_lite1"``, ``"efficientnet_lite2"``,
            ``"se_resnet50"`` (the paper's) or ``"resnet18"``.
        in_channels: 1 or 3.
        pretrained: teacher weights: ``True`` for the backbone's ImageNet weights, a file path,
            or ``False`` (random teacher; tests only).
        student_se: the SE switch of the ablation (SE blocks added in the student).
        discriminator: build the discriminator (the adversarial loss weight can still be 0).
        discriminator_channels: conv widths of the discriminator.
        discriminator_spectral_norm: spectral normalisation of the discriminator's layers (no BatchNorm).
        fusion_mode: ``"sum"`` or ``"product"``; ``fuse=False`` uses the last stage only.
        sigma: Gaussian smoothing of the fused map, in pixels.
        stages: the stages (1-4) whose maps are fused (all by default); the student still
            learns every stage.
        memory_bank: size of a coreset of normal teacher features whose k-NN distance map
            (:class:`~monai_multiad.networks.memory_bank.MemoryBank`, PatchCore's map) joins the fusion
            as one more map after the stages' (0 = none); filled by
            :func:`~monai_multiad.engines.evaluator.fit_memory_bank`.
        segmentation_head: a :class:`~monai_multiad.networks.segmentation_head.SegmentationHead` whose
            logit map (trained on synthetic anomalies by
            :class:`~monai_multiad.engines.head_trainer.SegmentationHeadTrainer`) joins the fusion after
            the stages' and the bank's. With ``fuse=False`` the last of these maps is the one used.
        score_topk: image score = mean of the top fraction of map pixels (0 = maximum).
        feature_norm: standardise the teacher's features channel by channel with statistics of
            normal images (:meth:`set_feature_statistics`) before the student imitates them.
        foreground: zero the map outside the body/head found in the image itself
            (:class:`~monai_multiad.networks.foreground.ForegroundMask`); for scans, not for parts.
        check_inputs: validate inputs (shape, channels, size, NaN); exporters turn it off.

    Raises:
        MultiADInputError (a ValueError) for a wrong input: not 4D, wrong channel count,
        smaller than 32 px (the total stride), or containing NaN/inf.
    """

    min_size = 32

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        in_channels: int = 3,
        pretrained: bool | str | Path = True,
        student_se: bool = True,
        discriminator: bool = True,
        discriminator_channels: Sequence[int] = (128, 256, 512, 1024),
        discriminator_spectral_norm: bool = False,
        fusion_mode: str = "sum",
        fuse: bool = True,
        sigma: float = 4.0,
        check_inputs: bool = True,
        stages: Sequence[int] | None = None,
        score_topk: float = 0.0,
        feature_norm: bool = False,
        foreground: bool = False,
        memory_bank: int = 0,
        segmentation_head: bool = False,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise MultiADInputError(f"in_channels must be 1 or 3, got {in_channels}")
        self.backbone = backbone
        self.in_channels = in_channels
        self.check_inputs = check_inputs
        self.batchnorm_folded = False
        self.teacher = build_feature_extractor(backbone, "teacher", pretrained=pretrained, se=student_se)
        self.student = build_feature_extractor(backbone, "student", se=student_se)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.discriminator = (
            FeatureDiscriminator(self.teacher.out_channels[-1], discriminator_channels,
                                 spectral_norm=discriminator_spectral_norm) if discriminator else None
        )
        k = len(self.teacher.out_channels)
        self.memory_bank = MemoryBank(self.teacher.out_channels, size=memory_bank) if memory_bank > 0 else None
        self.segmentation_head = SegmentationHead(self.teacher.out_channels) if segmentation_head else None
        # the bank's and the head's maps are more maps of the fusion, after the stages', in this order
        extra = (self.memory_bank is not None) + (self.segmentation_head is not None)
        if extra:
            stages = (*(stages or range(1, k + 1)), *range(k + 1, k + 1 + extra))
        self.fusion = AnomalyMapFusion(k + extra, mode=fusion_mode, sigma=sigma, fuse=fuse,
                                       stages=stages, score_topk=score_topk)
        self.feature_norm = bool(feature_norm)
        for k, c in enumerate(self.teacher.out_channels):  # identity until fitted; saved with the model
            self.register_buffer(f"feature_mean{k}", torch.zeros(1, c, 1, 1))
            self.register_buffer(f"feature_std{k}", torch.ones(1, c, 1, 1))
        self.foreground = ForegroundMask() if foreground else None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> MultiAD:
        if mode and self.batchnorm_folded:
            raise RuntimeError("this MultiAD's BatchNorm layers were folded for inference (fold_batchnorm_): "
                               "it cannot be trained; load the model again without folding to train it")
        super().train(mode)
        self.teacher.eval()
        return self

    def fold_batchnorm_(self) -> MultiAD:
        """Fold the teacher's and the student's BatchNorm layers into their convolutions, in place, for
        inference: the same maps and scores to float rounding, faster (:mod:`~monai_multiad.networks.folding`).
        Afterwards the network stays in eval mode (``train()`` raises) and its ``state_dict`` no longer
        has the BatchNorm entries, so it is not saved (``run_folder.save_model`` refuses it)."""
        if not self.batchnorm_folded:
            self.eval()
            # in place: the networks as trained are replaced, so they need not be copied first
            self.teacher = fold_batchnorm(self.teacher, inplace=True).requires_grad_(False)
            self.student = fold_batchnorm(self.student, inplace=True)
            self.batchnorm_folded = True
        return self

    def validate_input(self, x: torch.Tensor) -> None:
        """Raise :class:`MultiADInputError` saying what was given and what is expected."""
        if not isinstance(x, torch.Tensor):
            raise MultiADInputError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
        if x.ndim != 4:
            raise MultiADInputError(
                f"expected a 4D batch (B, {self.in_channels}, H, W), got a {x.ndim}D tensor of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise MultiADInputError(
                f"expected {self.in_channels} channel(s) (B, {self.in_channels}, H, W), "
                f"got {x.shape[1]} in shape {tuple(x.shape)}"
            )
        if min(x.shape[-2:]) < self.min_size:
            raise MultiADInputError(
                f"image of {x.shape[-2]} x {x.shape[-1]} px is smaller than the network's total stride: "
                f"expected at least {self.min_size} x {self.min_size} (256 x 256 recommended)"
            )
        # a sum is finite only if every element is (NaN and inf propagate), and it reads the batch once
        # without a boolean copy: 0.01 ms against 0.5 ms at 256 px; only a finite sum that overflows
        # (intensities near 1e38) falls back to the element-wise check
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            raise MultiADInputError("input contains NaN or infinite values: expected finite intensities in [0, 1]")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] intensities (B, in_channels, H, W) -> ImageNet-normalised (B, 3, H, W)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frozen teacher's stage features of a [0, 1] batch (standardised when ``feature_norm``),
        without gradient: what :meth:`features` compares the student with."""
        t = self.teacher(self.normalize(x))
        if self.feature_norm:
            t = [(f - getattr(self, f"feature_mean{k}")) / getattr(self, f"feature_std{k}") for k, f in enumerate(t)]
        return t

    def features(
        self, x: torch.Tensor, student: nn.Module | None = None, student_input: torch.Tensor | None = None,
        teacher_features: list[torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher (no gradient) and student stage features of a [0, 1] batch.

        ``student`` runs in place of ``self.student`` when given: a wrapper of it such as
        ``DistributedDataParallel``, which the multi-GPU trainer passes. ``student_input`` is what the
        student sees instead of ``x`` (a corrupted copy: the denoising student's training).
        ``teacher_features`` are :meth:`teacher_features` of ``x`` computed before (a training cache's).
        """
        if self.check_inputs:
            self.validate_input(x)
        t = self.teacher_features(x) if teacher_features is None else teacher_features
        x_student = self.normalize(x if student_input is None else student_input)
        return t, (self.student if student is None else student)(x_student)

    @torch.no_grad()
    def set_feature_statistics(self, batches) -> None:
        """Per-channel mean and std of the teacher's stage features over normal image batches
        (an iterable of ``(B, C, H, W)`` tensors in [0, 1] on the model's device)."""
        sums = sq = counts = None
        for x in batches:
            t = self.teacher(self.normalize(x))
            s1 = [f.double().sum(dim=(0, 2, 3)) for f in t]
            s2 = [f.double().pow(2).sum(dim=(0, 2, 3)) for f in t]
            n = [f.shape[0] * f.shape[2] * f.shape[3] for f in t]
            if sums is None:
                sums, sq, counts = s1, s2, n
            else:
                sums = [u + v for u, v in zip(sums, s1)]
                sq = [u + v for u, v in zip(sq, s2)]
                counts = [u + v for u, v in zip(counts, n)]
        if sums is None:
            raise MultiADInputError("no normal images to compute the teacher's feature statistics on")
        for k, (s1, s2, n) in enumerate(zip(sums, sq, counts)):
            mean = s1 / n
            std = (s2 / n - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-4)
            getattr(self, f"feature_mean{k}").copy_(mean.view(1, -1, 1, 1))
            getattr(self, f"feature_std{k}").copy_(std.view(1, -1, 1, 1))

    def stage_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Per-stage maps ``1 - cos(F_Tk, F_Sk)`` upsampled to the input size: (B, 4, H, W); the memory
        bank's k-NN distance map and the segmentation head's logit map follow when the model has them."""
        t, s = self.features(x)
        return self._maps(t, s, x.shape[-2:])

    def _maps(self, t: list[torch.Tensor], s: list[torch.Tensor], size: list[int]) -> torch.Tensor:
        maps = [stage_anomaly_maps(t, s, size)]
        if self.memory_bank is not None:
            maps.append(self.memory_bank(t))
        if self.segmentation_head is not None:
            maps.append(self.segmentation_head(t, s))
        return torch.cat([maps[0]] + [F.interpolate(m, size=(size[0], size[1]), mode="bilinear", align_corners=False)
                                      for m in maps[1:]], dim=1)

    def forward(self, x: torch.Tensor):
        t, s = self.features(x)
        if self.training:
            return {"teacher": t, "student": s}
        # the maps are small next to the networks: fuse them in float32 even under autocast
        with torch.autocast(device_type=x.device.type, enabled=False):
            fused = self.fused_map(t, s, x)
            return fused, self.fusion.score(fused)

    def eval_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher and student stage features of a [0, 1] batch for inference: :meth:`features` without
        the input checks and the training options, in a form ``torch.jit.script`` compiles (the
        ``forward`` of a scripted :class:`~monai_multiad.bundle_support.AnomalyMapNetwork`)."""
        x = self.normalize(x)
        t = self.teacher(x)
        if self.feature_norm:
            means = [self.feature_mean0, self.feature_mean1, self.feature_mean2, self.feature_mean3]
            stds = [self.feature_std0, self.feature_std1, self.feature_std2, self.feature_std3]
            t = [(f - means[k]) / stds[k] for k, f in enumerate(t)]
        return t, self.student(x)

    def fused_map(self, t: list[torch.Tensor], s: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The anomaly map (B, 1, H, W) of stage features ``t``, ``s`` of the batch ``x``, in float32."""
        t, s = [f.float() for f in t], [f.float() for f in s]
        size = [x.shape[-2], x.shape[-1]]
        if self.memory_bank is None and self.segmentation_head is None:
            fused = self.fusion.fuse_features(t, s, size)
        else:
            fused = self.fusion.fuse_maps(self._maps(t, s, size))
        if self.foreground is not None:
            fused = fused * self.foreground(x)
        return fused

