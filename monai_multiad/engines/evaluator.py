"""Evaluation, validation and calibration: :class:`MultiADEvaluator` (anomaly maps and scores for
every batch, metrics as Ignite metrics attached to the engine), :class:`DistillationEvaluator` (the
training run's validation: mean distillation loss on held-out normals as its key metric, with
:func:`distillation_loss_metric` and :class:`EarlyStop`), and :func:`fit_fusion` (the fusion
statistics fitted on normals)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import Loss
from monai.engines import Evaluator
from monai.engines.utils import default_metric_cmp_fn

from monai_multiad.engines.map_weights import synthetic_map_weights
from monai_multiad.errors import MultiADInputError
from monai_multiad.losses import DistillationLoss
from monai_multiad.networks import MultiAD
from monai_multiad.transforms.anomaly import SyntheticAnomaly

__all__ = ["DistillationEvaluator", "MultiADEvaluator", "distillation_loss_metric", "fit_fusion"]


def _prepare(batchdata: Any, device: torch.device, non_blocking: bool = False, **kwargs) -> dict[str, Any]:
    """Images (and masks, labels when present) of a dict batch onto ``device``."""
    if not isinstance(batchdata, dict):
        batchdata = {"image": batchdata[0]}
    out = dict(batchdata)
    out["image"] = torch.as_tensor(batchdata["image"]).to(device, non_blocking=non_blocking)
    return out


class MultiADEvaluator(Evaluator):
    """Runs the model in eval mode over a loader; the engine output per batch is a dict with
    ``"anomaly_map"`` (B, 1, H, W), ``"score"`` (B,), and the batch's ``"mask"``, ``"label"``,
    ``"path"`` etc. passed through, so metrics (``monai_multiad.metrics``) and writers
    attach with an ``output_transform``.

    Args:
        device: where to run.
        val_data_loader: batches of dicts with ``"image"`` in [0, 1].
        network: the trained :class:`MultiAD`.
        key_val_metric / additional_metrics / val_handlers / metric_cmp_fn: as ``monai.engines.Evaluator``.
        amp: mixed precision on CUDA.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Iterable,
        network: MultiAD,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        non_blocking: bool = False,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
    ) -> None:
        device = torch.device(device)
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            non_blocking=non_blocking,
            prepare_batch=_prepare,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            val_handlers=val_handlers,
            amp=amp and device.type == "cuda",
            decollate=False,
        )
        self.network = network.to(device)

    def _iteration(self, engine: MultiADEvaluator, batchdata: Any) -> dict[str, Any]:
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        engine.network.eval()
        with torch.no_grad(), torch.autocast(engine.state.device.type, enabled=engine.amp):
            amap, score = engine.network(batch["image"])
        batch["anomaly_map"], batch["score"] = amap.float(), score.float()
        del batch["image"]
        return batch


@torch.no_grad()
@torch.no_grad()
def fit_memory_bank(network: MultiAD, normal_loader: Iterable, device: torch.device | str = "cpu",
                    prepare_batch: Callable = _prepare, seed: int = 0) -> int:
    """Fill ``network``'s memory bank (when it has one) from the teacher features of the normal images of
    ``normal_loader`` (the training images); before :func:`fit_fusion`, which then fits the bank's map
    like a stage's. Returns the entries filled (0 without a bank)."""
    bank = getattr(network, "memory_bank", None)
    if bank is None:
        return 0
    device = torch.device(device)
    network = network.to(device).eval()

    def teacher_batches():
        for batchdata in normal_loader:
            images = prepare_batch(batchdata, device)["image"]
            yield network.features(images)[0]

    return bank.fit(teacher_batches(), torch.Generator().manual_seed(int(seed)))


@torch.no_grad()
def fit_fusion(
    network: MultiAD,
    normal_loader: Iterable,
    device: torch.device | str = "cpu",
    threshold_quantile: float = 0.99,
    prepare_batch: Callable = _prepare,
    normalization: str = "mean",
    quantiles: tuple[float, float] = (0.9, 0.995),
    max_pixels: int = 4_000_000,
    weights: str = "equal",
    anomaly: SyntheticAnomaly | None = None,
    foreground_threshold: float | None = None,
) -> dict[str, Any]:
    """Fit the fusion statistics on normal images (no anomaly labels needed).

    ``normalization="mean"``: per stage, the mean of ``1 - cos`` over all normal pixels becomes
    the stage's scale. ``"zscore"``: that mean becomes the stage's offset and the standard deviation
    over the same pixels its scale, so each stage counts in normal standard deviations above its
    normal level. ``"quantile"``: the stage's ``quantiles[0]`` over normal pixels becomes its
    offset and the distance to ``quantiles[1]`` its scale (EfficientAD), from a regular subsample
    of at most ``max_pixels`` pixels per stage. ``weights="synthetic"`` then weighs the maps by how
    well each separates the same normals corrupted by ``anomaly`` from their clean originals
    (:func:`~monai_multiad.engines.map_weights.synthetic_map_weights`; summed fusion only), by dividing
    each map's scale: the model keeps its shape. Then the image scores of the same normals give the
    threshold (their ``threshold_quantile``), above which :func:`predict` calls an image anomalous.
    Returns the statistics as a dict.
    """
    if normalization not in ("mean", "zscore", "quantile"):
        raise ValueError(f"normalization must be 'mean', 'zscore' or 'quantile', got {normalization!r}")
    if weights not in ("equal", "synthetic"):
        raise ValueError(f"weights must be 'equal' or 'synthetic', got {weights!r}")
    device = torch.device(device)
    network = network.to(device).eval()
    sums, squares, count = None, None, 0
    batches, samples, maxima = [], [], []
    for batchdata in normal_loader:
        images = prepare_batch(batchdata, device)["image"]
        maps = network.stage_maps(images).double()
        maxima.append(maps.amax(dim=(2, 3), keepdim=True).float().cpu())  # for the synthetic weights
        s = maps.sum(dim=(0, 2, 3))
        sums = s if sums is None else sums + s
        q = maps.pow(2).sum(dim=(0, 2, 3))
        squares = q if squares is None else squares + q
        count += maps.shape[0] * maps.shape[2] * maps.shape[3]
        if normalization == "quantile":  # a regular subsample of the pixels, for the quantiles
            samples.append(maps[:, :, ::4, ::4].float().permute(1, 0, 2, 3).reshape(maps.shape[1], -1).cpu())
        batches.append(images.cpu())
    if count == 0:
        raise MultiADInputError("no normal images to fit the fusion statistics on: the validation set is empty")
    offset = None
    if normalization == "quantile":
        pixels = torch.cat(samples, dim=1)
        if pixels.shape[1] > max_pixels:
            pixels = pixels[:, :: -(-pixels.shape[1] // max_pixels)]
        lo, hi = np.quantile(pixels.numpy(), quantiles, axis=1)
        offset, scale = torch.from_numpy(lo).float(), torch.from_numpy(hi - lo).float()
    elif normalization == "zscore":
        mean = sums / count
        offset = mean.float()
        scale = (squares / count - mean.pow(2)).clamp_min(0).sqrt().float()
    else:
        scale = (sums / count).float()
    network.fusion.set_statistics(scale, threshold=0.0, stage_offset=offset)
    k = len(scale)
    map_weights, separation = torch.full((k,), 1.0 / k), []
    if weights == "synthetic" and network.fusion.fuse and network.fusion.mode == "sum":
        map_weights, separation = synthetic_map_weights(
            network, batches, anomaly if anomaly is not None else SyntheticAnomaly(), device, foreground_threshold,
            clean_maxima=torch.cat(maxima))
        scale = scale / (k * map_weights)
        network.fusion.set_statistics(scale, threshold=0.0, stage_offset=offset)
    scores = torch.cat([network(images.to(device))[1].cpu() for images in batches])
    threshold = float(np.quantile(scores.numpy(), threshold_quantile))
    network.fusion.set_statistics(scale, threshold=threshold, stage_offset=offset)
    return {
        "normalization": normalization,
        "stage_scale": [float(m) for m in scale],
        "stage_offset": [float(m) for m in offset] if offset is not None else [0.0] * len(scale),
        "map_weights": [round(float(w), 4) for w in map_weights],
        "map_separation": [round(a, 4) for a in separation],
        "threshold": threshold,
        "threshold_quantile": threshold_quantile,
        "normal_score_mean": float(scores.mean()),
        "normal_score_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "num_images": len(scores),
    }


class DistillationEvaluator(MultiADEvaluator):
    """The validation engine of a training run: teacher and student features of held-out normal
    images, in eval mode. Its key metric, ``state.metrics["val_loss"]``, is the mean distillation
    loss over those images (:func:`distillation_loss_metric`, an Ignite ``Loss``, reduced across
    ranks under ``ignite.distributed``): the unsupervised model-selection criterion, lower is better
    (``state.best_metric``). MONAI's ``ValidationHandler`` runs it after each training epoch.

    Args:
        device: where to run.
        val_data_loader: batches of dicts with ``"image"`` (B, C, H, W) in [0, 1].
        network: the :class:`MultiAD` being trained.
        key_val_metric: ``{"val_loss": distillation_loss_metric()}`` when not given.
        kwargs: as :class:`MultiADEvaluator`; among them ``val_handlers``, where the student's
            BatchNorm re-estimation (:class:`~monai_multiad.handlers.BatchNormRecalibration`)
            belongs, so the engine sees the student that was trained.

    The engine's output per batch is ``{"teacher": [F_T1..F_T4], "student": [F_S1..F_S4]}``.
    """

    def __init__(self, device: torch.device | str, val_data_loader: Iterable, network: MultiAD,
                 key_val_metric: dict | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("metric_cmp_fn", operator.lt)  # a loss: lower is better
        super().__init__(device, val_data_loader, network, key_val_metric or {"val_loss": distillation_loss_metric()},
                         **kwargs)

    def _iteration(self, engine: DistillationEvaluator, batchdata: Any) -> dict[str, list[torch.Tensor]]:
        images = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)["image"]
        engine.network.eval()
        with torch.no_grad():
            teacher, student = engine.network.features(images)
        return {"teacher": teacher, "student": student}


def distillation_loss_metric(device: torch.device | str = "cpu") -> Loss:
    """Ignite ``Loss``: the mean over images of the (unweighted, all-positions) distillation loss
    of :class:`DistillationEvaluator`'s outputs; summed across ranks under ``ignite.distributed``.

    ``skip_unrolling``: the outputs are lists of per-stage tensors, which Ignite (>= 0.5) would
    otherwise unroll into one update per stage, each a single stage's tensors read as a batch of
    images: a wrong loss (a quarter of the true one in the runs where it was found)."""
    return Loss(DistillationLoss(), output_transform=lambda out: (out["teacher"], out["student"]),
                batch_size=lambda student: student[0].shape[0], device=device, skip_unrolling=True)


