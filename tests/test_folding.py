"""BatchNorm folded into the convolutions for inference: same maps and scores, no BatchNorm left,
and a folded network can be neither trained nor saved."""

import copy

import pytest
import torch
from torch import nn

from monai_multiad.config import RunConfig
from monai_multiad.networks import MultiAD
from monai_multiad.networks.folding import count_batchnorm, fold_batchnorm
from monai_multiad.run_folder import load_model, save_model


def _scramble_batchnorm(module: nn.Module, seed: int) -> None:
    """Running statistics and affine parameters far from the identity, so that folding them matters."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18", "se_resnet50"])
def test_folded_network_gives_the_same_maps(backbone):
    """Folded features and maps are as close to a float64 run of the unfolded network as the unfolded
    float32 ones are (random deep networks with scrambled statistics magnify rounding; folding must
    add no more than rounding to it)."""
    torch.manual_seed(0)
    model = MultiAD(backbone, in_channels=3, pretrained=backbone == "efficientnet_lite0", discriminator=False)
    _scramble_batchnorm(model.student, 1)  # the teacher: Lite0's ImageNet statistics, or the defaults
    model.fusion.set_statistics(torch.tensor([0.3, 0.2, 0.1, 0.05]), 1.0, torch.tensor([0.1, 0.1, 0.05, 0.02]))
    model.eval()
    exact = copy.deepcopy(model).double()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        amap, score = model(x)
        feats = sum(model.features(x), [])
        amap64, _ = exact(x.double())
        feats64 = sum(exact.features(x.double()), [])
    before = (count_batchnorm(model.teacher), count_batchnorm(model.student))
    assert min(before) > 0
    model.fold_batchnorm_()
    assert model.batchnorm_folded and count_batchnorm(model.teacher) == count_batchnorm(model.student) == 0
    with torch.no_grad():
        amap_f, score_f = model(x)
        feats_f = sum(model.features(x), [])

    def close(ours, plain, exact64):
        err_plain = (plain.double() - exact64).abs().max()
        return (ours.double() - exact64).abs().max() <= 2 * err_plain + 1e-6 * exact64.abs().max()

    assert all(close(f, p, e) for f, p, e in zip(feats_f, feats, feats64))
    assert amap.std() > 0 and close(amap_f, amap, amap64)
    assert torch.allclose(score_f, score, rtol=1e-4)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_folded_network_cannot_be_trained_or_saved(tmp_path):
    model = MultiAD("resnet18", pretrained=False, discriminator=False).fold_batchnorm_()
    model.eval()  # eval stays allowed
    with pytest.raises(RuntimeError, match="folded for inference"):
        model.train()
    with pytest.raises(ValueError, match="cannot be saved"):
        save_model(tmp_path / "model.pt", model, RunConfig(backbone="resnet18"))
    assert not (tmp_path / "model.pt").exists()


def test_untraceable_module_is_left_unfolded():
    class Branchy(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if bool(y.sum() > 0) else -y

    net = Branchy().train()
    _scramble_batchnorm(net, 0)
    folded = fold_batchnorm(net)
    assert folded is not net and count_batchnorm(folded) == 1 and not folded.training
    assert net.training  # the given module is left as it was
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(folded(x), net.eval()(x))


def test_load_model_folds_on_request(tmp_path):
    torch.manual_seed(0)
    cfg = RunConfig(backbone="resnet18", pretrained="none", image_size=64)
    model = MultiAD(**{**cfg.model_kwargs(), "pretrained": False})
    _scramble_batchnorm(model.student, 4)
    save_model(tmp_path / "model.pt", model, cfg)
    plain, _, _ = load_model(tmp_path)
    folded, _, _ = load_model(tmp_path, fold_batchnorm=True)
    assert not plain.batchnorm_folded and folded.batchnorm_folded and count_batchnorm(folded.student) == 0
    # placed as a run places it: channels-last on the CPU, after folding
    conv = next(m for m in folded.teacher.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, cfg.in_channels, 64, 64)
    with torch.no_grad():
        (m0, s0), (m1, s1) = plain(x), folded(x)
    assert (m0 - m1).abs().max() <= 1e-5 * m0.abs().max() and torch.allclose(s0, s1, rtol=1e-5)


def test_activations_work_in_place_only_where_nothing_else_reads_their_input():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6()
            self.conv2, self.act2 = nn.Conv2d(4, 4, 1), nn.ReLU()

        def forward(self, x):
            y = self.act1(self.bn1(self.conv1(x)))  # conv -> (folded) BN -> ReLU6: its input read once
            z = self.conv2(y)
            return self.act2(z) + z  # z is read twice: its ReLU must not overwrite it

    net = Net().eval()
    _scramble_batchnorm(net, 5)
    folded = fold_batchnorm(net)
    assert folded.act1.inplace and not folded.act2.inplace
    assert not net.act1.inplace  # the original network is untouched
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-6)
    lite0 = fold_batchnorm(MultiAD("efficientnet_lite0", pretrained=False, discriminator=False).teacher)
    assert all(m.inplace for m in lite0.modules() if isinstance(m, nn.ReLU6))
