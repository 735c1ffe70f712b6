"""Evaluating a trained run on a labelled test split, and predicting on new 2D images."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from monai_multiad.config import RunConfig
from monai_multiad.engines.evaluator import MultiADEvaluator
from monai_multiad.errors import MultiADInputError
from monai_multiad.handlers import ScoreRows
from monai_multiad.inferers import LoadedRun, load_run, scan_score
from monai_multiad.outputs import write_json, write_png, write_text
from monai_multiad.metrics import AUPRO, F1Max, ImageAUROC, PixelAUROC
from monai_multiad.visualize import caption, contact_sheet, overlay
from monai_multiad.data.datasets import build_datasets, build_loader
from monai_multiad.run_folder import load_model, resolve_device

__all__ = ["evaluate", "predict", "score_images", "anomaly_metrics", "format_table", "evaluation_config",
           "evaluation_dataset", "mask_coverage", "run_evaluation", "write_evaluation", "score_and_label",
           "pixel_rows"]


def score_and_label(o: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """An evaluator output's image scores and labels (the image metrics' ``output_transform``)."""
    return o["score"], o["label"]


def pixel_rows(o: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps and masks of the images whose ground truth is known (normal, or anomalous with a mask):
    the pixel metrics' ``output_transform``."""
    keep = torch.as_tensor(o.get("has_mask", torch.ones_like(o["score"], dtype=torch.bool))).bool().cpu()
    keep = keep | (torch.as_tensor(o["label"]).cpu() == 0)
    return o["anomaly_map"].cpu()[keep], torch.as_tensor(o["mask"]).cpu()[keep]


def anomaly_metrics(pixel: bool = True) -> tuple[dict, dict]:
    """(key metric, additional metrics) for :class:`MultiADEvaluator`: image AUROC, F1-max, and
    (with masks) pixel AUROC and AUPRO to FPR 0.3. The bundles' ``evaluate.json`` lists the same."""
    key = {"image_auroc": ImageAUROC(output_transform=score_and_label)}
    extra: dict[str, Any] = {"f1": F1Max(output_transform=score_and_label)}
    if pixel:
        extra["pixel_auroc"] = PixelAUROC(output_transform=pixel_rows)
        extra["aupro"] = AUPRO(fpr_limit=0.3, output_transform=pixel_rows)
    return key, extra


def mask_coverage(dataset) -> tuple[int, int]:
    """(anomalous test samples with a ground-truth mask, anomalous test samples) of a test dataset.
    A dataset without ``samples`` (volume slices, whose labels come with their masks) counts as covered."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return 1, 1
    anomalous = [s for s in samples if int(s["label"]) == 1]
    return sum(1 for s in anomalous if s.get("mask")), len(anomalous)


def format_table(metrics: dict[str, Any]) -> str:
    """The metrics as aligned ``name  value`` lines; a metric that was not computed shows as ``skipped``."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else "skipped" if v is None else str(v))
            for k, v in metrics.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ----------------------------------------------------------------------------- evaluation, step by step
def evaluation_config(cfg: RunConfig, dataset_dir: str | Path | None = None, batch_size: int | None = None,
                      layout: str | None = None) -> RunConfig:
    """The run's configuration with the test data set's folder, batch size and layout where given."""
    overrides = {"dataset_dir": str(dataset_dir) if dataset_dir else None, "batch_size": batch_size, "layout": layout}
    return RunConfig.from_dict({**cfg.to_dict(), **{k: v for k, v in overrides.items() if v}})


def evaluation_dataset(cfg: RunConfig):
    """The test split of ``cfg.dataset_dir``, checked before any work: not empty, with anomalous images,
    masks paired with their images (each failure one line naming the folder or file)."""
    dataset = build_datasets(cfg, "test")
    if len(dataset) == 0:
        raise MultiADInputError(f"{cfg.dataset_dir}: the test split is empty")
    if getattr(dataset, "samples", None) is not None:
        from monai_multiad.data.images import check_masks

        check_masks(dataset.samples)  # a mask paired with the wrong image: one line, before any work
    if mask_coverage(dataset)[1] == 0:
        raise MultiADInputError(f"{cfg.dataset_dir}: the test split has no anomalous images: nothing to evaluate "
                                "against (see 'multiad train --help' for the layouts)")
    return dataset


def _pixel_note(dataset) -> str:
    with_mask, anomalous = mask_coverage(dataset)
    if with_mask == 0:
        return (f"skipped: none of the {anomalous} anomalous test images has a ground-truth mask "
                "(labels only); image-level metrics only")
    if with_mask < anomalous:
        return (f"computed on the {with_mask} of {anomalous} anomalous test images that have a mask "
                "(and the normal images)")
    return "computed on every test image"



def run_evaluation(evaluator, cfg: RunConfig) -> None:
    """Run the test evaluator; a metric that cannot be computed is one line naming the data set."""
    try:
        evaluator.run()
    except MultiADInputError:  # a file that cannot be used (unreadable image, mismatched mask): names it
        raise
    except ValueError as e:
        raise MultiADInputError(f"{cfg.dataset_dir}: cannot compute the metrics ({e})") from e


def write_evaluation(evaluator, score_rows: ScoreRows, dataset, model: tuple, cfg: RunConfig,
                     run_dir: str | Path, out_dir: str | Path, sheet_size: int = 8) -> dict[str, Any]:
    """After :func:`run_evaluation`: the metrics (and, for volumes, the scan-level ones), written to
    ``out_dir`` as ``metrics.json`` (kept beside what it held), ``scores.csv`` (and ``scans.csv``) and
    ``contact_sheet.png``. ``model``: ``(network, config, fusion)`` as :func:`load_model` gives it."""
    network, _, fusion = model
    out_dir = Path(out_dir).absolute()
    rows, m = score_rows.rows, evaluator.state.metrics
    metrics = {
        "image_auroc": m["image_auroc"],
        "pixel_auroc": m.get("pixel_auroc"),
        "aupro": m.get("aupro"),
        "pixel_metrics": _pixel_note(dataset),
        "f1_max": m["f1"]["f1_max"],
        "f1_threshold": m["f1"]["threshold"],
        "normal_threshold": fusion.get("threshold"),
        "num_images": len(rows),
        "num_anomalous": sum(r["label"] for r in rows),
        "dataset_dir": str(cfg.dataset_dir),
    }
    volumes = bool(rows) and "case" in rows[0]
    scans: list[dict[str, Any]] = []
    if volumes:
        scans, scan_metrics = volume_metrics(rows, cfg, fusion, run_dir)
        metrics["slice_auroc"] = metrics["image_auroc"]
        metrics["voxel_auroc"] = metrics["pixel_auroc"]
        metrics.update(scan_metrics)
        if metrics["voxel_auroc"] is not None:
            metrics["pixel_metrics"] = (f"over the voxels of the test scans' foreground slices, each slice resampled "
                                        f"to {cfg.image_size} x {cfg.image_size}")
    write_json(out_dir / "metrics.json", {**_previous(out_dir / "metrics.json"), "evaluation": metrics})
    fields = ["path", "label", "score"] + (["case", "slice_index"] if volumes else [])
    write_text(out_dir / "scores.csv", _csv(rows, fields))
    if volumes:
        write_text(out_dir / "scans.csv", _csv(scans, ["case", "label", "scan_score", "anomalous", "num_slices",
                                                       "top_slices"]))
    _write_sheet(network, dataset, rows, out_dir / "contact_sheet.png", evaluator.state.device, sheet_size,
                 fusion.get("threshold"))
    return metrics


def evaluate(
    run_dir: str | Path,
    dataset_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    sheet_size: int = 8,
    layout: str | None = None,
) -> dict[str, Any]:
    """Score the test split of ``dataset_dir`` (default: the one trained on; ``layout``: its layout,
    default the run's) and write ``metrics.json``, ``scores.csv`` and ``contact_sheet.png`` (most and
    least anomalous) to ``out_dir``.

    Pixel AUROC and AUPRO are computed on the images whose ground truth is known (normal images,
    anomalous ones with a mask). When no anomalous image has a mask (a labels-only test set) they are
    ``None`` and ``pixel_metrics`` says why; when some lack one, it says on how many they were computed.

    The bundles' ``evaluate.json`` builds the same objects by the same steps (:func:`evaluation_config`,
    :func:`evaluation_dataset`, :func:`anomaly_metrics`, :class:`ScoreRows`, a ``MultiADEvaluator``,
    :func:`run_evaluation`, :func:`write_evaluation`): keep the two in step.
    """
    dev = resolve_device(device)
    model = load_model(run_dir, dev, fold_batchnorm=True)
    cfg = evaluation_config(model[1], dataset_dir, batch_size, layout)
    dataset = evaluation_dataset(cfg)
    key, extra = anomaly_metrics(pixel=mask_coverage(dataset)[0] > 0)
    score_rows = ScoreRows()
    evaluator = MultiADEvaluator(dev, build_loader(dataset, cfg, shuffle=False), model[0],
                                 key_val_metric=key, additional_metrics=extra, val_handlers=[score_rows], amp=cfg.amp)
    run_evaluation(evaluator, cfg)
    return write_evaluation(evaluator, score_rows, dataset, model, cfg, run_dir, out_dir or run_dir, sheet_size)


def _csv(rows: list[dict[str, Any]], fields: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def volume_metrics(rows: list[dict[str, Any]], cfg: RunConfig, fusion: dict, run_dir: str | Path,
                   top_k: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Scan-level evaluation of a volume test split from its slice rows (``case``, ``label``,
    ``score``, ``slice_index``): a scan is abnormal when any of its slices is labelled (its label
    volume is non-empty there), its score is screening's, :func:`~monai_multiad.inferers.scan_score`
    (``top_k`` default: the run's calibration's, else :data:`~monai_multiad.inferers.DEFAULT_TOP_K`).
    Returns (one row per scan, metrics):
    scan AUROC (``None``, with the reason, when the scans are all of one kind), and sensitivity and
    specificity of scans and slices at the thresholds ``multiad screen`` flags with (calibrated ones
    when the run's ``calibration.json`` applies, else the normal threshold fitted at training)."""
    from monai_multiad.metrics import image_auroc

    run = LoadedRun.from_parts(None, cfg, fusion, torch.device("cpu"), run_dir)  # its settings and thresholds
    settings = run.settings(top_k=top_k)
    scan_thr, slice_thr = run.volume_thresholds(settings)
    top_k = settings.top_k
    by_case: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    scans = []
    for case, slices in by_case.items():
        ranked = scan_score([r["score"] for r in slices], [r["slice_index"] for r in slices], top_k)
        scans.append({"case": case, "label": int(any(r["label"] for r in slices)), "scan_score": ranked.score,
                      "anomalous": None if scan_thr.value is None else bool(ranked.score > scan_thr.value),
                      "num_slices": len(slices), "top_slices": " ".join(str(k) for k in ranked.top)})
    labels = np.array([s["label"] for s in scans])
    scores = np.array([s["scan_score"] for s in scans])
    kinds = int(labels.sum()), int((labels == 0).sum())
    if min(kinds) == 0:
        scan_auroc, note = None, (f"skipped: all {len(scans)} test scans are "
                                  f"{'abnormal' if kinds[1] == 0 else 'normal'}; a scan AUROC needs both kinds")
    else:
        scan_auroc, note = image_auroc(scores, labels), f"{kinds[0]} abnormal and {kinds[1]} normal scans"
    out: dict[str, Any] = {"scan_auroc": scan_auroc, "scan_metrics": note, "num_scans": len(scans),
                           "num_abnormal_scans": kinds[0], "top_k": top_k}
    for unit, thr, items, key in (("scan", scan_thr, scans, "scan_score"), ("slice", slice_thr, rows, "score")):
        out[f"{unit}_threshold"] = thr.value
        out[f"{unit}_threshold_source"] = str(thr)
        if thr.value is None:
            out[f"{unit}_sensitivity"] = out[f"{unit}_specificity"] = None
            continue
        flagged = [(int(x["label"]), x[key] > thr.value) for x in items]
        out[f"{unit}_sensitivity"] = _rate(sum(f for y, f in flagged if y), sum(1 for y, _ in flagged if y))
        out[f"{unit}_specificity"] = _rate(sum(not f for y, f in flagged if not y),
                                           sum(1 for y, _ in flagged if not y))
    return scans, out


def _previous(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _sheet_rows(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The contact sheet's images: the ``n`` highest-scored test images, then the ``n`` lowest-scored among
    the informative ones. For slices of volumes those are the slices in the middle half of their scan's
    screened slices (the lowest scores otherwise go to the near-empty slices at the top and bottom of a
    head)."""
    order = sorted(rows, key=lambda r: -r["score"])
    if len(order) <= 2 * n:
        return order
    low = order
    if "slice_index" in order[0]:
        span: dict[str, tuple[int, int]] = {}
        for r in rows:
            lo, hi = span.get(r["case"], (r["slice_index"], r["slice_index"]))
            span[r["case"]] = (min(lo, r["slice_index"]), max(hi, r["slice_index"]))
        middle = [r for r in order if abs(r["slice_index"] - sum(span[r["case"]]) / 2)
                  <= (span[r["case"]][1] - span[r["case"]][0]) / 4]
        low = middle if len(middle) >= n else order
    top = order[:n]
    chosen = {id(r) for r in top}
    return top + [r for r in low if id(r) not in chosen][-n:]


def _sheet_caption(row: dict[str, Any], threshold: float | None) -> list[str]:
    """A tile's caption, three short lines: which image (the file in its folder, or the scan), its ground truth
    (and the slice of a scan), its score against the threshold."""
    truth = "DEFECT" if row["label"] else "normal"
    if "case" in row:
        name, truth = str(row["case"]), f"slice {row['slice_index']}  {truth}"
    else:
        path = Path(row["path"])
        name = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    score = f"score {row['score']:.3g}"
    if threshold is not None:
        score += f" {'>' if row['score'] > threshold else '<='} {threshold:.3g}"
    return [name, truth, score]


@torch.no_grad()
def _write_sheet(network, dataset, rows, path: Path, device, n: int, threshold: float | None = None) -> None:
    """Top row(s): the ``n`` highest-scored test images; bottom: the ``n`` lowest (:func:`_sheet_rows`); ground
    truth outlined; each tile captioned with its name, score against ``threshold`` and ground truth."""
    picks = _sheet_rows(rows, n)
    items = [dataset[r["index"]] for r in picks]
    images = torch.stack([torch.as_tensor(it["image"]) for it in items]).to(device)
    maps, _ = network(images)
    vmax = float(maps.max())
    tiles = [
        caption(overlay(it["image"].numpy(), m[0].cpu().numpy(), vmax=vmax, mask=it["mask"][0].numpy() > 0.5),
                _sheet_caption(r, threshold))
        for it, m, r in zip(items, maps, picks)
    ]
    write_png(path, contact_sheet(tiles, columns=min(n, len(tiles))))


def _collect_images(inputs: list[str | Path]) -> list[Path]:
    from monai_multiad.data.images import list_images

    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += list_images(item)
        elif item.is_file():
            files.append(item)
        else:
            raise MultiADInputError(f"{item}: no such file or folder")
    if not files:
        raise MultiADInputError("no images given to predict on")
    return files


@torch.no_grad()
def score_images(network, cfg: RunConfig, paths: list[Path], device, batch_size: int | None = None,
                 images: bool = True) -> Iterator[dict]:
    """Score each image file as ``predict`` does (read at ``cfg.in_channels``, resized to the network's
    size): yields, in the order of ``paths``, ``{"path", "image" (C, H, W) float in [0, 1] (only with
    ``images``), "map" (H, W) at the image's own size, "score"}``, or ``{"path", "error"}`` for an image
    that cannot be read. Also what ``multiad calibrate`` scores.

    Files are decoded on the CPU and sent at their own size and dtype (uint8, uint16...); scaling,
    channel conversion and both resizes run on ``device``
    (:class:`~monai_multiad.data.preprocess.DevicePreprocessor`), ``batch_size`` images (default: the
    run's) per network pass.
    """
    from monai_multiad.data.images import read_image_array, unit_image
    from monai_multiad.data.preprocess import DevicePreprocessor

    prep = DevicePreprocessor(cfg.image_size, cfg.in_channels, device)
    step = max(1, int(batch_size or cfg.batch_size))
    for start in range(0, len(paths), step):
        chunk = paths[start:start + step]
        read: list[dict] = []
        for path in chunk:
            try:
                read.append({"path": str(path), "array": read_image_array(path)})
            except MultiADInputError as e:
                read.append({"path": str(path), "error": str(e)})
        ok = [r for r in read if "array" in r]
        if ok:
            amap, score = network(prep([r["array"] for r in ok]))
            maps = prep.restore(amap, [r["array"].shape[:2] for r in ok])
            for r, m, s in zip(ok, maps, score.float().cpu().tolist()):
                r.update(map=m, score=float(s))
        for r in read:
            array = r.pop("array", None)
            if array is not None and images:
                r["image"] = unit_image(array, cfg.in_channels)
            yield r


@torch.no_grad()
def predict(run_dir: str | Path, inputs: list[str | Path], out_dir: str | Path, device: str = "auto") -> list[dict]:
    """Score each image; write ``<name>_overlay.png`` (map over image at its original size) and
    ``predictions.json`` (score, threshold and its source, anomalous) to ``out_dir``. The threshold is
    the run's calibrated one (``calibration.json``) when there is one, else the fusion's fitted at
    training. An unreadable image is recorded with its error and the others go on."""
    run = load_run(run_dir, device)
    network, cfg, dev = run.model, run.config, run.device
    chosen = run.image_threshold()
    threshold = chosen.value
    out_dir = Path(out_dir).absolute()  # predictions.json names files that are found from anywhere
    results, used = [], set()
    paths = _collect_images(inputs)
    names = []
    for path in paths:
        name = path.stem
        if name in used:  # same file name in another folder (test/good/000.png, test/blob/000.png)
            name = f"{path.parent.name}_{path.stem}"
        while name in used:
            name += "_"
        used.add(name)
        names.append(name)
    for name, r in zip(names, score_images(network, cfg, paths, dev)):
        if "error" in r:
            results.append(r)
            continue
        image, full, s = r["image"], r["map"], r["score"]
        vmax = max(float(threshold) if threshold else 0.0, float(full.max()))
        overlay_path = out_dir / f"{name}_overlay.png"
        write_png(overlay_path, overlay(image, full, vmax=vmax))
        results.append({
            "path": r["path"],
            "score": s,
            "threshold": threshold,
            "threshold_source": chosen.description,
            "anomalous": bool(threshold is not None and s > threshold),
            "overlay": str(overlay_path),
            "size": list(image.shape[-2:]),
        })
    write_json(out_dir / "predictions.json", results)
    return results
