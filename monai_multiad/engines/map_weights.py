"""Weights of the fused maps from synthetic anomalies: :func:`synthetic_map_weights`.

The fusion adds the maps of the student's stages, the memory bank and the segmentation head, each
counted in normal standard deviations. Which of them finds anomalies best depends on the data (the
memory bank leads on textures, the student's shallow stages on brain scans), and nothing labelled is
there to tell. The held-out normal images can be corrupted with the run's synthetic anomalies: each
map is then weighted by how well its maximum tells a corrupted image from its clean original (image
AUROC above chance). The segmentation head was trained on those very anomalies, so its own figure
says nothing about real ones: it keeps an equal share.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.metrics import compute_roc_auc

from monai_multiad.networks import MultiAD
from monai_multiad.transforms.anomaly import SyntheticAnomaly, corrupt_batch

__all__ = ["MIN_IMAGES", "synthetic_map_weights", "weights_from_separation"]

#: fewer held-out normal images than this give equal weights: an AUROC of a handful of images is noise
MIN_IMAGES = 8
#: the smallest weight of a map no better than chance (it stays in the fusion, nearly silent)
FLOOR = 1e-3


def weights_from_separation(aurocs: Sequence[float], fixed: int | None = None) -> torch.Tensor:
    """Weights (K,) summing to 1: map k's ``max(auroc_k - 0.5, FLOOR)``, normalised; map ``fixed`` (the
    segmentation head's) gets ``1 / K`` and the others share the rest."""
    k = len(aurocs)
    w = torch.tensor([max(float(a) - 0.5, FLOOR) for a in aurocs], dtype=torch.float64)
    if fixed is None:
        return (w / w.sum()).float()
    others = [i for i in range(k) if i != fixed]
    out = torch.empty(k, dtype=torch.float64)
    out[others] = w[others] / w[others].sum() * (k - 1) / k
    out[fixed] = 1.0 / k
    return out.float()


def _maxima(network: MultiAD, images: torch.Tensor) -> torch.Tensor:
    """Each map's maximum over each image (B, K, 1, 1), in the map's own unit."""
    return network.stage_maps(images).float().amax(dim=(2, 3), keepdim=True)


@torch.no_grad()
def synthetic_map_weights(network: MultiAD, batches: Sequence[torch.Tensor], anomaly: SyntheticAnomaly,
                          device: torch.device, foreground_threshold: float | None = None,
                          clean_maxima: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
    """Weights (K,) of ``network``'s maps from how well each one's maximum separates ``batches`` (held-out
    normal images, (B, C, H, W) in [0, 1], on the CPU) corrupted by ``anomaly`` from the same images clean;
    the fusion's statistics must be set. ``clean_maxima``: each map's maximum over each clean image (N, K, 1, 1),
    when the caller has them already (the fusion's fit does). Returns the weights and the per-map AUROCs
    (equal weights and an empty list when fewer than :data:`MIN_IMAGES` images received an anomaly)."""
    k = network.fusion.scale.numel()
    clean, corrupted = [], []
    for images in batches:
        bad, masks = corrupt_batch(images, anomaly, 1.0, foreground_threshold)
        has = masks.flatten(1).any(dim=1)
        if clean_maxima is None:
            clean.append(_maxima(network, images.to(device)).cpu())
        if bool(has.any()):
            corrupted.append(_maxima(network, bad[has].to(device)).cpu())
    if sum(c.shape[0] for c in corrupted) < MIN_IMAGES:
        return torch.full((k,), 1.0 / k), []
    # a map's unit is increasing in the map, so the maximum in it is the unit of the maximum
    fusion = network.fusion

    def units(maxima: torch.Tensor) -> torch.Tensor:
        return fusion.units(maxima.to(fusion.scale)).flatten(1).cpu()

    clean_max = units(torch.cat(clean) if clean_maxima is None else clean_maxima)
    bad_max = units(torch.cat(corrupted))
    labels = torch.cat([torch.zeros(clean_max.shape[0]), torch.ones(bad_max.shape[0])])
    aurocs = [float(compute_roc_auc(torch.cat([clean_max[:, i], bad_max[:, i]]), labels)) for i in range(k)]
    head = k - 1 if network.segmentation_head is not None else None
    return weights_from_separation(aurocs, fixed=head), aurocs
