"""Multi-scale fusion: per-stage anomaly maps -> one anomaly map and an image score.

Paper: per-stage maps ``M_k = 1 - cos(F_Tk, F_Sk)`` are upsampled to the input size,
combined element-wise (sum or product), passed through 1x1 conv + BN + ReLU and smoothed by a
Gaussian. Without anomaly labels the 1x1 conv + BN cannot be trained, so here its unsupervised
equivalent is fitted on normal images: each stage map gets an offset and a scale from normal
validation pixels (:class:`AnomalyMapFusion`; the run's ``map_normalization``: a z-score by
default, the mean, or EfficientAD's quantiles), which puts the stages in one unit before they are
combined, and the ReLU clips what lies below the normal level. The Gaussian is
:class:`GaussianSmoothing`: the kernel of MONAI's ``GaussianFilter`` (``gaussian_1d``) built once as
a buffer, not ``GaussianFilter`` itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.convutils import gaussian_1d
from torch import nn

__all__ = ["AnomalyMapFusion", "GaussianSmoothing", "stage_anomaly_maps"]


class GaussianSmoothing(nn.Module):
    """Separable Gaussian smoothing of one-channel 2D maps (B, 1, H, W), zero padding.

    The same kernel as MONAI's ``GaussianFilter`` (``gaussian_1d``, erf approximation,
    truncated at 4 sigma), computed once and kept as a non-persistent buffer: no per-call
    kernel construction, and exportable to TorchScript and ONNX as it is.

    In eager mode the two 1D convolutions run as two matrix products with banded matrices
    (``B_H @ x @ B_W^T``, the kernel on the band; the band's truncated rows are the zero
    padding), built once per map size, device and dtype: the same numbers, and on the CPU
    faster than ``conv2d`` with a one-channel 33-tap kernel, which oneDNN runs slowly (3-19x at
    256 px, one thread; ``docs/results.md``, Speed). On the CPU each product runs block by block
    (``block`` outputs at a time against only the ``block + 2 pad`` inputs their band reaches),
    skipping the band's zeros; as the band is Toeplitz, all blocks of an axis are one batched
    product of the same (block, block + 2 pad) taps with overlapping windows of the zero-padded map
    (a strided view), image by image: at 256 px, one thread, 0.26 ms against 0.39 for the earlier
    per-block products and 0.6 for the dense ones (12.1 -> 8.3 ms at batch 32), the same sums.
    Traced, scripted, exported or compiled, it is the two ``conv2d`` calls, which follow any map size.
    """

    __jit_ignored_attributes__ = ["_bands"]  # the eager path's cache: not part of a scripted module

    def __init__(self, sigma: float, truncated: float = 4.0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        kernel = gaussian_1d(torch.tensor(self.sigma), truncated=truncated, approx="erf").float()
        self.register_buffer("kernel_h", kernel.reshape(1, 1, -1, 1).clone(), persistent=False)
        self.register_buffer("kernel_w", kernel.reshape(1, 1, 1, -1).clone(), persistent=False)
        self.pad = (kernel.numel() - 1) // 2
        self.block = 16  # outputs per block of the eager banded products
        self._bands: dict[tuple, torch.Tensor] = {}

    @torch.jit.unused
    def band(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """(n, n) matrix ``B`` with ``(B @ v)[i] = sum_t kernel[t] v[i + t - pad]`` (zero outside)."""
        key = (int(n), like.device, like.dtype)
        band = self._bands.get(key)
        if band is None:
            i = torch.arange(n, device=like.device)
            offset = i.view(1, -1) - i.view(-1, 1) + self.pad  # column j, row i: tap j - i + pad
            taps = self.kernel_w.flatten().to(device=like.device, dtype=like.dtype)
            inside = (offset >= 0) & (offset <= 2 * self.pad)
            band = torch.where(inside, taps[offset.clamp(0, 2 * self.pad)], taps.new_zeros(()))
            if len(self._bands) >= 8:  # a handful of sizes in practice; keep the cache bounded
                self._bands.clear()
            self._bands[key] = band
        return band

    @torch.jit.unused
    def _toeplitz(self, like: torch.Tensor) -> torch.Tensor:
        """(block, block + 2 pad): the band's rows for one block of outputs against the inputs they reach,
        ``T[o, k] = kernel[k - o]``: the same for every block (the band is Toeplitz)."""
        key = ("toeplitz", self.block, like.device, like.dtype)
        taps = self._bands.get(key)
        if taps is None:
            n = self.block + 2 * self.pad
            taps = self._bands[key] = self.band(n, like)[self.pad: self.pad + self.block].contiguous()
        return taps

    @torch.jit.unused
    def _along_last(self, image: torch.Tensor, taps: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(r, n) -> (blocks * block, r): the smoothing along the last axis, transposed. The axis, zero-padded,
        is read as overlapping windows of ``block + 2 pad`` inputs, one per block of ``block`` outputs (a
        strided view, no copy), and all blocks are one batched product with the same Toeplitz taps."""
        rows, n = int(image.shape[0]), int(image.shape[1])
        blocks = -(-n // self.block)
        padded = F.pad(image, (self.pad, self.pad + blocks * self.block - n))
        windows = padded.as_strided((blocks, taps.shape[1], rows), (self.block, 1, padded.stride(0)),
                                    padded.storage_offset())
        if out is None:
            return torch.matmul(taps, windows).view(blocks * self.block, rows)
        return torch.matmul(taps, windows, out=out.view(blocks, self.block, rows)).view(blocks * self.block, rows)

    @torch.jit.unused
    def _banded_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """``B_H @ x @ B_W^T`` image by image, without the band's zeros: along W the product is taken
        transposed, ``(x B_W^T)^T`` (:meth:`_along_last`), then along H on that, which gives the result
        in its own orientation, written straight into it when ``block`` divides H. The same sums as the
        dense banded product (equal to it bit for bit on 256 px maps)."""
        h, w = int(x.shape[-2]), int(x.shape[-1])
        taps = self._toeplitz(x)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        images, results = x.reshape(-1, h, w), out.view(-1, h, w)
        for i in range(images.shape[0]):
            across_t = self._along_last(images[i], taps)[:w]  # (w, h): x B_W^T, transposed
            if h % self.block == 0 and not (x.requires_grad and torch.is_grad_enabled()):  # out=: no autograd
                self._along_last(across_t, taps, out=results[i])
            else:
                results[i].copy_(self._along_last(across_t, taps)[:h])
        return out

    @torch.jit.unused
    def eager(self, x: torch.Tensor) -> torch.Tensor:
        """The eager products (see the class), without :meth:`forward`'s checks for tracing, scripting,
        export or compiling, for callers that made them already (``AnomalyMapFusion.fuse_features``)."""
        if x.device.type != "cpu":  # one product per axis: fewer kernel launches (blocks measured on the CPU only)
            return self.band(x.shape[-2], x) @ x @ self.band(x.shape[-1], x).transpose(0, 1)
        return self._banded_cpu(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript compiles only the conv2d path below
            if not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()):
                return self.eager(x)
        x = F.conv2d(x, self.kernel_h.to(x.dtype), padding=(self.pad, 0))
        return F.conv2d(x, self.kernel_w.to(x.dtype), padding=(0, self.pad))


def _cosine_in_place(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``F.cosine_similarity(a, b, dim=1, eps=eps)`` in its own steps (each norm clamped at ``eps``, each
    input divided by its norm, the product summed over channels), with the product taken in place:
    the same numbers bit for bit (``tests/test_networks.py``), one feature-sized tensor fewer to allocate
    (at batch 32, 7.9 against 9.2 ms for the four Lite0 stages; no gradients)."""
    norm_a = torch.linalg.vector_norm(a, 2, dim=1, keepdim=True).clamp_min_(eps)
    norm_b = torch.linalg.vector_norm(b, 2, dim=1, keepdim=True).clamp_min_(eps)
    return torch.div(a, norm_a).mul_(torch.div(b, norm_b)).sum(1)


def stage_anomaly_maps(
    teacher: list[torch.Tensor], student: list[torch.Tensor], size: list[int]
) -> torch.Tensor:
    """``1 - cos`` over channels per stage, bilinearly upsampled: (B, K, H, W) for ``size`` (H, W)."""
    maps = [
        F.interpolate(
            1.0 - F.cosine_similarity(t, s, dim=1, eps=1e-6).unsqueeze(1),
            size=(size[0], size[1]),  # not int(): a traced export keeps the size dynamic
            mode="bilinear",
            align_corners=False,
        )
        for t, s in zip(teacher, student)
    ]
    return torch.cat(maps, dim=1)


class AnomalyMapFusion(nn.Module):
    """Fuse per-stage maps (B, K, H, W) into an anomaly map (B, 1, H, W) and a score (B,).

    Each stage map is put in one unit before the stages are combined: ``z_k = (M_k - offset_k) /
    scale_k``, both fitted on normal images (:meth:`set_statistics`, given them by
    :func:`~monai_multiad.engines.evaluator.fit_fusion`). With ``normalization="mean"``
    the offset is 0 and the scale the stage's mean over normal pixels (1 is a typical normal
    pixel); with ``"zscore"`` the offset is the stage's mean and the scale its standard deviation
    over normal pixels; with ``"quantile"`` (EfficientAD's map normalisation) the offset is the 0.9 quantile
    of normal pixels and the scale the distance from it to the 0.995 quantile. Negative values
    are clipped to 0 (the paper's ReLU), so a masked-out background (0) never outranks tissue.

    Args:
        num_stages: K.
        mode: ``"sum"`` (mean of the scaled stage maps) or ``"product"`` (their geometric mean).
        sigma: Gaussian smoothing in pixels of the map (4 at 256 px in the paper's setting);
            0 turns smoothing off.
        fuse: ``False`` uses only the last stage map (the fusion-off ablation).
        stages: which of the K stage maps (1-based) enter the fused map; default all.
        score_topk: image score = mean of the top ``score_topk`` fraction of map pixels
            (e.g. 0.01); 0 = the map's maximum.

    Buffers (saved with the model):
        offset, scale: (K,) per-stage normal statistics (0 and 1 until :meth:`set_statistics`).
        threshold: image-score threshold fitted on normal images (NaN until set).
    """

    __jit_ignored_attributes__ = ["_upsampling"]  # the eager path's cache: not part of a scripted module

    def __init__(self, num_stages: int = 4, mode: str = "sum", sigma: float = 4.0, fuse: bool = True,
                 stages: Sequence[int] | None = None, score_topk: float = 0.0) -> None:
        super().__init__()
        if mode not in ("sum", "product"):
            raise ValueError(f"fusion mode must be 'sum' or 'product', got {mode!r}")
        stages = tuple(range(1, num_stages + 1)) if not stages else tuple(int(k) for k in stages)
        if not stages or any(k < 1 or k > num_stages for k in stages) or len(set(stages)) != len(stages):
            raise ValueError(f"stages must be distinct numbers from 1 to {num_stages}, got {list(stages)}")
        if not 0.0 <= float(score_topk) < 1.0:
            raise ValueError(f"score_topk must be a fraction in [0, 1), got {score_topk}")
        self.mode = mode
        self.fuse = fuse
        self.num_stages = num_stages
        self.stages = stages
        self.score_topk = float(score_topk)
        self.sigma = float(sigma)
        self.smooth = GaussianSmoothing(sigma) if sigma > 0 else nn.Identity()
        self.register_buffer("index", torch.tensor([k - 1 for k in stages]), persistent=False)
        self.register_buffer("offset", torch.zeros(num_stages))
        self.register_buffer("scale", torch.ones(num_stages))
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self._upsampling: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def fitted(self) -> bool:
        return not bool(torch.isnan(self.threshold))

    @torch.no_grad()
    def set_statistics(self, stage_scale: torch.Tensor, threshold: float,
                       stage_offset: torch.Tensor | None = None) -> None:
        """Store per-stage normal statistics (K,) and the image-score threshold fitted on normal images."""
        self.scale.copy_(stage_scale.clamp_min(1e-8).to(self.scale))
        self.offset.copy_(torch.zeros_like(self.offset) if stage_offset is None else stage_offset.to(self.offset))
        self.threshold.fill_(float(threshold))

    def units(self, stage_maps: torch.Tensor) -> torch.Tensor:
        """Maps (B, K, ...) in the fusion's unit: ``(M_k - offset_k) / scale_k``, clipped at 0."""
        z = (stage_maps - self.offset.view(1, -1, 1, 1)) / self.scale.view(1, -1, 1, 1)
        return z.clamp_min(0.0)  # the paper's ReLU: below the normal offset is normal, whatever how far

    def fuse_maps(self, stage_maps: torch.Tensor) -> torch.Tensor:
        """Scaled, combined and smoothed map (B, 1, H, W), before any mask."""
        z = self.units(stage_maps)
        if not self.fuse:
            return self.smooth(z[:, -1:])
        z = z.index_select(1, self.index)
        if self.mode == "sum":
            fused = z.mean(dim=1, keepdim=True)
        else:
            fused = torch.exp(torch.log(z.clamp_min(1e-12)).mean(dim=1, keepdim=True))
        return self.smooth(fused)

    @torch.jit.unused
    def _upsample(self, z: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``F.interpolate(z, size, mode="bilinear", align_corners=False)`` of (B, C, h, w) maps, on the CPU
        for integer scales (``H = s h`` with ``s`` even, ``W`` a multiple of ``w``) written as two cheaper
        steps, other sizes and devices by ``F.interpolate`` itself. Along W (first, as ATen's kernel) a
        product with the (w, W) matrix of the bilinear weights, on the small map; along H, output row
        ``s i + r`` lies at ``mu_r = (r + 0.5) / s - 0.5`` from source row i, so all of them come in one
        broadcast ``c[i] + mu_r (c[i +- 1] - c[i])`` (the difference toward row i - 1 for ``mu_r < 0``,
        toward i + 1 otherwise; 0 beyond the ends, where ATen clamps the source to the edge row). The
        same weights, summed in another order: equal to float rounding (~1 ulp of the map's peak).
        0.20 against 0.43 ms for the four Lite0 stage maps (64 to 8 px) to 256 px, one thread."""
        h, w = int(z.shape[-2]), int(z.shape[-1])
        H, W = int(size[0]), int(size[1])
        if z.device.type != "cpu" or H % h or W % w or (H // h) % 2:
            return F.interpolate(z, size=(H, W), mode="bilinear", align_corners=False)
        key = (h, w, H, W, z.device, z.dtype)
        ops = self._upsampling.get(key)
        if ops is None:
            j = torch.arange(W, dtype=torch.float64)
            src = ((j + 0.5) * (w / W) - 0.5).clamp_min(0.0)  # ATen's source index, clamped at 0
            i0 = src.floor().long().clamp_max(w - 1)
            i1 = (i0 + 1).clamp_max(w - 1)
            across = torch.zeros(w, W, dtype=torch.float64)
            across.index_put_((i0, j.long()), 1.0 - (src - i0), accumulate=True)
            across.index_put_((i1, j.long()), src - i0, accumulate=True)
            s = H // h
            mu = ((torch.arange(s, dtype=torch.float64) + 0.5) / s - 0.5).view(2, s // 2, 1)
            ops = (across.to(device=z.device, dtype=z.dtype), mu.to(device=z.device, dtype=z.dtype))
            if len(self._upsampling) >= 16:  # a few sizes in practice; keep the cache bounded
                self._upsampling.clear()
            self._upsampling[key] = ops
        across, mu = ops
        lead = z.shape[:-2]
        c = z @ across  # (..., h, W)
        d = torch.diff(c, dim=-2, prepend=c[..., :1, :], append=c[..., -1:, :])  # d[i] = c[i] - c[i - 1], 0 at the ends
        towards = d.unfold(-2, 2, 1).transpose(-1, -2).unsqueeze(-2)  # (..., h, 2, 1, W): to row i - 1, to row i + 1
        out = torch.empty((*lead, H, W), dtype=z.dtype, device=z.device)
        torch.addcmul(c.unsqueeze(-2).unsqueeze(-2), towards, mu, out=out.view(*lead, h, 2, H // h // 2, W))
        return out

    def fuse_features(self, teacher: list[torch.Tensor], student: list[torch.Tensor],
                      size: list[int]) -> torch.Tensor:
        """Stage features -> the fused map (B, 1, H, W): ``fuse_maps(stage_anomaly_maps(teacher, student, size))``.

        In eager mode it computes the same map with less work: each stage's offset and scale are
        applied to the small ``1 - cos`` map before it is upsampled (bilinear weights sum to 1, so
        this commutes with the upsampling up to float rounding, ~1e-7), and so is the mean's 1 / K
        (exactly when K is a power of 2); then each upsampled map (:meth:`_upsample`) is clipped and
        added in place into one (B, 1, H, W) sum; the (B, K, H, W) stack, its z-scored copy, the
        clipped copy, the stage selection and the division of the sum are never made, and the stages
        left out of the fused map are not computed. Traced, scripted, exported, compiled or with
        gradients enabled, it is the two functions in turn (``docs/results.md``, Speed).
        """
        if torch.jit.is_scripting():
            return self.fuse_maps(stage_anomaly_maps(teacher, student, size))
        return self._fuse_features_eager(teacher, student, size)

    @torch.jit.unused
    def _fuse_features_eager(self, teacher: list[torch.Tensor], student: list[torch.Tensor],
                             size: list[int]) -> torch.Tensor:
        """:meth:`fuse_features` outside TorchScript (the eager path, or the two functions in turn)."""
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() \
                or torch.compiler.is_compiling() or torch.is_grad_enabled():  # in-place steps below: no autograd
            return self.fuse_maps(stage_anomaly_maps(teacher, student, size))
        used = [self.num_stages - 1] if not self.fuse else [k - 1 for k in self.stages]
        mean = self.fuse and self.mode == "sum"
        offsets = self.offset.unbind()
        # the mean's 1 / K on the small maps (clipping and upsampling commute with a positive factor;
        # exact when K is a power of 2): no division pass over the fused map
        scales = (self.scale * len(used) if mean and len(used) > 1 else self.scale).unbind()
        total = None
        for k in used:
            d = 1.0 - _cosine_in_place(teacher[k], student[k], eps=1e-6).unsqueeze(1)
            z = self._upsample((d - offsets[k]) / scales[k], size)
            if self.mode == "sum" or not self.fuse:
                z = z.clamp_min_(0.0)  # the paper's ReLU
            else:  # max(max(z, 0), 1e-12) = max(z, 1e-12): the product's log of the clipped map
                z = z.clamp_min_(1e-12).log_()
            total = z if total is None else total.add_(z)
        if self.fuse and self.mode == "product":
            total = total.div_(len(used)).exp_()
        # the checks above hold for the smoothing too: no second round of them, nor the module call
        return self.smooth.eager(total) if isinstance(self.smooth, GaussianSmoothing) else self.smooth(total)

    def score(self, fused: torch.Tensor) -> torch.Tensor:
        """Image score of maps (B, 1, H, W): maximum, or mean of the top ``score_topk`` pixels."""
        flat = fused.flatten(1)
        if self.score_topk <= 0:
            return flat.amax(dim=1)
        k = max(1, int(round(self.score_topk * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(dim=1)

    def forward(self, stage_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fused = self.fuse_maps(stage_maps)
        return fused, self.score(fused)
