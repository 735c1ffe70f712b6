"""The levers that give training a negative example or a second opinion, checked by value: the
denoising student (the student sees corrupted images, the teacher clean ones) and the memory bank
(PatchCore's k-NN map as one more map of the fusion)."""

from __future__ import annotations

import pytest
import torch

from monai_multiad.config import RunConfig
from monai_multiad.engines.evaluator import fit_fusion, fit_memory_bank
from monai_multiad.errors import MultiADInputError
from monai_multiad.networks import MultiAD
from monai_multiad.networks.memory_bank import MemoryBank, greedy_coreset
from monai_multiad.transforms.anomaly import SyntheticAnomaly, corrupt_batch
from monai_multiad.workflow import build_network, build_trainer


def test_corrupt_batch_corrupts_the_asked_share_and_masks_what_changed():
    x = torch.rand(64, 1, 32, 32) * 0.6 + 0.2
    for fraction, low, high in ((0.0, 0, 0), (0.5, 20, 44), (1.0, 64, 64)):
        y, m = corrupt_batch(x, SyntheticAnomaly(("texture", "hyper"), seed=0), fraction)
        corrupted = (m.flatten(1).sum(1) > 0).sum()
        assert low <= int(corrupted) <= high, fraction
        assert torch.equal((y != x).any(1, keepdim=True), m.bool())
    assert torch.equal(x, x.clone())


def test_denoising_student_sees_the_corrupted_image_and_the_teacher_the_clean_one():
    cfg = RunConfig(backbone="resnet18", pretrained="none", discriminator=False, denoise_fraction=1.0,
                    synthetic_anomalies=["hyper"], epochs=1)
    net = build_network(cfg)
    images = torch.rand(2, 3, 64, 64) * 0.5
    seen = {}
    net.teacher.register_forward_hook(lambda m, i, o: seen.__setitem__("teacher", i[0].clone()))
    net.student.register_forward_hook(lambda m, i, o: seen.__setitem__("student", i[0].clone()))
    trainer = build_trainer(cfg, net, [{"image": images}], torch.device("cpu"))
    assert trainer.denoise_fraction == 1.0 and trainer.anomaly.modes == ("hyper",)
    trainer.run()
    assert torch.allclose(seen["teacher"], net.normalize(images))
    brighter = seen["student"] - seen["teacher"]
    assert (brighter > 1e-4).any() and not (brighter < -1e-4).any()  # hyper: only brighter regions
    # switched off (the paper's student): both see the same image
    cfg0 = RunConfig(backbone="resnet18", pretrained="none", discriminator=False, epochs=1, denoise_fraction=0.0)
    net0 = build_network(cfg0)
    net0.teacher.register_forward_hook(lambda m, i, o: seen.__setitem__("teacher", i[0].clone()))
    net0.student.register_forward_hook(lambda m, i, o: seen.__setitem__("student", i[0].clone()))
    build_trainer(cfg0, net0, [{"image": images}], torch.device("cpu")).run()
    assert torch.equal(seen["teacher"], seen["student"])


@pytest.mark.parametrize("bad", [{"denoise_fraction": 1.5}, {"synthetic_anomalies": ["blob"]}, {"memory_bank": -1}])
def test_bad_synthetic_lever_values_are_named(bad):
    with pytest.raises(MultiADInputError, match=next(iter(bad))):
        RunConfig(**bad)


def test_greedy_coreset_picks_the_far_points():
    g = torch.Generator().manual_seed(0)
    cluster = torch.randn(200, 4, generator=g) * 0.01
    outliers = torch.tensor([[10.0, 0, 0, 0], [0, -10.0, 0, 0], [0, 0, 10.0, 0]])
    points = torch.cat([cluster, outliers])
    chosen = set(greedy_coreset(points, 4, g).tolist())
    assert {200, 201, 202} <= chosen


def test_memory_bank_map_is_the_distance_to_the_nearest_normal_feature():
    """Features equal to a normal one score 0; the map is the Euclidean distance of the standardised
    features to the nearest bank entry, computed here by brute force."""
    torch.manual_seed(0)
    bank = MemoryBank((4, 6, 8, 10), size=50, stages=(2, 3), pool=1)
    # stage grids 16, 8, 4, 2 for the four channels; the bank uses stages 2 (8x8) and 3 (4x4)
    normal = [[torch.randn(3, c, s, s) for c, s in zip((4, 6, 8, 10), (16, 8, 4, 2))]]
    assert bank.fit(normal) == 50 and int(bank.filled) == 50
    query = [f[:1] for f in normal[0]]
    d = bank(query)
    assert d.shape == (1, 1, 8, 8)
    feats = bank.aggregate(query)[0].permute(1, 2, 0).reshape(-1, 14)
    brute = torch.cdist(feats, bank.bank).amin(1).view(8, 8)
    assert torch.allclose(d[0, 0], brute, atol=1e-3)
    assert float(d.min()) < 1e-2  # some query positions are bank entries themselves
    far = [f[:1] + 50.0 for f in normal[0]]
    assert float(bank(far).min()) > float(d.max())


def test_memory_bank_joins_the_fusion_and_survives_a_save():
    torch.manual_seed(0)
    kwargs = dict(backbone="resnet18", in_channels=1, pretrained=False, discriminator=False, memory_bank=32)
    net = MultiAD(**kwargs).eval()
    x = torch.rand(4, 1, 64, 64)
    assert net.fusion.num_stages == 5 and net.fusion.stages == (1, 2, 3, 4, 5)
    assert fit_memory_bank(net, [{"image": x}]) == 32
    stats = fit_fusion(net, [{"image": x}], normalization="zscore")
    assert len(stats["stage_offset"]) == 5
    with torch.no_grad():
        maps = net.stage_maps(x)
        fused, score = net(x)
        assert maps.shape == (4, 5, 64, 64)
        assert torch.allclose(fused, net.fusion.fuse_maps(maps), atol=1e-5)
        again = MultiAD(**kwargs)
        again.load_state_dict(net.state_dict())
        assert torch.allclose(again.eval()(x)[1], score)
    assert fit_memory_bank(MultiAD(**{**kwargs, "memory_bank": 0}), [{"image": x}]) == 0
    assert RunConfig(memory_bank=32).model_kwargs()["memory_bank"] == 32


def test_segmentation_head_learns_to_draw_synthetic_masks_and_joins_the_fusion():
    """A few steps on one batch of anomalies lower the head's loss; its logit map is the fusion's last map."""
    from monai_multiad.engines.head_trainer import SegmentationHeadTrainer
    from monai_multiad.losses import SegmentationLoss

    torch.manual_seed(0)
    net = MultiAD("resnet18", in_channels=1, pretrained=False, discriminator=False, segmentation_head=True)
    assert net.fusion.num_stages == 5
    images = torch.rand(4, 1, 64, 64) * 0.5 + 0.25
    student_before = [p.detach().clone() for p in net.student.parameters()]
    losses = []
    anomaly = SyntheticAnomaly("hyper", seed=0)
    trainer = SegmentationHeadTrainer("cpu", 15, [{"image": images}], net,
                                      torch.optim.Adam(net.segmentation_head.parameters(), lr=1e-2), anomaly, 1.0)
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["segmentation"]))
    trainer.run()
    assert len(losses) == 15 and sum(losses[-3:]) < sum(losses[:3])
    assert all(torch.equal(a, b) for a, b in zip(student_before, net.student.parameters()))  # frozen
    with torch.no_grad():
        net.eval()
        t, s = net.features(images)
        maps = net.stage_maps(images)
        head = torch.nn.functional.interpolate(net.segmentation_head(t, s), size=(64, 64), mode="bilinear",
                                               align_corners=False)
        assert torch.allclose(maps[:, -1:], head, atol=1e-5)
    loss = SegmentationLoss()
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :2] = 1.0
    assert float(loss(torch.full_like(target, 20.0) * (2 * target - 1), target)) < 1e-3  # right and sure: ~0
    assert float(loss(torch.full_like(target, -20.0) * (2 * target - 1), target)) > 1.0  # wrong and sure


def test_segmentation_head_steps_option_builds_and_trains_the_head():
    from monai_multiad.workflow import train_segmentation_head

    cfg = RunConfig(backbone="resnet18", pretrained="none", discriminator=False, segmentation_head_steps=3,
                    batch_size=2, synthetic_anomalies=["texture"], in_channels=1)
    net = build_network(cfg)
    assert net.segmentation_head is not None
    ds = [{"image": torch.rand(1, 64, 64)} for _ in range(5)]
    assert isinstance(train_segmentation_head(cfg, net, ds, torch.device("cpu")), float)
    assert train_segmentation_head(RunConfig(), MultiAD("resnet18", pretrained=False, discriminator=False),
                                   ds, torch.device("cpu")) is None
