"""Accuracy benchmark of Multi-AD: train on normals, evaluate on the test split, tabulate.

For each category of ``--dataset-dir`` (an MVTec AD root with several categories, one category
folder, a BMAD root, or a volume folder with ``splits.json`` such as ``lgg_flair``): build a
:class:`~monai_multiad.config.RunConfig`, :func:`monai_multiad.workflow.train` (model selection and
the fusion's statistics use a validation split of *normal training* images only),
:func:`monai_multiad.inference.evaluate` on the test split once, and collect image AUROC,
pixel AUROC, AUPRO (to FPR 0.3), F1-max, training time, device, versions and seed.
Nothing here looks at the test split before the single evaluation of a trained run.

``--ablation`` runs four configurations (full, no SE, no discriminator, no fusion) and writes
one table. Output in ``--out``: ``results.json``, ``results.md`` and ``runs/<config>/<category>/``
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
    "no_discriminator": {"discriminator": False, "adversarial_weight": 0.0},
    "no_fusion": {"fusion": False},
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
    p.add_argument("--backbone", default="efficientnet_lite0", choices=("efficientnet_lite0", "se_resnet50", "resnet18"))
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
    p.add_argument("--no-discriminator", action="store_true", help="adversarial weight 0, no discriminator")
    p.add_argument("--no-fusion", action="store_true", help="last-stage map only")
    p.add_argument("--ablation", action="store_true", help="run full, no_se, no_discriminator and no_fusion")
    args = p.parse_args(argv)
    if args.ablation and (args.no_se or args.no_discriminator or args.no_fusion):
        p.error("--ablation runs every switch itself: do not combine it with --no-se/--no-discriminator/--no-fusion")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    root, out = Path(args.dataset_dir), Path(args.out)
    categories = find_categories(root, args.categories)
    if args.ablation:
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
    for config, overrides in configs.items():
        for name, folder in categories.items():
            report["rows"].append(run_one(args, name, folder, config, overrides))
            report["means"] = means(report["rows"])
            report["meta"]["device"] = report["rows"][-1]["device"]
            (out / "results.json").write_text(json.dumps(report, indent=2))  # after each run: partial results survive
            (out / "results.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
