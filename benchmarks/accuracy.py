"""Accuracy benchmark of Multi-AD: train on normals, evaluate on the test split, tabulate.

For each category of ``--dataset-dir`` (an MVTec AD root with several categories, one category
folder, a BMAD root, or a volume folder with ``splits.json`` such as ``lgg_flair``): build a
:class:`~monai_multiad.config.RunConfig`, :func:`monai_multiad.workflow.train` (model selection and
the fusion's statistics use a validation split of *normal training* images only),
:func:`monai_multiad.inference.evaluate` on the test split once, and collect image AUROC,
pixel AUROC, AUPRO (to FPR 0.3), F1-max, training time, device, versions and seed.
Nothing here looks at the test split before the single evaluation of a trained run.

``--ablation`` runs four configurations (the defaults, no SE, with the discriminator, no fusion) and writes
one table. ``--study`` runs the named variants of :data:`STUDY` (the accuracy study behind the
defaults; ``--variants`` picks some): a variant either trains (its ``train`` overrides) or reuses
the trained run of another variant (``from``) and only changes how maps are normalised, fused and
scored (``refit`` overrides), refitting the fusion on the same normal validation images. Output in ``--out``: ``results.json``, ``results.md`` and ``runs/<config>/<category>/``
(each a run folder as ``multiad train`` writes it, with the evaluation's ``metrics.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
#: ablation configurations: name -> RunConfig overrides
CONFIGS = {
    "full": {},
    "no_se": {"student_se": False},
    "with_discriminator": {"discriminator": True},
    "no_fusion": {"fusion": False},
}


#: the accuracy study: name -> {"train": RunConfig overrides} or {"from": variant, "refit": overrides}.
#: "old" is the model as it was (BatchNorm momentum 0.01, no re-estimation); the rest change one
#: thing at a time from the variant they name or the one before.
STUDY: dict[str, dict] = {
    "old": {"train": {"bn_momentum": 0.01, "bn_recalibrate": 0, "foreground": "off"}},
    "bn_fix": {"train": {"foreground": "off"}},
    "bn_fix_no_d": {"train": {"discriminator": False, "adversarial_weight": 0.0, "foreground": "off"}},
    "feature_norm": {"train": {"discriminator": False, "adversarial_weight": 0.0, "feature_norm": True}},
    "feature_norm_d": {"train": {"feature_norm": True}},
    "fn_sgd_cosine": {"train": {"discriminator": False, "adversarial_weight": 0.0, "feature_norm": True,
                                "optimizer": "sgd", "lr": 0.4, "weight_decay": 1e-4, "lr_schedule": "cosine"}},
    "fn_adam_cosine": {"train": {"discriminator": False, "adversarial_weight": 0.0, "feature_norm": True,
                                 "lr_schedule": "cosine"}},
    "fn_hard": {"train": {"discriminator": False, "adversarial_weight": 0.0, "feature_norm": True,
                          "hard_mining": 0.9}},
    "fn_teacher_init": {"train": {"discriminator": False, "adversarial_weight": 0.0, "feature_norm": True,
                                  "student_init": "teacher"}},
    "fn_flips": {"train": {"discriminator": False, "adversarial_weight": 0.0, "feature_norm": True,
                           "augment_flips": True}},
    "nd_sgd_cosine": {"train": {"discriminator": False, "adversarial_weight": 0.0, "optimizer": "sgd", "lr": 0.4,
                                "weight_decay": 1e-4, "lr_schedule": "cosine"}},
    "nd_adam_cosine": {"train": {"discriminator": False, "adversarial_weight": 0.0, "lr_schedule": "cosine"}},
    "nd_teacher_init": {"train": {"discriminator": False, "adversarial_weight": 0.0, "student_init": "teacher"}},
    "nd_hard": {"train": {"discriminator": False, "adversarial_weight": 0.0, "hard_mining": 0.9}},
    "nd_flips": {"train": {"discriminator": False, "adversarial_weight": 0.0, "augment_flips": True}},
    "nd_hard99": {"train": {"discriminator": False, "adversarial_weight": 0.0, "hard_mining": 0.99}},
    # the paper's ablation on the defaults of hard-feature distillation with z-scored maps: from nd_hard
    "def_no_se": {"train": {"student_se": False}},
    "def_with_d": {"train": {"discriminator": True, "adversarial_weight": 0.1}},
    # a discriminator balanced so that it does not win at once: spectral norm (no BatchNorm),
    # one-sided label smoothing, instance noise
    "def_d_balanced": {"train": {"discriminator": True, "adversarial_weight": 0.1, "discriminator_spectral_norm": True,
                                 "d_label_smoothing": 0.1, "d_instance_noise": 0.05}},
    # convergence levers on the defaults: learning rate, hard-mining quantile, batch size
    # at the same number of images seen, and training length
    "def_lr3e-3": {"train": {"lr": 3e-3}},
    "def_lr3e-3_cosine": {"train": {"lr": 3e-3, "lr_schedule": "cosine"}},
    "def_hard99": {"train": {"hard_mining": 0.99}},
    "def_batch8": {"train": {"batch_size": 8, "max_steps": 600}},
    "def_x4": {"train": {"max_steps": 1200}},
    # negative examples and a second opinion. "st" is the student alone (the defaults before this
    # part of the study); then a denoising student (it sees synthetic anomalies in half or all of
    # the training images, the teacher the clean images), a memory bank of normal teacher features
    # (PatchCore's k-NN map) fused with the student's maps, at three sizes, and a segmentation head
    # trained on synthetic anomalies over the frozen teacher and student (DeSTSeg)
    "st": {"train": {"denoise_fraction": 0.0, "memory_bank": 0, "segmentation_head_steps": 0}},
    "st_dn50": {"train": {"denoise_fraction": 0.5, "memory_bank": 0, "segmentation_head_steps": 0}},
    "st_dn100": {"train": {"denoise_fraction": 1.0, "memory_bank": 0, "segmentation_head_steps": 0}},
    "st+bank": {"from": "st", "refit": {"memory_bank": 4096}},
    "st_dn50+bank": {"from": "st_dn50", "refit": {"memory_bank": 4096}},
    "st_dn50+bank1024": {"from": "st_dn50", "refit": {"memory_bank": 1024}},
    "st_dn50+bank2048": {"from": "st_dn50", "refit": {"memory_bank": 2048}},
    "st+head": {"from": "st", "refit": {"segmentation_head_steps": 300}},
    "st_dn50+head": {"from": "st_dn50", "refit": {"segmentation_head_steps": 300}},
    "st_dn50+head+bank": {"from": "st_dn50", "refit": {"segmentation_head_steps": 300, "memory_bank": 4096}},
    # the defaults chosen by that comparison (st_dn50+head+bank), trained in one run, and the larger teachers
    "def": {"train": {}},
    "def_lite1": {"train": {"backbone": "efficientnet_lite1"}},
    "def_lite2": {"train": {"backbone": "efficientnet_lite2"}},
    # volumes: the slice repeated to three channels against 2.5D input (the slice between its neighbours)
    "def_repeat3": {"train": {"in_channels": 3}},
    "def_2p5d": {"train": {"in_channels": 3, "slice_context": 1}},
    # the paper's fusion switch on the defaults, and each added map alone (refits of def): the
    # student's last stage alone (the paper's "fusion off"), the memory bank's map alone, the head's alone
    "def+no_fusion": {"from": "def", "refit": {"fusion": False, "memory_bank": 0, "segmentation_head_steps": 0}},
    "def+bank_only": {"from": "def", "refit": {"fusion": False, "segmentation_head_steps": 0}},
    "def+head_only": {"from": "def", "refit": {"fusion": False, "memory_bank": 0}},
    # the fused maps weighted equally (the defaults before the synthetic weighting), on the same trained model
    "def+equal_weights": {"from": "def", "refit": {"fusion_weights": "equal"}},
    # inference-side levers on one trained model (no retraining)
    "nd+fg": {"from": "bn_fix_no_d", "refit": {"foreground": "auto"}},
    "nd+stages234": {"from": "bn_fix_no_d", "refit": {"foreground": "auto", "stages": [2, 3, 4]}},
    "nd+stages234+top1pct": {"from": "bn_fix_no_d", "refit": {"foreground": "auto", "stages": [2, 3, 4],
                                                              "score_topk": 0.01}},
    "nd+stages234+quantile": {"from": "bn_fix_no_d", "refit": {"foreground": "auto", "stages": [2, 3, 4],
                                                               "map_normalization": "quantile"}},
    "nd+stages34": {"from": "bn_fix_no_d", "refit": {"foreground": "auto", "stages": [3, 4]}},
    "nd+zscore": {"from": "bn_fix_no_d", "refit": {"foreground": "auto", "map_normalization": "zscore"}},
    "hard+zscore": {"from": "nd_hard", "refit": {"map_normalization": "zscore"}},
    "hard+zscore+top1pct": {"from": "nd_hard", "refit": {"map_normalization": "zscore", "score_topk": 0.01}},
    "hard+zscore+no_fusion": {"from": "nd_hard", "refit": {"map_normalization": "zscore", "fusion": False}},
    "d+fg": {"from": "bn_fix", "refit": {"foreground": "auto"}},
    "d+top1pct": {"from": "bn_fix", "refit": {"foreground": "auto", "score_topk": 0.01}},
    "d+stages234": {"from": "bn_fix", "refit": {"foreground": "auto", "stages": [2, 3, 4]}},
    "d+stages234+top1pct": {"from": "bn_fix", "refit": {"foreground": "auto", "stages": [2, 3, 4],
                                                        "score_topk": 0.01}},
    "old+recal": {"from": "old", "refit": {"bn_recalibrate": 256}},
    "nd_no_se": {"train": {"discriminator": False, "adversarial_weight": 0.0, "foreground": "off",
                           "student_se": False}},
    "nd+no_fusion": {"from": "bn_fix_no_d", "refit": {"foreground": "auto", "fusion": False}},
    "fn+quantile": {"from": "feature_norm", "refit": {"map_normalization": "quantile"}},
    "fn+top1pct": {"from": "feature_norm", "refit": {"score_topk": 0.01}},
    "fn+stages234": {"from": "feature_norm", "refit": {"stages": [2, 3, 4]}},
    "fn+stages34": {"from": "feature_norm", "refit": {"stages": [3, 4]}},
    "fn+stage4": {"from": "feature_norm", "refit": {"stages": [4]}},
    "fn+fg_off": {"from": "feature_norm", "refit": {"foreground": "off"}},
}


def find_categories(root: Path, wanted: list[str] | None = None) -> dict[str, Path]:
    """``{name: folder}``: the root itself when it is one dataset (``train/``, ``Train/`` or
    ``splits.json``), else its subfolders holding ``train/`` and ``test/`` (MVTec AD categories)."""
    if not root.is_dir():
        raise SystemExit(f"{root}: dataset folder not found")
    if any((root / n).exists() for n in ("train", "Train", "splits.json")):
        found = {root.name: root}
    else:
        found = {d.name: d for d in sorted(root.iterdir()) if (d / "train").is_dir() and (d / "test").is_dir()}
    if not found:
        raise SystemExit(f"{root}: no dataset here (expected train/ and test/, a splits.json, or category folders)")
    if wanted:
        unknown = sorted(set(wanted) - set(found))
        if unknown:
            raise SystemExit(f"{root}: no category {', '.join(unknown)} (found: {', '.join(found)})")
        found = {k: found[k] for k in wanted}
    return found


def build_config(args, dataset_dir: Path, overrides: dict):
    from monai_multiad.config import RunConfig

    options = {
        "dataset_dir": str(dataset_dir), "backbone": args.backbone, "image_size": args.image_size,
        "epochs": args.epochs, "max_steps": args.max_steps, "seed": args.seed, "device": args.device,
    }
    if args.pretrained is None and args.backbone == "resnet18":  # no ImageNet weights ship for it
        options["pretrained"] = "none"
    for name in ("in_channels", "batch_size", "pretrained"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.no_se:
        options["student_se"] = False
    if args.no_discriminator:
        options.update(discriminator=False, adversarial_weight=0.0)
    if args.no_fusion:
        options["fusion"] = False
    return RunConfig(**{**options, **overrides})


def versions() -> dict:
    import ignite
    import monai
    import numpy
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
            "ignite": ignite.__version__, "numpy": numpy.__version__, "platform": platform.platform()}


def run_one(args, name: str, folder: Path, config: str, overrides: dict) -> dict:
    from monai_multiad import inference, workflow

    cfg = build_config(args, folder, overrides)
    run_dir = Path(args.out) / "runs" / config / name
    print(f"[accuracy] {config} / {name}: training on {folder}", file=sys.stderr, flush=True)
    summary = workflow.train(cfg, run_dir, progress=False)
    t0 = time.perf_counter()
    metrics = inference.evaluate(run_dir, device=args.device)
    row = {"config": config, "category": name, **{k: metrics[k] for k in METRICS},
           "train_seconds": summary["train_seconds"], "eval_seconds": round(time.perf_counter() - t0, 1),
           "epochs": summary["epochs"], "iterations": summary["iterations"],
           "train_images": summary["train_images"], "val_images": summary["val_images"],
           "test_images": metrics["num_images"], "test_anomalous": metrics["num_anomalous"],
           "device": summary["device"], "seed": cfg.seed, "run_dir": str(run_dir), "options": cfg.to_dict()}
    print("[accuracy] " + ", ".join(f"{k} {row[k]:.4f}" for k in METRICS), file=sys.stderr, flush=True)
    return row


def refit_one(args, name: str, config: str, spec: dict, rows: list[dict]) -> dict:
    """A trained variant's model with other map/score options: refit the fusion on the same
    normal validation images, write a new run folder, evaluate once."""
    import dataclasses

    from torch.utils.data import DataLoader

    from monai_multiad import inference, workflow
    from monai_multiad.data import datasets
    from monai_multiad.engines.evaluator import fit_fusion, fit_memory_bank
    from monai_multiad.outputs import write_json

    base = next((r for r in rows if r["config"] == spec["from"] and r["category"] == name), None)
    if base is None:
        raise SystemExit(f"study variant {config} needs {spec['from']} first (add it to --variants)")
    network, cfg, _ = workflow.load_model(base["run_dir"], "cpu")
    cfg = dataclasses.replace(cfg, **spec["refit"])
    cfg = workflow.resolve_options(cfg)
    device = workflow.resolve_device(args.device)
    refit = workflow.MultiAD(**{**cfg.model_kwargs(), "pretrained": False})
    # the fusion is refitted below (a memory bank adds a map to it); a new bank is filled below
    # (and a refit without a bank or head drops the trained one's)
    dropped = ("fusion.", "memory_bank.") + (() if refit.segmentation_head is not None else ("segmentation_head.",))
    state = {k: v for k, v in network.state_dict().items() if not k.startswith(dropped)}
    missing, unexpected = refit.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("fusion.", "memory_bank.", "segmentation_head.")) for k in missing):
        raise SystemExit(f"study variant {config}: refit cannot change the networks ({unexpected or missing})")
    refit.to(device)
    train_ds, val_ds = datasets.build_datasets(cfg, "train")
    t_bank = time.perf_counter()
    # a head the trained run already has is kept as it was trained
    head_loss = None if network.segmentation_head is not None else \
        workflow.train_segmentation_head(cfg, refit, train_ds, device)
    head_seconds = time.perf_counter() - t_bank
    t_bank = time.perf_counter()
    bank = fit_memory_bank(refit, datasets.fixed_normals_loader(train_ds, cfg), device, seed=cfg.seed)
    bank_seconds = time.perf_counter() - t_bank
    if spec["refit"].get("bn_recalibrate", 0) > 0:  # re-estimate the student's BatchNorm statistics only
        from monai_multiad.handlers import BatchNormRecalibration

        BatchNormRecalibration(refit, datasets.fixed_normals_loader(train_ds, cfg), cfg.bn_recalibrate, device)()
    run_dir = Path(args.out) / "runs" / config / name
    print(f"[accuracy] {config} / {name}: refit of {spec['from']} with {spec['refit']}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    stats = fit_fusion(refit, DataLoader(val_ds, batch_size=cfg.batch_size), device, cfg.threshold_quantile,
                       normalization=cfg.map_normalization, **workflow.fusion_weighting(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", cfg.to_dict())
    workflow.save_model(run_dir / "model.pt", refit, cfg, stats)
    refit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = inference.evaluate(run_dir, device=args.device)
    row = {**base, "config": config, **{k: metrics[k] for k in METRICS},
           "eval_seconds": round(time.perf_counter() - t0, 1), "refit_seconds": round(refit_seconds, 1),
           "memory_bank": bank, "bank_seconds": round(bank_seconds, 1),
           "segmentation_head_loss": head_loss, "head_seconds": round(head_seconds, 1), "run_dir": str(run_dir), "options": cfg.to_dict(), "from": spec["from"]}
    print("[accuracy] " + ", ".join(f"{k} {row[k]:.4f}" for k in METRICS), file=sys.stderr, flush=True)
    return row


def raw_intensity_row(args, name: str, folder: Path) -> dict:
    """The bar any FLAIR map must clear: each pixel scored by its own normalised intensity,
    Gaussian-smoothed (sigma 4 px at 256 px, scaled to the image size), image score = mean of the
    top 1 % pixels; same test slices, masks and metrics as the models."""
    from torch.utils.data import DataLoader

    from monai_multiad import inference
    from monai_multiad.data import datasets
    from monai_multiad.networks.fusion import GaussianSmoothing

    cfg = build_config(args, folder, {})
    test = datasets.build_datasets(cfg, "test")
    smooth = GaussianSmoothing(4.0 * args.image_size / 256)
    key, extra = inference.anomaly_metrics(pixel=True)
    metrics = {**key, **extra}
    for m in metrics.values():
        m.reset()
    for batch in DataLoader(test, batch_size=32):
        amap = smooth(batch["image"].float().mean(dim=1, keepdim=True))
        flat = amap.flatten(1)
        score = flat.topk(max(1, flat.shape[1] // 100), dim=1).values.mean(dim=1)
        out = {**batch, "anomaly_map": amap, "score": score}
        for m in metrics.values():
            m.update(m._output_transform(out))
    values = {k: m.compute() for k, m in metrics.items()}
    row = {"config": "raw_intensity", "category": name, "image_auroc": values["image_auroc"],
           "pixel_auroc": values["pixel_auroc"], "aupro": values["aupro"], "f1_max": values["f1"]["f1_max"],
           "train_seconds": 0.0, "epochs": 0, "iterations": 0, "device": "cpu", "seed": cfg.seed,
           "test_images": len(test), "run_dir": "", "options": cfg.to_dict()}
    print("[accuracy] raw intensity: " + ", ".join(f"{k} {row[k]:.4f}" for k in METRICS), file=sys.stderr, flush=True)
    return row


def means(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for config in dict.fromkeys(r["config"] for r in rows):
        sel = [r for r in rows if r["config"] == config]
        out[config] = {k: sum(r[k] for r in sel) / len(sel) for k in (*METRICS, "train_seconds")}
        out[config]["categories"] = len(sel)
    return out


def _f(v) -> str:
    return f"{100 * v:.1f}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [f"# Multi-AD accuracy ({m['date']})", "",
             f"dataset {m['dataset_dir']}; backbone {m['backbone']}, {m['image_size']} px, seed {m['seed']}, "
             f"device {m['device']}; torch {m['versions']['torch']}, monai {m['versions']['monai']}. "
             "Metrics in %: image AUROC, pixel AUROC, AUPRO (to FPR 0.3), image F1-max.", ""]
    head = "| image AUROC | pixel AUROC | AUPRO | F1-max | train s |"
    for config in report["means"]:
        lines += [f"## {config}", "", "| category " + head, "|---|---|---|---|---|---|"]
        for r in (r for r in report["rows"] if r["config"] == config):
            lines.append(f"| {r['category']} | " + " | ".join(_f(r[k]) for k in METRICS) + f" | {r['train_seconds']:.0f} |")
        mean = report["means"][config]
        lines += ["| **mean** | " + " | ".join(_f(mean[k]) for k in METRICS) + f" | {mean['train_seconds']:.0f} |", ""]
    if len(report["means"]) > 1:
        lines += ["## Ablation (mean over categories)", "", "| configuration " + head, "|---|---|---|---|---|---|"]
        for config, mean in report["means"].items():
            lines.append(f"| {config} | " + " | ".join(_f(mean[k]) for k in METRICS) + f" | {mean['train_seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset-dir", required=True, help="MVTec AD root or category, BMAD root, or volume folder")
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, runs/)")
    p.add_argument("--categories", nargs="+", help="MVTec AD root: only these categories (default: all)")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   choices=("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "se_resnet50", "resnet18"))
    p.add_argument("--pretrained", help="teacher weights: imagenet (default; resnet18: none, a random teacher "
                   "for smoke tests only), none, or a .pth file")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many iterations (0: no limit)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--in-channels", type=int, choices=(1, 3))
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-se", action="store_true", help="student without SE blocks")
    p.add_argument("--no-discriminator", action="store_true", help="no discriminator (the default since the study)")
    p.add_argument("--no-fusion", action="store_true", help="last-stage map only")
    p.add_argument("--ablation", action="store_true", help="run full (the defaults), no_se, with_discriminator and no_fusion")
    p.add_argument("--study", action="store_true", help="run the accuracy study's variants (STUDY)")
    p.add_argument("--variants", nargs="+", help="--study: only these variants, in this order")
    p.add_argument("--keep", action="store_true",
                   help="keep the rows already in --out/results.json and run only the missing ones")
    p.add_argument("--raw-intensity", action="store_true",
                   help="also score the raw (normalised, smoothed) intensity as a detector: the bar for MRI maps")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=JSON",
                   help="extra RunConfig options for every run, e.g. early_stop_patience=0 val_fraction=0.1")
    args = p.parse_args(argv)
    if args.ablation and (args.no_se or args.no_discriminator or args.no_fusion):
        p.error("--ablation runs every switch itself: do not combine it with --no-se/--no-discriminator/--no-fusion")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    root, out = Path(args.dataset_dir), Path(args.out)
    categories = find_categories(root, args.categories)
    if args.study:
        unknown = sorted(set(args.variants or ()) - set(STUDY))
        if unknown:
            raise SystemExit(f"unknown study variant(s) {', '.join(unknown)}; known: {', '.join(STUDY)}")
        configs = {k: STUDY[k] for k in (args.variants or STUDY)}
    elif args.ablation:
        configs = CONFIGS
    else:
        name = "_".join(n for n, on in (("no_se", args.no_se), ("no_discriminator", args.no_discriminator),
                                        ("no_fusion", args.no_fusion)) if on) or "full"
        configs = {name: {}}
    report = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "dataset_dir": str(root), "categories": list(categories), "backbone": args.backbone,
                       "image_size": args.image_size, "seed": args.seed, "device": args.device,
                       "configs": {k: v for k, v in configs.items()}, "argv": sys.argv[1:] if argv is None else list(argv),
                       "versions": versions(),
                       "selection": "validation split of normal training images only; test split evaluated once"},
              "rows": [], "means": {}}
    out.mkdir(parents=True, exist_ok=True)
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    done: set[tuple[str, str]] = set()
    if args.keep and (out / "results.json").is_file():  # go on from an interrupted study
        report["rows"] = json.loads((out / "results.json").read_text())["rows"]
        done = {(r["config"], r["category"]) for r in report["rows"]}
    if args.raw_intensity:
        report["rows"] += [raw_intensity_row(args, name, folder) for name, folder in categories.items()
                           if ("raw_intensity", name) not in done]
    for config, overrides in configs.items():
        for name, folder in categories.items():
            if (config, name) in done:
                continue
            if args.study and "from" in overrides:
                report["rows"].append(refit_one(args, name, config, overrides, report["rows"]))
            else:
                spec = overrides.get("train", overrides) if args.study else overrides
                report["rows"].append(run_one(args, name, folder, config, {**extra, **spec}))
            report["means"] = means(report["rows"])
            report["meta"]["device"] = report["rows"][-1]["device"]
            (out / "results.json").write_text(json.dumps(report, indent=2))  # after each run: partial results survive
            (out / "results.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
