"""A foreground (body / head) mask computed from the scan itself, so that background and the edge of
the scan never score: threshold of the smoothed image, holes filled, then eroded.

Pure torch (no SciPy), so it runs on the device inside :class:`~monai_multiad.networks.MultiAD`
and exports with it. Holes are filled along rows and columns: a pixel is foreground when it is,
or when foreground lies on both sides of it along its row and along its column (this fills
the dark ventricles of a FLAIR slice; a concavity open on one side stays background).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from monai_multiad.networks.fusion import GaussianSmoothing

__all__ = ["ForegroundMask"]


class ForegroundMask(nn.Module):
    """``(B, C, H, W)`` images in [0, 1] -> ``(B, 1, H, W)`` float mask, 1 inside the body.

    Args:
        threshold: intensity (after smoothing) above which a pixel is body; background of a
            normalised MRI/CT slice is 0.
        sigma: Gaussian smoothing in pixels before thresholding.
        erode: pixels removed from the mask's edge (the skull / skin edge, where partial-volume
            intensity steps would otherwise score).
    """

    def __init__(self, threshold: float = 0.05, sigma: float = 2.0, erode: int = 3) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.erode = int(erode)
        self.smooth = GaussianSmoothing(sigma) if sigma > 0 else nn.Identity()

    @staticmethod
    def _between(fg: torch.Tensor, dim: int) -> torch.Tensor:
        """Pixels with foreground somewhere before and somewhere after them along ``dim``."""
        before = torch.cummax(fg, dim=dim).values
        after = torch.cummax(fg.flip(dim), dim=dim).values.flip(dim)
        return torch.minimum(before, after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.smooth(x.float().mean(dim=1, keepdim=True))
        fg = (g > self.threshold).float()
        filled = torch.maximum(fg, torch.minimum(self._between(fg, 2), self._between(fg, 3)))
        if self.erode > 0:
            k = 2 * self.erode + 1
            filled = 1.0 - F.max_pool2d(1.0 - filled, kernel_size=k, stride=1, padding=self.erode)
        return filled
