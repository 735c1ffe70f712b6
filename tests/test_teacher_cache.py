"""The teacher's features cached across epochs: the same features, the teacher run only on images not seen
yet, memory bounded; a run trained with the cache equals one trained without it to float rounding (the
teacher's features of an image computed in another batch may differ in their last bits)."""

from __future__ import annotations

import csv

import pytest
import torch

from monai_multiad.engines.teacher_cache import TeacherFeatureCache


def _teacher(calls: list):
    def compute(x: torch.Tensor) -> list[torch.Tensor]:
        calls.append(x.shape[0])
        return [x.mean(dim=1, keepdim=True) * 2, x[:, :, ::2, ::2] + 1]

    return compute


def test_cached_features_equal_computed_ones_and_only_new_images_are_computed():
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    keys = [f"img{i}" for i in range(6)]
    calls: list = []
    cache = TeacherFeatureCache(max_bytes=1 << 20)
    first = cache.features(keys[:4], images[:4], _teacher(calls))
    mixed = cache.features([keys[5], keys[1], keys[4], keys[3]], images[[5, 1, 4, 3]], _teacher(calls))
    again = cache.features(keys[:4], images[:4], _teacher(calls))
    assert calls == [4, 2]  # the second batch computed its two new images only, the third none
    expected = _teacher([])(images[[5, 1, 4, 3]])
    for got, want in zip(mixed, expected):
        assert torch.equal(got, want)
    for got, want in zip(again, first):
        assert torch.equal(got, want)
    assert len(cache) == 6 and (cache.hits, cache.misses) == (6, 6)


def test_memory_stays_within_the_budget():
    images = torch.rand(4, 1, 8, 8)
    per_image = (64 + 16) * 4  # two stages of float32: 8x8 and 4x4
    cache = TeacherFeatureCache(max_bytes=2 * per_image + 10)
    calls: list = []
    cache.features(list("abcd"), images, _teacher(calls))
    assert len(cache) == 2 and cache.nbytes == 2 * per_image
    out = cache.features(list("dcba"), images.flip(0), _teacher(calls))
    assert calls == [4, 2]  # c and d were not held: computed again
    for got, want in zip(out, _teacher([])(images.flip(0))):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="keys"):
        cache.features(["a"], images, _teacher(calls))


def test_training_with_the_cache_equals_training_without(tmp_path):
    from monai_multiad import workflow
    from monai_multiad.config import RunConfig
    from monai_multiad.data.synthetic_images import write_mvtec_dataset

    data = write_mvtec_dataset(tmp_path / "data", n_train=12, n_test_good=2, n_test_defect=2, size=32, channels=3,
                               seed=0)
    summaries = {}
    for cache_mb in (0, 64):
        cfg = RunConfig(dataset_dir=str(data), image_size=32, backbone="resnet18", pretrained="none", batch_size=4,
                        epochs=3, early_stop_patience=0, device="cpu", stages=[1, 2], memory_bank=0,
                        segmentation_head_steps=0, bn_recalibrate=0, seed=0, teacher_cache_mb=cache_mb)
        summaries[cache_mb] = workflow.train(cfg, tmp_path / f"run{cache_mb}", progress=False)
    # filled once at the start: every training image computed once, then read in each of the 3 epochs
    summary = summaries[64]["teacher_cache"]
    assert summary["misses"] == summary["images"] > 0 and summary["hits"] == 3 * summary["images"]
    assert summaries[0]["teacher_cache"] is None
    # the same training, compared through each epoch's validation loss: the teacher's features of an image
    # computed in another batch differ in their last bits, which Adam and hard mining (a top-10 % selection)
    # turn into differences of a few tenths of a percent over these 3 epochs of a tiny random network
    curves = [[float(r["val_loss"]) for r in csv.DictReader((tmp_path / f"run{mb}" / "log.csv").open())] for mb in (0, 64)]
    assert len(curves[0]) == len(curves[1]) == 3
    assert curves[1][0] == pytest.approx(curves[0][0], rel=1e-4)  # after the first epoch they still agree closely
    assert curves[1] == pytest.approx(curves[0], rel=1e-2)
