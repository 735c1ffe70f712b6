"""Tests for monai_multiad.metrics against scikit-learn and exact reference implementations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from monai_multiad.metrics import (
    AUPRO,
    F1Max,
    ImageAUROC,
    PixelAUROC,
    aupro,
    f1_max,
    image_auroc,
    pixel_auroc,
)

from _reference import AUPRO_TOL, PIXEL_AUROC_TOL, exact_aupro

# the binning error on these small (4e3-3e4 pixel) synthetic sets, some of mixed sign or on a fixed
# range from 0, which get coarser bins (see the monai_multiad.metrics docstring): measured up to 1.02e-5
SYNTHETIC_AUROC_TOL = 2e-5


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _blob_masks(rng: np.random.Generator, b: int, h: int, w: int, blobs: int = 3) -> np.ndarray:
    """(B, H, W) bool masks with a few random discs per image (last image left normal)."""
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((b, h, w), dtype=bool)
    for i in range(b - 1):
        for _ in range(rng.integers(1, blobs + 1)):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, 7)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    return masks


# ----------------------------------------------------------------------------- image level


@pytest.mark.parametrize("ties", [False, True])
def test_image_auroc_matches_sklearn(rng, ties):
    for _ in range(5):
        labels = rng.random(300) < 0.3
        scores = rng.normal(size=300) + labels * 0.8
        if ties:
            scores = np.round(scores * 2) / 2
        metric = ImageAUROC()
        for s, lab in zip(np.array_split(scores, 7), np.array_split(labels, 7)):
            metric.update((torch.from_numpy(s).float(), torch.from_numpy(lab)))
        assert metric.compute() == pytest.approx(roc_auc_score(labels, scores.astype(np.float32)), abs=1e-12)
        assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_f1_max_matches_brute_force(rng):
    for ties in (False, True):
        labels = rng.random(200) < 0.4
        scores = rng.normal(size=200) + labels
        if ties:
            scores = np.round(scores)
        best, best_t = -1.0, None
        for t in np.unique(scores)[::-1]:  # descending: keeps the largest threshold among equal F1
            pred = scores >= t
            tp = (pred & labels).sum()
            prec, rec = tp / pred.sum(), tp / labels.sum()
            f1 = 0.0 if tp == 0 else 2 * prec * rec / (prec + rec)
            if f1 > best + 1e-12:
                best, best_t = f1, t
        out = f1_max(scores, labels)
        assert out["f1_max"] == pytest.approx(best, abs=1e-12)
        assert out["threshold"] == best_t


# ----------------------------------------------------------------------------- pixel AUROC


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "huge_range", "negative"])
def test_pixel_auroc_matches_sklearn(rng, kind):
    masks = rng.random((8, 1, 64, 64)) < 0.1
    base = rng.normal(size=masks.shape)
    maps = {
        "normal": base + masks,
        "ties": np.round(rng.random(masks.shape) * 10) / 10 + 0.2 * masks,  # values exact in float32
        "zeros": np.where(rng.random(masks.shape) < 0.3, 0.0, rng.random(masks.shape) + 0.2 * masks),
        "huge_range": np.exp(8 * base + 2 * masks),  # ~1e-20 .. 1e20
        "negative": -np.exp(3 * base) + masks,
    }[kind].astype(np.float32)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=SYNTHETIC_AUROC_TOL)
    got = pixel_auroc(torch.from_numpy(maps), torch.from_numpy(masks))
    assert got == pytest.approx(expected, abs=SYNTHETIC_AUROC_TOL)


def test_exact_zeros_do_not_coarsen_the_bins(rng):
    """A foreground-masked map (most pixels exactly 0, the rest in a narrow band, as a volume's slices
    give): the zeros are counted apart, so the band keeps fine bins. With key 0 in the adaptive window
    it got ~100 bins and the pixel AUROC was off by ~2e-4, the AUPRO by ~8e-4."""
    masks = _blob_masks(rng, 10, 64, 64)
    yy, xx = np.mgrid[:64, :64]
    body = (yy - 32) ** 2 + (xx - 32) ** 2 <= 18**2  # ~25% of the pixels: the rest is masked to 0
    masks &= body
    smooth = ndimage.gaussian_filter(rng.random(masks.shape), sigma=(0, 4, 4))
    maps = ((0.9 + 0.5 * smooth + 0.01 * masks) * body).astype(np.float32)
    assert (maps == 0).mean() > 0.7 and masks.sum() > 100
    metric, area = PixelAUROC(), AUPRO()
    for part in np.array_split(np.arange(10), 3):
        for m in (metric, area):
            m.update((torch.from_numpy(maps[part][:, None]), torch.from_numpy(masks[part][:, None])))
    assert metric.compute() == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=PIXEL_AUROC_TOL)
    assert area.compute() == pytest.approx(exact_aupro(maps, masks), abs=AUPRO_TOL)
    # zeros placed right: below a grid of positives, inside one of both signs, above one of negatives,
    # with a batch of zeros only first (no grid yet); values an octave or more apart never share a bin
    for levels in ([0.5, 1.0, 2.0, 4.0], [-2.0, -0.5, 0.5, 2.0], [-4.0, -2.0, -1.0, -0.5]):
        labels = rng.random((3, 40, 40)) < 0.3
        values = np.where(rng.random(labels.shape) < 0.4, 0.0, rng.choice(levels, size=labels.shape))
        values = np.where(labels & (rng.random(labels.shape) < 0.5), levels[-1], values).astype(np.float32)
        values[0] = 0.0
        metric = PixelAUROC()
        for i in range(3):
            metric.update((values[i], labels[i]))
        assert metric.compute() == pytest.approx(roc_auc_score(labels.ravel(), values.ravel()), abs=1e-12)


def test_pixel_auroc_growing_range_rebins(rng):
    metric = PixelAUROC()
    all_maps, all_masks, shifts = [], [], set()
    for i in range(30):  # every batch wider and lower than the last: forces re-binning
        masks = rng.random((2, 32, 32)) < 0.2
        maps = ((rng.random(masks.shape) + 0.3 * masks) * 10 ** (i / 4) - i).astype(np.float32)
        metric.update((torch.from_numpy(maps), torch.from_numpy(masks)))
        all_maps.append(maps), all_masks.append(masks)
        shifts.add(metric._shift)
    assert len(shifts) >= 3  # the bin width grew at least twice
    expected = roc_auc_score(np.concatenate(all_masks).ravel(), np.concatenate(all_maps).ravel())
    assert metric.compute() == pytest.approx(expected, abs=SYNTHETIC_AUROC_TOL)


def test_pixel_auroc_fixed_value_range(rng):
    masks = rng.random((4, 32, 32)) < 0.2
    maps = (rng.random(masks.shape) + 0.3 * masks).astype(np.float32)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks, value_range=(0.0, 1.5)) == pytest.approx(expected, abs=SYNTHETIC_AUROC_TOL)


def test_pixel_auroc_state_does_not_grow(rng):
    metric = PixelAUROC()
    masks = rng.random((4, 1, 32, 32)) < 0.2
    metric.update((rng.random(masks.shape), masks))
    size_after_one = metric._counts.numel()
    for i in range(49):
        metric.update((rng.random(masks.shape) * (i + 1), masks))
    assert metric._counts.numel() == size_after_one == 2 * 65536
    assert [k for k, v in vars(metric).items() if isinstance(v, (list, np.ndarray))] == []


# ----------------------------------------------------------------------------- AUPRO


def test_aupro_perfect_constant_and_random(rng):
    masks = _blob_masks(rng, 6, 48, 48)
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0, abs=AUPRO_TOL)
    assert aupro(np.full(masks.shape, 0.7), masks) == pytest.approx(0.15, abs=AUPRO_TOL)  # chance: fpr_limit / 2
    assert aupro(rng.random(masks.shape), masks) < 0.25
    separated = (rng.random(masks.shape) + masks)[:, None]  # every anomalous pixel above every normal one
    assert aupro(separated, masks[:, None], fpr_limit=0.05) == pytest.approx(1.0, abs=AUPRO_TOL)


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_exact_reference(rng, fpr_limit):
    for _ in range(3):
        masks = _blob_masks(rng, 5, 40, 40)
        smooth = ndimage.gaussian_filter(rng.random(masks.shape), sigma=(0, 2, 2))
        maps = (smooth + 0.15 * ndimage.gaussian_filter(masks.astype(float), sigma=(0, 1, 1))).astype(np.float32)
        metric = AUPRO(fpr_limit=fpr_limit)
        for part in np.array_split(np.arange(5), 3):  # several batches
            metric.update((torch.from_numpy(maps[part][:, None]), torch.from_numpy(masks[part][:, None])))
        exact = exact_aupro(maps, masks, fpr_limit)
        assert 0.05 < exact < 0.99
        assert metric.compute() == pytest.approx(exact, abs=AUPRO_TOL)


# ----------------------------------------------------------------------------- Ignite integration


def test_metrics_attached_to_engine(rng):
    masks = torch.from_numpy(_blob_masks(rng, 12, 32, 32))[:, None]
    maps = torch.rand(masks.shape) + 0.5 * masks
    labels = masks.flatten(1).any(1)
    scores = maps.flatten(1).amax(1)
    batches = [(maps[i : i + 4], masks[i : i + 4], scores[i : i + 4], labels[i : i + 4]) for i in range(0, 12, 4)]

    engine = Engine(lambda eng, batch: batch)
    PixelAUROC(output_transform=lambda o: (o[0], o[1])).attach(engine, "pixel_auroc")
    AUPRO(output_transform=lambda o: (o[0], o[1])).attach(engine, "aupro")
    ImageAUROC(output_transform=lambda o: (o[2], o[3])).attach(engine, "image_auroc")
    F1Max(output_transform=lambda o: (o[2], o[3])).attach(engine, "f1")
    state = engine.run(batches, max_epochs=2)  # metrics reset each epoch

    m = state.metrics
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=PIXEL_AUROC_TOL)
    assert m["aupro"] == pytest.approx(exact_aupro(maps[:, 0].numpy(), masks[:, 0].numpy()), abs=AUPRO_TOL)
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m["f1"] == f1_max(scores, labels) and m["f1_max"] == m["f1"]["f1_max"]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "metric, output",
    [
        (ImageAUROC(), (torch.rand(4), torch.zeros(4))),
        (PixelAUROC(), (torch.rand(2, 1, 8, 8), torch.ones(2, 1, 8, 8))),
        (AUPRO(), (torch.rand(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))),
        (F1Max(), (torch.rand(4), torch.zeros(4))),
    ],
)
def test_single_class_raises(metric, output):
    metric.update(output)
    with pytest.raises(ValueError, match="needs"):
        metric.compute()


def test_empty_metric_raises():
    with pytest.raises(ValueError, match="got 0 normal and 0 anomalous"):
        PixelAUROC().compute()


@pytest.mark.parametrize("metric", [PixelAUROC(), AUPRO(), ImageAUROC(), F1Max()])
def test_shape_mismatch_names_both_shapes(metric):
    with pytest.raises(ValueError, match=r"\(2, 1, 8, 8\).*\(2, 8, 8\)"):
        metric.update((torch.rand(2, 1, 8, 8), torch.zeros(2, 8, 8)))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="masks must be binary"):
        PixelAUROC().update((torch.rand(2, 8, 8), torch.full((2, 8, 8), 0.5)))
    with pytest.raises(ValueError, match="NaN"):
        PixelAUROC().update((torch.full((2, 8, 8), float("nan")), torch.zeros(2, 8, 8)))
    with pytest.raises(ValueError, match="fpr_limit"):
        AUPRO(fpr_limit=0.0)
    with pytest.raises(ValueError, match="value_range"):
        PixelAUROC(value_range=(1.0, 0.0))


# ----------------------------------------------------------------------------- ignite.distributed


def _distributed_worker(local_rank: int, data: tuple, results: dict) -> None:
    import ignite.distributed as idist

    rank = idist.get_rank()
    maps, masks, scores, labels = data
    metrics = {"pixel": PixelAUROC(), "aupro": AUPRO(), "image": ImageAUROC(), "f1": F1Max()}
    metrics["pixel"].update((maps[rank], masks[rank]))
    metrics["aupro"].update((maps[rank], masks[rank]))
    n = 10 if rank == 0 else 6  # ranks hold different numbers of images
    metrics["image"].update((scores[rank][:n], labels[rank][:n]))
    metrics["f1"].update((scores[rank][:n], labels[rank][:n]))
    out = {name: m.compute() for name, m in metrics.items()}
    if rank == 0:
        with open(results["path"], "w") as f:
            json.dump(out, f)


@pytest.mark.slow
def test_distributed_sync_matches_single_process(rng, tmp_path):
    import ignite.distributed as idist

    masks = rng.random((2, 4, 32, 32)) < 0.1
    maps = (rng.random(masks.shape) + masks).astype(np.float32)
    maps[1] *= 1000  # rank 1's values need a different adaptive grid than rank 0's
    maps[:, :2, :8] = 0.0  # exact zeros, counted apart from the grid: rank 1's reach rank 0's result
    scores, labels = rng.normal(size=(2, 10)), rng.random((2, 10)) < 0.5
    path = str(tmp_path / "out.json")
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(_distributed_worker, (maps, masks, scores, labels), {"path": path})
    with open(path) as f:
        out = json.load(f)
    all_scores, all_labels = np.concatenate([scores[0], scores[1][:6]]), np.concatenate([labels[0], labels[1][:6]])
    flat_maps, flat_masks = maps.reshape(-1, 32, 32), masks.reshape(-1, 32, 32)
    assert out["pixel"] == pytest.approx(pixel_auroc(flat_maps, flat_masks), abs=1e-12)
    assert out["aupro"] == pytest.approx(aupro(flat_maps, flat_masks), abs=1e-12)
    assert out["image"] == pytest.approx(image_auroc(all_scores, all_labels), abs=1e-12)
    assert out["f1"] == f1_max(all_scores, all_labels)
