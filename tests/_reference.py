"""Reference computations the tests compare the package against: exact (sort-based) or scikit-learn
versions of the evaluation metrics, and an evaluation recomputed from a run folder with the model
and the dataset alone (not :mod:`monai_multiad.metrics` nor the evaluator engine).

Tolerances of the package's binned metrics (see the :mod:`monai_multiad.metrics` docstring): it documents
pixel AUROC within 1e-6 of scikit-learn and AUPRO within 2.4e-5 of :func:`exact_aupro`, measured on 2e6
pixels. The error comes from values sharing a bin (counted as ties) and is larger on fewer pixels: on
the tests' evaluations (smooth non-negative maps, 4e4-5e4 pixels) we measured up to 1.2e-6, and up to
2.3e-6 over 40 random smooth 12 x 64 x 64 map sets; hence 5e-6 here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from skimage.measure import label
from sklearn.metrics import precision_recall_curve, roc_auc_score

PIXEL_AUROC_TOL = 5e-6
AUPRO_TOL = 2.5e-5


def exact_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Sort-based AUPRO over every distinct threshold (MVTec AD reference algorithm).

    ``maps``, ``masks``: ``(B, H, W)`` (a ``(B, 1, H, W)`` channel axis is dropped). Regions are the
    8-connected components of each image's mask; FPR over all normal pixels, PRO the mean over regions.
    """
    maps, masks = np.asarray(maps), np.asarray(masks).astype(bool)
    if maps.ndim == 4:
        maps, masks = maps[:, 0], masks[:, 0]
    weights = np.zeros(maps.shape)
    n_regions = 0
    for i in range(maps.shape[0]):
        regions = label(masks[i], connectivity=2)
        for r in range(1, regions.max() + 1):
            weights[i][regions == r] = 1.0 / (regions == r).sum()
        n_regions += regions.max()
    s, m, wt = maps.ravel(), masks.ravel(), weights.ravel()
    order = np.argsort(-s, kind="stable")
    s, m, wt = s[order], m[order], wt[order]
    fpr = np.cumsum(~m) / (~m).sum()
    pro = np.cumsum(wt) / n_regions
    keep = np.append(np.diff(s) != 0, True)
    fpr, pro = np.concatenate([[0.0], fpr[keep]]), np.concatenate([[0.0], pro[keep]])
    area, i = 0.0, 1
    while i < len(fpr) and fpr[i] <= fpr_limit:
        area += (fpr[i] - fpr[i - 1]) * (pro[i] + pro[i - 1]) / 2
        i += 1
    if i < len(fpr):
        y = pro[i - 1] + (pro[i] - pro[i - 1]) * (fpr_limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        area += (fpr_limit - fpr[i - 1]) * (pro[i - 1] + y) / 2
    return area / fpr_limit


def sklearn_f1_max(scores, labels) -> tuple[float, float]:
    """(maximum F1, the largest threshold reaching it) from scikit-learn's ``precision_recall_curve``
    (anomalous when ``score >= threshold``)."""
    precision, recall, thresholds = precision_recall_curve(np.asarray(labels), np.asarray(scores))
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    best = float(f1.max())
    return best, float(thresholds[f1 >= best - 1e-12].max())


@torch.no_grad()
def recompute_evaluation(run_dir: str | Path, dataset_dir: str | Path | None = None) -> dict:
    """What ``multiad evaluate`` should report for a run, recomputed independently of the metrics
    code: the run's model on every test item (batches of the run's batch size, in order), then
    scikit-learn's ``roc_auc_score`` (image and pixel level), :func:`sklearn_f1_max` and
    :func:`exact_aupro`. Pixel metrics use the normal images and the anomalous ones with a mask.

    Returns ``{"image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_threshold", "scores": {path: score},
    "labels": {path: label}}``.
    """
    import dataclasses

    from monai_multiad.data.datasets import build_datasets
    from monai_multiad.run_folder import load_model

    model, cfg, _ = load_model(run_dir, fold_batchnorm=True)  # as multiad evaluate loads it
    if dataset_dir is not None:
        cfg = dataclasses.replace(cfg, dataset_dir=str(dataset_dir))
    ds = build_datasets(cfg, "test")
    items = [ds[i] for i in range(len(ds))]
    maps, scores = [], []
    for start in range(0, len(items), cfg.batch_size):
        batch = torch.stack([torch.as_tensor(it["image"]) for it in items[start:start + cfg.batch_size]])
        m, s = model(batch)
        maps.append(m.numpy())
        scores.append(s.numpy())
    maps, scores = np.concatenate(maps), np.concatenate(scores)
    labels = np.array([int(it["label"]) for it in items])
    masks = np.stack([torch.as_tensor(it["mask"]).numpy() for it in items]) > 0.5
    keep = np.array([bool(it.get("has_mask", True)) or int(it["label"]) == 0 for it in items])
    f1, f1_threshold = sklearn_f1_max(scores, labels)
    return {
        "image_auroc": float(roc_auc_score(labels, scores)),
        "pixel_auroc": float(roc_auc_score(masks[keep].ravel(), maps[keep].ravel())),
        "aupro": exact_aupro(maps[keep], masks[keep]),
        "f1_max": f1,
        "f1_threshold": f1_threshold,
        "scores": {str(it["path"]): float(s) for it, s in zip(items, scores)},
        "labels": {str(it["path"]): int(lab) for it, lab in zip(items, labels)},
    }


def assert_evaluation_matches(metrics: dict, reference: dict) -> None:
    """``metrics`` (``metrics.json``'s ``"evaluation"``) against :func:`recompute_evaluation`, at the
    documented binning tolerances (image-level metrics are exact)."""
    import pytest

    assert metrics["image_auroc"] == pytest.approx(reference["image_auroc"], abs=1e-12)
    assert metrics["pixel_auroc"] == pytest.approx(reference["pixel_auroc"], abs=PIXEL_AUROC_TOL)
    assert metrics["aupro"] == pytest.approx(reference["aupro"], abs=AUPRO_TOL)
    assert metrics["f1_max"] == pytest.approx(reference["f1_max"], abs=1e-12)
    # the threshold is one of the scores, which agree to float32 sums in another order (rel 1e-5, as the scores)
    assert metrics["f1_threshold"] == pytest.approx(reference["f1_threshold"], rel=1e-5)
