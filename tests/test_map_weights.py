"""The fused maps weighted by how well each separates synthetic anomalies on held-out normals: the weights
follow the separation, the segmentation head keeps an equal share, and the weighting is folded into the
fusion's scales so the model keeps its shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monai_multiad.engines.evaluator import fit_fusion
from monai_multiad.engines.map_weights import MIN_IMAGES, synthetic_map_weights, weights_from_separation
from monai_multiad.networks import MultiAD
from monai_multiad.networks.fusion import AnomalyMapFusion
from monai_multiad.transforms.anomaly import SyntheticAnomaly


def test_weights_follow_the_separation_above_chance_and_the_head_keeps_its_share():
    w = weights_from_separation([0.9, 0.5, 0.7, 0.99])
    assert float(w.sum()) == pytest.approx(1.0)
    assert float(w[0] / w[2]) == pytest.approx(0.4 / 0.2, rel=1e-4)  # (0.9 - 0.5) against (0.7 - 0.5)
    assert float(w[1]) < 0.01  # no better than chance: nearly silent, not dropped
    head = weights_from_separation([0.9, 0.5, 0.7, 0.99], fixed=3)
    assert float(head[3]) == pytest.approx(0.25) and float(head.sum()) == pytest.approx(1.0)
    assert float(head[0] / head[2]) == pytest.approx(2.0, rel=1e-4)


class _TwoMaps(nn.Module):
    """Map 0 is where the image left its clean value (0.5): it finds every synthetic anomaly; map 1 is noise."""

    def __init__(self):
        super().__init__()
        self.fusion = AnomalyMapFusion(2, sigma=0)
        self.segmentation_head = None
        self.noise = torch.Generator().manual_seed(0)

    def stage_maps(self, x):
        return torch.cat([(x - 0.5).abs().mean(1, keepdim=True),
                          torch.rand(x.shape[0], 1, *x.shape[-2:], generator=self.noise)], dim=1)


def test_the_map_that_finds_the_synthetic_anomalies_gets_the_weight():
    net = _TwoMaps()
    batches = [torch.full((8, 1, 32, 32), 0.5) for _ in range(2)]
    w, aurocs = synthetic_map_weights(net, batches, SyntheticAnomaly(["hyper"], seed=0), torch.device("cpu"))
    assert aurocs[0] == pytest.approx(1.0) and abs(aurocs[1] - 0.5) < 0.3
    assert float(w[0]) > 0.5 > float(w[1])
    # too few images for an AUROC: equal weights, no separation reported
    w, aurocs = synthetic_map_weights(net, [batches[0][: MIN_IMAGES - 1]], SyntheticAnomaly(["hyper"], seed=0),
                                      torch.device("cpu"))
    assert torch.equal(w, torch.full((2,), 0.5)) and aurocs == []


def test_fit_fusion_folds_the_weights_into_the_scales():
    torch.manual_seed(0)
    tiny_model = MultiAD("resnet18", in_channels=1, pretrained=False, discriminator=False).eval()
    images = torch.rand(12, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    loader = [{"image": images[:6]}, {"image": images[6:]}]
    equal = fit_fusion(tiny_model, loader, normalization="zscore")
    assert equal["map_weights"] == [0.25] * 4 and equal["map_separation"] == []
    weighted = fit_fusion(tiny_model, loader, normalization="zscore", weights="synthetic",
                          anomaly=SyntheticAnomaly(["hyper"], seed=0))
    w = torch.tensor(weighted["map_weights"])
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-3) and len(weighted["map_separation"]) == 4
    assert weighted["stage_offset"] == equal["stage_offset"]
    expected = torch.tensor(equal["stage_scale"]) / (4 * w)
    assert torch.allclose(torch.tensor(weighted["stage_scale"]), expected, rtol=1e-3)
    assert torch.allclose(tiny_model.fusion.scale, torch.tensor(weighted["stage_scale"]))
    with pytest.raises(ValueError, match="synthetic"):
        fit_fusion(tiny_model, loader, weights="learned")
