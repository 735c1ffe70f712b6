"""The discriminator of Multi-AD (paper, Fig. 3): teacher features are real, student features fake."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["FeatureDiscriminator"]


class FeatureDiscriminator(nn.Module):
    """3x3 conv + BN + LeakyReLU layers (128 -> 256 -> 512 -> 1024), dropout, global pooling, FC.

    Global average pooling before the fully connected layer (our choice; the paper flattens)
    makes the discriminator independent of the input size. It returns logits: train it with
    ``BCEWithLogitsLoss`` and apply a sigmoid only to report probabilities.

    With ``spectral_norm`` every conv and the FC layer are spectrally normalised (Miyato et al.
    2018: each layer 1-Lipschitz, which limits how fast the discriminator can win) and the
    BatchNorm layers are left out, as in SN-GAN's discriminators (a BatchNorm would rescale what
    the normalisation bounds).

    Args:
        in_channels: channels of the (L2-normalised) stage-4 features it judges.
        channels: output channels of the conv layers.
        dropout: dropout probability before the FC layer.
        negative_slope: LeakyReLU slope.
        spectral_norm: spectral normalisation of every layer, no BatchNorm.

    Shapes:
        input (B, in_channels, h, w) -> logits (B,).
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (128, 256, 512, 1024),
        dropout: float = 0.3,
        negative_slope: float = 0.2,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda layer: layer)
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            layers += [
                sn(nn.Conv2d(c_in, c, kernel_size=3, padding=1, bias=spectral_norm)),
                nn.Identity() if spectral_norm else nn.BatchNorm2d(c),
                nn.LeakyReLU(negative_slope, inplace=True),
            ]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = sn(nn.Linear(c_in, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.dropout(self.features(x))).flatten(1)
        return self.fc(x).squeeze(1)
