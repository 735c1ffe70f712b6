"""The accuracy study's levers (RunConfig options): each does what its name says, checked by value."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from monai_multiad.config import RunConfig
from monai_multiad.engines.batchnorm import recalibrate_batchnorm, set_batchnorm_momentum
from monai_multiad.handlers import BatchNormRecalibration
from monai_multiad.engines.evaluator import fit_fusion
from monai_multiad.errors import MultiADInputError
from monai_multiad.losses import DistillationLoss, distillation_losses
from monai_multiad.networks import MultiAD
from monai_multiad.networks.foreground import ForegroundMask
from monai_multiad.networks.fusion import AnomalyMapFusion
from monai_multiad.workflow import build_network, build_optimizer, build_scheduler


def _tiny(**kw) -> MultiAD:
    torch.manual_seed(0)
    return MultiAD("resnet18", in_channels=1, pretrained=False, discriminator=False, **kw)


def test_batchnorm_recalibration_makes_eval_mode_match_train_mode():
    """The student-BN-lag bug: with momentum 0.01 the running statistics stay near their
    initial values, so eval mode computes another function; re-estimation removes the gap."""
    model = _tiny()
    student = model.student
    assert set_batchnorm_momentum(student, 0.01) > 0
    x = model.normalize(torch.rand(8, 1, 64, 64) * 0.5 + 0.5)
    student.train()
    with torch.no_grad():
        for _ in range(3):
            student(x)  # running stats move 1 % a step: still far from the batch's
        train_out = student(x)
    student.eval()
    with torch.no_grad():
        stale = student(x)
        gap_before = max(float((a - b).abs().mean() / b.abs().mean()) for a, b in zip(stale, train_out))
        used = recalibrate_batchnorm(student, [x], max_images=8)
        fixed = student(x)
    gap_after = max(float((a - b).abs().mean() / b.abs().mean()) for a, b in zip(fixed, train_out))
    assert used == 8
    assert not student.training  # mode restored
    assert all(m.momentum == 0.01 for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert gap_before > 0.2 and gap_after < 0.05 * gap_before, (gap_before, gap_after)


def test_batchnorm_recalibration_handler_uses_at_most_max_images():
    model = _tiny()
    batches = [{"image": torch.rand(4, 1, 64, 64)} for _ in range(5)]
    assert BatchNormRecalibration(model, batches, max_images=10)() == 10
    assert BatchNormRecalibration(model, batches, max_images=0)() == 0


def test_feature_norm_standardises_the_teachers_features():
    model = _tiny(feature_norm=True)
    x = torch.rand(6, 1, 64, 64)
    model.set_feature_statistics([x[:3], x[3:]])
    teacher, _ = model.features(x)
    for f in teacher:
        assert torch.allclose(f.mean(dim=(0, 2, 3)), torch.zeros(f.shape[1]), atol=1e-4)
        std = f.std(dim=(0, 2, 3), unbiased=False)
        live = std > 1e-3  # channels a ReLU kills everywhere stay 0
        assert torch.allclose(std[live], torch.ones(int(live.sum())), atol=1e-3)
    # the statistics are buffers: they travel with the state dict
    assert "feature_mean0" in model.state_dict() and "feature_std3" in model.state_dict()


def test_fusion_stages_topk_and_quantile_offsets_by_value():
    maps = torch.rand(2, 4, 16, 16)
    fusion = AnomalyMapFusion(4, sigma=0, stages=(2, 4), score_topk=0.1)
    fusion.set_statistics(torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.5, stage_offset=torch.tensor([0.0, 0.1, 0.0, 0.2]))
    fused, score = fusion(maps)
    expected = (((maps[:, 1] - 0.1) / 2.0).clamp_min(0) + ((maps[:, 3] - 0.2) / 4.0).clamp_min(0)) / 2
    assert torch.allclose(fused[:, 0], expected, atol=1e-6)
    k = round(0.1 * 256)
    assert torch.allclose(score, expected.flatten(1).topk(k, dim=1).values.mean(1), atol=1e-6)
    assert torch.allclose(AnomalyMapFusion(4, sigma=0)(maps)[1], maps.mean(1).flatten(1).amax(1))
    with pytest.raises(ValueError, match="stages"):
        AnomalyMapFusion(4, stages=(0, 5))


def test_fit_fusion_quantile_normalisation_matches_numpy():
    model = _tiny().eval()
    images = torch.rand(4, 1, 64, 64)
    stats = fit_fusion(model, [{"image": images}], normalization="quantile")
    with torch.no_grad():
        maps = model.stage_maps(images)[:, :, ::4, ::4].permute(1, 0, 2, 3).reshape(4, -1).numpy()
    import numpy as np

    lo, hi = np.quantile(maps, (0.9, 0.995), axis=1)
    assert np.allclose(stats["stage_offset"], lo, rtol=1e-5) and np.allclose(stats["stage_scale"], hi - lo, rtol=1e-5)
    with torch.no_grad():
        scores = model(images)[1].numpy()
    assert math.isclose(stats["threshold"], float(np.quantile(scores, 0.99)), rel_tol=1e-6)


def test_fit_fusion_zscore_normalisation_is_the_normal_mean_and_std():
    model = _tiny().eval()
    images = torch.rand(4, 1, 64, 64)
    stats = fit_fusion(model, [{"image": images[:3]}, {"image": images[3:]}], normalization="zscore")
    with torch.no_grad():
        maps = model.stage_maps(images).double()
    mean, std = maps.mean(dim=(0, 2, 3)), maps.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(torch.tensor(stats["stage_offset"], dtype=torch.double), mean, rtol=1e-5)
    assert torch.allclose(torch.tensor(stats["stage_scale"], dtype=torch.double), std, rtol=1e-4)
    # a pixel at its stage's normal mean scores 0; one standard deviation above it scores 1
    fusion = AnomalyMapFusion(4, sigma=0)
    fusion.set_statistics(torch.tensor(stats["stage_scale"]), 0.0, stage_offset=torch.tensor(stats["stage_offset"]))
    level = mean.float().view(1, 4, 1, 1).expand(1, 4, 8, 8)
    assert float(fusion.fuse_maps(level).abs().max()) < 1e-5
    assert torch.allclose(fusion.fuse_maps(level + std.float().view(1, 4, 1, 1)), torch.ones(1, 1, 8, 8), atol=1e-4)
    with pytest.raises(ValueError, match="zscore"):
        fit_fusion(model, [{"image": images}], normalization="median")


def test_foreground_mask_fills_holes_and_erodes_the_edge():
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    r = ((yy - 32) ** 2 + (xx - 32) ** 2).sqrt()
    image = ((r < 20) & (r > 5)).float()[None, None] * 0.8  # a ring: a dark "ventricle" inside the head
    mask = ForegroundMask(threshold=0.05, sigma=1.0, erode=3)(image)[0, 0]
    assert mask[32, 32] == 1  # the hole is inside
    assert mask[2, 2] == 0 and mask[32, 60] == 0  # background
    assert mask[32, 32 + 19] == 0 and mask[32, 32 + 14] == 1  # the edge is eroded, the inside kept


def test_foreground_option_zeroes_the_map_outside_the_body():
    model = _tiny(foreground=True).eval()
    image = torch.zeros(1, 1, 64, 64)
    image[..., 16:48, 16:48] = 0.7
    amap, score = model(image)
    assert float(amap[..., :8, :].abs().max()) == 0.0 and float(amap[..., 28:36, 28:36].min()) > 0
    assert math.isclose(float(score), float(amap.max()), rel_tol=1e-6)


def test_hard_mining_averages_the_hardest_positions_only():
    t = [torch.randn(2, 8, 10, 10)]
    s = [torch.randn(2, 8, 10, 10)]
    d = (1 - torch.nn.functional.cosine_similarity(t[0], s[0], dim=1)).flatten()
    assert torch.allclose(distillation_losses(t, s, 0.9)[0], d.topk(20).values.mean())
    assert torch.allclose(DistillationLoss((1.0,))(t, s), d.mean())


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = RunConfig(backbone="resnet18", pretrained="none", lr_schedule="cosine", lr=0.4, optimizer="sgd",
                    epochs=2, discriminator=False)
    net = build_network(cfg)
    opt = build_optimizer(cfg, net)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    sched = build_scheduler(cfg, opt, steps_per_epoch=50)  # 100 iterations, 5 of warm-up
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.4 / 5) and max(lrs) == pytest.approx(0.4)
    assert lrs[-1] < 0.001 and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert build_scheduler(RunConfig(), opt, 10) is None


def test_student_initialised_from_teacher_and_bn_momentum_set():
    cfg = RunConfig(backbone="resnet18", pretrained="none", student_init="teacher", bn_momentum=0.3,
                    discriminator=False)
    net = build_network(cfg)
    for (k, a), (_, b) in zip(net.student.net.state_dict().items(), net.teacher.net.state_dict().items()):
        assert torch.equal(a, b), k
    assert all(m.momentum == 0.3 for m in net.student.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("bad", [{"stages": [0]}, {"score_topk": 1.0}, {"hard_mining": -0.1}, {"bn_momentum": 0.0},
                                 {"map_normalization": "max"}, {"optimizer": "rmsprop"}, {"d_label_smoothing": 0.5},
                                 {"d_instance_noise": -1.0}, {"d_update_every": 0}])
def test_bad_lever_values_are_named(bad):
    with pytest.raises(MultiADInputError, match=next(iter(bad))):
        RunConfig(**bad)


def test_random_flips_flip_whole_images_only():
    from monai_multiad.engines.trainer import random_flips

    torch.manual_seed(0)
    x = torch.arange(16 * 4 * 4, dtype=torch.float32).view(16, 1, 4, 4)
    y = random_flips(x)
    seen = set()
    for a, b in zip(x, y):
        options = {"id": a, "lr": a.flip(-1), "ud": a.flip(-2), "both": a.flip(-1).flip(-2)}
        match = [k for k, v in options.items() if torch.equal(v, b)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) >= 3  # flips really happen, and not all alike


def test_loss_stage_weights_reach_the_trainers_loss():
    from monai_multiad.workflow import build_trainer

    cfg = RunConfig(backbone="resnet18", pretrained="none", discriminator=False, loss_stage_weights=[0, 2, 0, 1])
    net = build_network(cfg)
    trainer = build_trainer(cfg, net, [{"image": torch.rand(2, 3, 64, 64)}], torch.device("cpu"))
    t = [torch.randn(2, 4, 3, 3) for _ in range(4)]
    s = [torch.randn(2, 4, 3, 3) for _ in range(4)]
    per_stage = distillation_losses(t, s, cfg.hard_mining)  # hard mining 0.9 by default
    assert cfg.hard_mining == 0.9
    assert torch.allclose(trainer.distillation_loss(t, s), 2 * per_stage[1] + per_stage[3])
    with pytest.raises(MultiADInputError, match="loss_stage_weights"):
        RunConfig(loss_stage_weights=[1, 1])


def test_validation_loss_is_the_mean_distillation_loss_over_the_images():
    """The key metric that picks the best epoch and stops training early: the evaluator's val_loss
    equals DistillationLoss over the held-out images computed by hand, batch sizes weighted (Ignite
    unrolled the per-stage lists into one update per stage before skip_unrolling, a 4x smaller value)."""
    from torch.utils.data import DataLoader

    from monai_multiad.engines.evaluator import DistillationEvaluator

    torch.manual_seed(0)
    net = MultiAD("resnet18", pretrained=False, discriminator=False, in_channels=1)
    loader = DataLoader([{"image": torch.rand(1, 64, 64)} for _ in range(11)], batch_size=4)
    evaluator = DistillationEvaluator("cpu", loader, net)
    evaluator.run()
    net.eval()
    total = 0.0
    with torch.no_grad():
        for batch in loader:
            t, s = net.features(batch["image"])
            total += float(DistillationLoss()(t, s)) * len(batch["image"])
    assert evaluator.state.metrics["val_loss"] == pytest.approx(total / 11, rel=1e-5)


def test_discriminator_label_smoothing_and_instance_noise():
    """One-sided smoothing moves only the teacher's (real) target to 1 - e; instance noise reaches
    what the discriminator sees, in its loss and in the student's adversarial term."""
    from monai_multiad.losses import AdversarialLoss, DiscriminatorLoss, normalized

    seen = []

    def constant(x):  # a "discriminator" that records its input and answers logit 0 for every image
        seen.append(x)
        return torch.zeros(x.shape[0])

    t, s = torch.randn(3, 8, 2, 2), torch.randn(3, 8, 2, 2)
    bce0 = float(DiscriminatorLoss()(constant, t, s))
    assert bce0 == pytest.approx(math.log(2))  # logit 0 against 1 and 0: log 2 either way
    assert torch.equal(seen[-1], torch.cat([normalized(t), normalized(s)]))

    def confident(x):  # calls teacher features real with logit 10, student's fake with -10
        return torch.tensor([10.0] * 3 + [-10.0] * 3)

    smooth = float(DiscriminatorLoss(label_smoothing=0.2)(confident, t, s))
    expected = (0.8 * math.log1p(math.exp(-10)) + 0.2 * math.log1p(math.exp(10)) + math.log1p(math.exp(-10))) / 2
    assert smooth == pytest.approx(expected, rel=1e-5)
    assert float(DiscriminatorLoss()(confident, t, s)) < 1e-4
    torch.manual_seed(0)
    DiscriminatorLoss(instance_noise=0.5)(constant, t, s)
    noise = seen[-1] - torch.cat([normalized(t), normalized(s)])
    assert 0.4 < float(noise.std()) < 0.6
    AdversarialLoss(instance_noise=0.5)(constant, s)
    assert 0.4 < float((seen[-1] - normalized(s)).std()) < 0.6
    AdversarialLoss()(constant, s)
    assert torch.equal(seen[-1], normalized(s))


def test_spectral_norm_discriminator_has_unit_norm_layers_and_no_batchnorm():
    from monai_multiad.networks import FeatureDiscriminator

    torch.manual_seed(0)
    d = FeatureDiscriminator(16, channels=(8, 12), spectral_norm=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    d.train()
    for _ in range(30):  # the power iteration runs in train mode
        d(torch.randn(2, 16, 4, 4))
    d.eval()
    for layer in (d.features[0], d.features[3], d.fc):
        w = layer.weight.flatten(1)
        assert float(torch.linalg.matrix_norm(w, ord=2)) == pytest.approx(1.0, abs=0.02)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in FeatureDiscriminator(16, channels=(8,)).modules())
    net = build_network(RunConfig(backbone="resnet18", pretrained="none", discriminator=True,
                                  discriminator_spectral_norm=True))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.discriminator.modules())


def test_discriminator_updated_every_nth_iteration_only(tmp_path):
    from ignite.engine import Events

    from monai_multiad.handlers import EpochLog
    from monai_multiad.workflow import build_trainer

    cfg = RunConfig(backbone="resnet18", pretrained="none", discriminator=True, d_update_every=2,
                    d_label_smoothing=0.1, d_instance_noise=0.05, epochs=1)
    net = build_network(cfg)
    batch = {"image": torch.rand(2, 3, 64, 64)}
    trainer = build_trainer(cfg, net, [batch, batch, batch], torch.device("cpu"))
    assert trainer.discriminator_loss.label_smoothing == 0.1 and trainer.adversarial_loss.instance_noise == 0.05
    snapshots, d_losses = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: snapshots.append(net.discriminator.fc.weight.detach().clone()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: d_losses.append(e.state.output["discriminator"]))
    log = EpochLog(tmp_path)
    log.attach(trainer, SimpleNamespace(state=SimpleNamespace(metrics={"val_loss": 0.0})))
    before = net.discriminator.fc.weight.detach().clone()
    trainer.run()
    assert torch.equal(snapshots[0], before)  # iteration 1: not updated
    assert not torch.equal(snapshots[1], snapshots[0])  # iteration 2: updated
    assert torch.equal(snapshots[2], snapshots[1])  # iteration 3: not updated
    # the loss of the one update is the epoch's discriminator loss in log.csv, not a mean with the skipped zeros
    assert math.isnan(d_losses[0]) and math.isnan(d_losses[2]) and d_losses[1] > 0
    assert log.rows[0]["discriminator"] == pytest.approx(d_losses[1])
