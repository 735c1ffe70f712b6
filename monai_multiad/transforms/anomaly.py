"""Synthetic anomalies: a corrupted normal image and the mask of where it was corrupted.

A detector trained on normal images alone never sees what it has to find. The field's answer
(DRAEM, DeSTSeg, SuperSimpleNet) is to make anomalies: a Perlin-noise mask marks a region of a
normal image, and the region is blended with another content. Here the content comes from
nothing the user must download:

``"texture"``
    the image itself, flipped, rotated and through one intensity operation, mixed with a
    Perlin texture (a self-sourced texture; DRAEM draws from a texture data set instead);
``"hyper"`` / ``"hypo"``
    the region made brighter or darker (hyper- and hypo-intense lesions of brain MRI);
``"patch"``
    the same region of another normal image or slice (Foreign Patch Interpolation); without a
    ``source`` the image's own mirror image is used.

The blend follows DRAEM: ``x' = x (1 - m) + (1 - b) src m + b x m`` with ``b ~ U(0, b_max)``.
The returned mask is where the image changed, and nowhere else. For scans, ``foreground``
keeps the anomaly inside the body or head.
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import convert_to_tensor

from monai_multiad.errors import input_error

__all__ = ["ANOMALY_MODES", "SyntheticAnomaly", "corrupt_batch", "SyntheticAnomalyd", "SyntheticAnomalyD", "SyntheticAnomalyDict",
           "perlin_noise", "perlin_mask"]

ANOMALY_MODES = ("texture", "hyper", "hypo", "patch")


def perlin_noise(shape: Sequence[int], res: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """2D gradient (Perlin) noise of ``shape`` on a ``res`` lattice; values roughly in ``[-1, 1]``."""
    h, w = int(shape[0]), int(shape[1])
    ry, rx = int(res[0]), int(res[1])
    angles = torch.rand(ry + 1, rx + 1, generator=generator) * (2 * math.pi)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], -1)
    yy, xx = torch.meshgrid(torch.arange(h) * (ry / h), torch.arange(w) * (rx / w), indexing="ij")
    y0, x0 = yy.floor().long(), xx.floor().long()
    fy, fx = yy - y0, xx - x0

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grads[(y0 + dy).clamp_max(ry), (x0 + dx).clamp_max(rx)]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - v) + corner(0, 1) * v
    bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
    return math.sqrt(2.0) * (top * (1 - u) + bottom * u)


def _rotate(img: torch.Tensor, degrees: float) -> torch.Tensor:
    """``img`` ``(C, H, W)`` rotated about its centre, borders reflected."""
    t = math.radians(degrees)
    theta = torch.tensor([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]], dtype=img.dtype)
    grid = F.affine_grid(theta[None], [1, *img.shape], align_corners=False)
    return F.grid_sample(img[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


def perlin_mask(shape: Sequence[int], generator: torch.Generator, threshold: float = 0.5, max_octave: int = 5,
                rotate: bool = True, tries: int = 10) -> torch.Tensor:
    """A binary ``(H, W)`` mask where rotated Perlin noise at scale ``2**k`` (``k`` in 0..max_octave per axis)
    exceeds ``threshold`` (DRAEM's recipe). Drawn again, up to ``tries`` times, while empty."""
    h, w = int(shape[0]), int(shape[1])
    mask = torch.zeros(h, w)
    for _ in range(tries):
        ky, kx = (int(k) for k in torch.randint(0, max_octave + 1, (2,), generator=generator))
        ry, rx = min(2 ** ky, h), min(2 ** kx, w)
        noise = perlin_noise((h, w), (ry, rx), generator)
        if rotate:
            noise = _rotate(noise[None], float(torch.empty(1).uniform_(-90, 90, generator=generator)))[0]
        mask = (noise > threshold).float()
        if mask.any():
            break
    return mask


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def _intensity_op(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One of DRAEM's intensity operations, on ``[0, 1]`` values."""
    op = int(torch.randint(0, 5, (1,), generator=generator))
    if op == 0:
        return 1.0 - x
    if op == 1:
        return x.clamp(0, 1) ** _uniform(generator, 0.5, 2.0)
    if op == 2:
        mean = x.mean()
        return ((x - mean) * _uniform(generator, 0.5, 2.0) + mean).clamp(0, 1)
    if op == 3:
        return (x + _uniform(generator, -0.4, 0.4)).clamp(0, 1)
    return (x * 0 + x.mean()).clamp(0, 1)  # flattened: the texture wiped out


class SyntheticAnomaly(Randomizable, Transform):
    """Corrupt a normal image ``(C, H, W)`` in ``[0, 1]`` inside a Perlin mask; returns ``(image, mask)``.

    Args:
        modes: the kinds of anomaly to draw from, one per call (see the module's docstring).
        prob: chance that an image is corrupted at all; otherwise it comes back unchanged with an
            empty mask (a training batch needs normal examples too).
        threshold: Perlin threshold of the mask (0.5 in DRAEM; larger gives smaller regions).
        max_octave: the coarsest noise has ``2**0`` cells per axis, the finest ``2**max_octave``.
        beta_max: the largest share ``b`` of the original kept inside the mask (0.8 in DRAEM).
        intensity: the range of the brightness change of ``"hyper"``/``"hypo"``.
        seed: seed of the transform's own generator (MONAI's ``set_random_state`` also works).

    ``__call__(img, source=None, foreground=None)``: ``source`` is another normal image of the
    same shape for ``"patch"``; ``foreground`` a boolean ``(H, W)`` or ``(1, H, W)`` mask the anomaly
    must stay inside (the body or head of a scan).
    """

    def __init__(self, modes: Sequence[str] = ("texture",), prob: float = 1.0, threshold: float = 0.5,
                 max_octave: int = 5, beta_max: float = 0.8, intensity: tuple[float, float] = (0.2, 0.5),
                 seed: int | None = 0) -> None:
        modes = (modes,) if isinstance(modes, str) else tuple(modes)
        unknown = [m for m in modes if m not in ANOMALY_MODES]
        if not modes or unknown:
            raise input_error(None, f"synthetic anomaly modes {unknown or list(modes)}: choose from {list(ANOMALY_MODES)}")
        if not 0.0 <= beta_max < 1.0:
            raise input_error(None, f"synthetic anomaly beta_max {beta_max}: must be in [0, 1)")
        self.modes, self.prob, self.threshold, self.max_octave = modes, float(prob), float(threshold), int(max_octave)
        self.beta_max, self.intensity = float(beta_max), (float(intensity[0]), float(intensity[1]))
        self.generator = torch.Generator()
        self.set_random_state(seed)

    def set_random_state(self, seed: int | None = None, state=None) -> "SyntheticAnomaly":
        super().set_random_state(seed, state)
        self.generator.manual_seed(int(self.R.randint(0, 2 ** 31 - 1)) if seed is None else int(seed))
        return self

    def randomize(self, data: Any = None) -> None:  # the draws happen in __call__, from self.generator
        pass

    def _source(self, mode: str, x: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        g = self.generator
        if mode == "patch":
            return source if source is not None else torch.flip(x, dims=(-1,))
        if mode in ("hyper", "hypo"):
            delta = _uniform(g, *self.intensity)
            return (x + delta).clamp(0, 1) if mode == "hyper" else (x - delta).clamp(0, 1)
        # texture: the image itself, moved and through an intensity operation, mixed with Perlin texture
        src = torch.rot90(x, int(torch.randint(0, 4, (1,), generator=g)), dims=(-2, -1))
        if torch.rand(1, generator=g) < 0.5:
            src = torch.flip(src, dims=(-1,))
        src = _intensity_op(src, g)
        k = 2 ** int(torch.randint(2, self.max_octave + 2, (1,), generator=g))
        noise = (perlin_noise(x.shape[-2:], (min(k, x.shape[-2]), min(k, x.shape[-1])), g) + 1) / 2
        a = _uniform(g, 0.0, 1.0)
        return (a * noise.clamp(0, 1).expand_as(src) + (1 - a) * src).clamp(0, 1)

    def __call__(self, img: Any, source: Any = None, foreground: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        if x.ndim != 3:
            raise input_error(None, f"synthetic anomaly: expected an image (C, H, W), got shape {tuple(x.shape)}")
        src_img = None
        if source is not None:
            src_img = convert_to_tensor(source, track_meta=False, dtype=torch.float32)
            if src_img.shape != x.shape:
                raise input_error(None, f"synthetic anomaly: source shape {tuple(src_img.shape)} differs from the "
                                        f"image's {tuple(x.shape)}")
        empty = torch.zeros(1, *x.shape[-2:])
        if float(torch.rand(1, generator=self.generator)) >= self.prob:
            return x.clone(), empty
        mode = self.modes[int(torch.randint(0, len(self.modes), (1,), generator=self.generator))]
        m = perlin_mask(x.shape[-2:], self.generator, self.threshold, self.max_octave)[None]
        if foreground is not None:
            fg = convert_to_tensor(foreground, track_meta=False).bool().reshape(1, *x.shape[-2:])
            m = m * fg
        src = self._source(mode, x, src_img)
        beta = _uniform(self.generator, 0.0, self.beta_max)
        out = x + (1.0 - beta) * m * (src - x)  # = x(1-m) + (1-b) src m + b x m
        changed = ((out - x).abs() > 1e-6).any(0, keepdim=True).float()
        return torch.where(changed > 0, out, x), changed


class SyntheticAnomalyd(MapTransform, Randomizable):
    """Dictionary form of :class:`SyntheticAnomaly`: corrupts ``keys`` and writes the mask to ``mask_key``.

    Args:
        keys: image keys (the first one's change defines the mask; use one key).
        mask_key: where the mask ``(1, H, W)`` goes.
        source_key: optional key of another normal image, for ``"patch"``.
        foreground_key: optional key of a foreground mask the anomaly stays inside.
        other arguments: as in :class:`SyntheticAnomaly`.
    """

    def __init__(self, keys: KeysCollection, mask_key: str = "anomaly_mask", source_key: str | None = None,
                 foreground_key: str | None = None, allow_missing_keys: bool = False, **kwargs: Any) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transform = SyntheticAnomaly(**kwargs)
        self.mask_key, self.source_key, self.foreground_key = mask_key, source_key, foreground_key

    def set_random_state(self, seed: int | None = None, state=None) -> "SyntheticAnomalyd":
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key], d[self.mask_key] = self.transform(
                d[key], source=d.get(self.source_key) if self.source_key else None,
                foreground=d.get(self.foreground_key) if self.foreground_key else None)
        return d


SyntheticAnomalyD = SyntheticAnomalyDict = SyntheticAnomalyd


def corrupt_batch(images: torch.Tensor, transform: SyntheticAnomaly, fraction: float,
                  foreground_threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch ``(B, C, H, W)`` with a ``fraction`` of its images corrupted by ``transform``, and the masks
    ``(B, 1, H, W)``; the ``"patch"`` source of image i is image i + 1 of the batch. With
    ``foreground_threshold`` the anomalies stay where the image's mean intensity is above it (the body or
    head of a scan). Which images are corrupted is drawn from the transform's generator."""
    out, masks = images.clone(), torch.zeros(images.shape[0], 1, *images.shape[-2:], device=images.device)
    if fraction <= 0:
        return out, masks
    cpu = images.detach().float().cpu()
    for i in range(cpu.shape[0]):
        if float(torch.rand(1, generator=transform.generator)) >= fraction:
            continue
        fg = cpu[i].mean(0) > foreground_threshold if foreground_threshold is not None else None
        y, m = transform(cpu[i], source=cpu[(i + 1) % cpu.shape[0]] if cpu.shape[0] > 1 else None, foreground=fg)
        out[i] = y.to(out)
        masks[i] = m.to(masks)
    return out, masks
