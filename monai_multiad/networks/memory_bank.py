"""A memory bank of normal teacher features: PatchCore's k-NN distance map, with bounded memory.

The teacher's features of stages 2 and 3 are averaged over a 3x3 neighbourhood, brought to stage
2's grid and concatenated (PatchCore's locally aware patch features), standardised per channel with
normal statistics, and compared with a coreset of the same features of the normal training
images: the distance of each position to its nearest coreset entry is its anomaly score. The
coreset is chosen by greedy farthest-point sampling (PatchCore) in a random projection, from a
random pool of the training positions, so fitting stays cheap and the bank's size is fixed in
advance (it is a buffer of the model, saved with it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MemoryBank", "greedy_coreset"]


def greedy_coreset(points: torch.Tensor, size: int, generator: torch.Generator, projection: int = 128) -> torch.Tensor:
    """Indices of ``size`` rows of ``points`` (N, C) chosen by greedy farthest-point sampling, the distances
    taken in a random projection to ``projection`` dimensions (PatchCore's approximate coreset)."""
    n = points.shape[0]
    if size >= n:
        return torch.arange(n)
    if points.shape[1] > projection:
        proj = torch.randn(points.shape[1], projection, generator=generator, dtype=points.dtype) / math.sqrt(projection)
        points = points @ proj.to(points.device)
    sq = points.pow(2).sum(1)
    chosen = torch.empty(size, dtype=torch.long)
    first = int(torch.randint(n, (1,), generator=generator))
    chosen[0] = first
    # |p - p_j|^2 = |p|^2 - 2 p.p_j + |p_j|^2: one matrix-vector product a step, no (N, C) temporaries
    nearest = torch.addmv(sq, points, points[first], alpha=-2.0).add_(sq[first])
    dist = torch.empty_like(nearest)
    for i in range(1, size):
        j = int(nearest.argmax())
        chosen[i] = j
        torch.addmv(sq, points, points[j], alpha=-2.0, out=dist)
        torch.minimum(nearest, dist.add_(sq[j]), out=nearest)
    return chosen


class MemoryBank(nn.Module):
    """k-NN distance map of teacher features to a coreset of normal ones.

    Args:
        channels: the teacher's channels of every stage (all four).
        size: number of coreset entries kept (the bank's memory: ``size x sum(channels of stages)`` floats).
        stages: the teacher stages (1-based) whose features enter the bank; the map has the first one's grid.
        pool: side of the neighbourhood each feature is averaged over.

    ``forward(teacher_features)`` -> ``(B, 1, h, w)`` distances on the first stage's grid. Until
    :meth:`fit` has filled the bank the map is all zeros.
    """

    def __init__(self, channels: Sequence[int], size: int = 4096, stages: Sequence[int] = (2, 3), pool: int = 3) -> None:
        super().__init__()
        self.stages = tuple(int(k) for k in stages)
        self.pool = int(pool)
        dim = sum(int(channels[k - 1]) for k in self.stages)
        self.register_buffer("bank", torch.zeros(int(size), dim))
        self.register_buffer("bank_sq", torch.zeros(int(size)))
        self.register_buffer("mean", torch.zeros(1, dim, 1, 1))
        self.register_buffer("std", torch.ones(1, dim, 1, 1))
        self.register_buffer("filled", torch.tensor(0))

    def aggregate(self, teacher: list[torch.Tensor]) -> torch.Tensor:
        """Locally averaged features of the bank's stages on the first one's grid, standardised: (B, C, h, w)."""
        first = teacher[self.stages[0] - 1]
        size = (first.shape[-2], first.shape[-1])
        parts = []
        for k in self.stages:
            f = teacher[k - 1].float()
            if self.pool > 1:
                f = F.avg_pool2d(f, self.pool, 1, self.pool // 2, count_include_pad=False)
            if f.shape[-2:] != first.shape[-2:]:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            parts.append(f)
        return (torch.cat(parts, 1) - self.mean) / self.std

    def forward(self, teacher: list[torch.Tensor]) -> torch.Tensor:
        x = self.aggregate(teacher)
        b, c, h, w = x.shape
        q = x.permute(0, 2, 3, 1).reshape(-1, c)
        out = []
        # in eager mode a 2048 x size block of distances stays in cache; a traced or exported graph takes the
        # queries in one block, since its split sizes would be fixed at the traced batch size
        blocks = q.split(2048)
        if not torch.jit.is_scripting():  # (a scripted graph keeps the blocks: its sizes are not fixed)
            if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
                blocks = [q]
        for chunk in blocks:
            # min_m |q - m|^2 = |q|^2 + min_m (|m|^2 - 2 q.m): one matrix product and one reduction
            # (exportable, faster than cdist and than forming the full distances)
            d = torch.addmm(self.bank_sq, chunk, self.bank.t(), alpha=-2.0).amin(1)
            out.append((d + chunk.pow(2).sum(1)).clamp_min(0.0).sqrt())
        return torch.cat(out).view(b, h, w, 1).permute(0, 3, 1, 2)

    @torch.no_grad()
    def fit(self, teacher_batches: Iterable[Sequence[torch.Tensor]], generator: torch.Generator | None = None,
            pool_factor: int = 16) -> int:
        """Fill the bank from the teacher features of normal images (an iterable of per-stage lists).

        The per-channel statistics come from all positions; the coreset from a random pool of about
        ``pool_factor`` times the bank's size. Returns the number of entries filled (fewer than the
        size only when the images have fewer positions)."""
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.mean.zero_()
        self.std.fill_(1.0)
        feats = [self.aggregate(t).cpu() for t in teacher_batches]
        if not feats:
            raise ValueError("no normal images to fill the memory bank from")
        x = torch.cat(feats)
        dim = x.shape[1]
        flat = x.permute(0, 2, 3, 1).reshape(-1, dim)
        mean = flat.mean(0)
        std = flat.std(0).clamp_min(1e-4)
        flat = (flat - mean) / std
        size = self.bank.shape[0]
        pool = min(flat.shape[0], size * pool_factor)
        candidates = flat[torch.randperm(flat.shape[0], generator=generator)[:pool]]
        chosen = candidates[greedy_coreset(candidates, size, generator)]
        n = chosen.shape[0]
        self.bank.zero_()
        self.bank[:n] = chosen.to(self.bank)
        if n < size:  # fewer positions than entries: repeat the first (the minimum is unchanged)
            self.bank[n:] = chosen[:1].to(self.bank)
        self.bank_sq.copy_(self.bank.pow(2).sum(1))
        self.mean.copy_(mean.view(1, -1, 1, 1).to(self.mean))
        self.std.copy_(std.view(1, -1, 1, 1).to(self.std))
        self.filled.fill_(n)
        return n
