"""Draw the figures of ``docs/results.md``: ROC curves and bars of a metric per data set and variant.

    # ROC curves from the scores.csv files that `multiad evaluate` (and accuracy.py) write
    python benchmarks/plot_results.py roc runs/tile256/runs/def/magnetic_tile/scores.csv:"Multi-AD defaults" \
        --out docs/images/roc.png
    # image AUROC per data set and variant, from accuracy.py's results.json or a CSV such as
    # benchmarks/history/accuracy_study.csv (columns dataset, variant, seed, image_auroc, ...)
    python benchmarks/plot_results.py bars benchmarks/history/accuracy_study.csv \
        --groups extra_maps_256 peers --variants st st_dn50+head+bank patchcore stfpm \
        --label st="student alone" --label st_dn50+head+bank="Multi-AD defaults" \
        --label patchcore=PatchCore --label stfpm=STFPM --out docs/images/image_auroc.png

Pure numpy + Pillow (no plotting library).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot_roc import COLOURS, curves_from, font as load_font, plot as plot_roc  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


def read_rows(path: Path) -> list[dict]:
    """Rows with ``dataset``, ``variant``, ``seed`` and the metrics as floats (missing: None), from
    accuracy.py's ``results.json`` (``category``/``config``) or a CSV with those columns."""
    if path.suffix == ".json":
        raw = [{**r, "dataset": r["category"], "variant": r["config"]} for r in json.loads(path.read_text())["rows"]]
    else:
        with path.open(newline="") as f:
            raw = list(csv.DictReader(f))
    rows = []
    for r in raw:
        row = {"dataset": r["dataset"], "variant": r["variant"], "seed": str(r.get("seed", "")),
               "group": r.get("group", "")}
        for k in METRICS:
            v = r.get(k)
            row[k] = float(v) if v not in (None, "") else None
        rows.append(row)
    return rows


def plot_bars(rows: list[dict], metric: str, labels: dict[str, str], out: Path, title: str = "",
              lo: float = 0.5) -> None:
    """Grouped bars: one group per data set, one bar per (variant, seed), the value printed above it;
    the axis runs from ``lo`` to 1."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    keys = list(dict.fromkeys((r["variant"], r["seed"]) for r in rows))
    seeds_per_variant = {v: {s for vv, s in keys if vv == v} for v, _ in keys}

    def name(variant: str, seed: str) -> str:
        base = labels.get(variant, variant)
        return f"{base}, seed {seed}" if len(seeds_per_variant[variant]) > 1 and seed else base

    colour = {k: COLOURS[i % len(COLOURS)] for i, k in enumerate(keys)}
    font, small = load_font(15), load_font(13)
    bar, gap, plot_h, left, top = 34, 40, 320, 60, 50
    per_group = [[r for r in rows if r["dataset"] == d and r[metric] is not None] for d in datasets]
    width = left + sum(len(g) * bar + gap for g in per_group) + gap + 20
    legend_h = 22 * len(keys) + 10
    img = Image.new("RGB", (max(width, 520), top + plot_h + 60 + legend_h), "white")
    draw = ImageDraw.Draw(img)

    def y(v: float) -> float:
        return top + plot_h * (1 - (v - lo) / (1 - lo))

    for t in np.linspace(lo, 1, int(round((1 - lo) / 0.1)) + 1):
        draw.line([(left, y(t)), (width - 20, y(t))], fill=(225, 225, 225))
        draw.text((left - 38, y(t) - 7), f"{t:.1f}", fill="black", font=small)
    draw.line([(left, top), (left, top + plot_h), (width - 20, top + plot_h)], fill="black")
    draw.text((left, 12), title or metric.replace("_", " "), fill="black", font=font)
    x = left + gap
    for dataset, group in zip(datasets, per_group):
        x0 = x
        for r in group:
            v = r[metric]
            draw.rectangle([(x, y(max(v, lo))), (x + bar - 4, top + plot_h)], fill=colour[(r["variant"], r["seed"])])
            draw.text((x - 2, y(max(v, lo)) - 17), f"{100 * v:.1f}", fill="black", font=small)
            x += bar
        draw.text((x0, top + plot_h + 8), dataset, fill="black", font=font)
        x += gap
    ly = top + plot_h + 40
    for k in keys:
        draw.rectangle([(left, ly + 3), (left + 14, ly + 15)], fill=colour[k])
        draw.text((left + 22, ly), name(*k), fill="black", font=font)
        ly += 22
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    roc = sub.add_parser("roc", help="ROC curves from scores.csv files")
    roc.add_argument("scores", nargs="+", help="scores.csv files, each optionally as PATH:NAME")
    roc.add_argument("--title", default="")
    roc.add_argument("--out", required=True, help="output PNG")
    bars = sub.add_parser("bars", help="a metric per data set and variant")
    bars.add_argument("sources", nargs="+", help="accuracy.py results.json files or CSVs (dataset, variant, seed, metrics)")
    bars.add_argument("--metric", default="image_auroc", choices=METRICS)
    bars.add_argument("--groups", nargs="+", help="CSV: only rows of these groups")
    bars.add_argument("--variants", nargs="+", help="only these variants, in this order")
    bars.add_argument("--datasets", nargs="+", help="only these data sets, in this order")
    bars.add_argument("--seeds", nargs="+", help="only these seeds (rows without a seed are kept)")
    bars.add_argument("--label", action="append", default=[], metavar="VARIANT=TEXT", help="legend text of a variant")
    bars.add_argument("--title", default="")
    bars.add_argument("--min", type=float, default=0.5, help="lower end of the axis")
    bars.add_argument("--out", required=True, help="output PNG")
    args = parser.parse_args(argv)

    if args.command == "roc":
        plot_roc(curves_from(args.scores), Path(args.out), args.title)
    else:
        rows = [r for src in args.sources for r in read_rows(Path(src))]
        if args.groups:
            rows = [r for r in rows if r["group"] in args.groups]
        if args.seeds:
            rows = [r for r in rows if r["seed"] in args.seeds or r["seed"] == ""]
        if args.variants:
            rows = sorted((r for r in rows if r["variant"] in args.variants), key=lambda r: args.variants.index(r["variant"]))
        if args.datasets:
            rows = sorted((r for r in rows if r["dataset"] in args.datasets), key=lambda r: args.datasets.index(r["dataset"]))
        rows = [r for r in rows if r[args.metric] is not None]
        if not rows:
            raise SystemExit("no rows left to draw")
        labels = dict(item.split("=", 1) for item in args.label)
        plot_bars(rows, args.metric, labels, Path(args.out), args.title, args.min)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
