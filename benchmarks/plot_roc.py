"""Draw image-level ROC curves from the ``scores.csv`` files that ``multiad evaluate`` writes.

    python benchmarks/plot_roc.py runs/tile/scores.csv:magnetic_tile runs/flair/scores.csv:lgg_flair \
        --out docs/images/roc.png

Pure numpy + Pillow (no plotting library): a square plot with the chance diagonal, one curve
per file, and a legend with each curve's AUROC.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    order = np.argsort(-scores, kind="stable")
    labels, scores = labels[order], scores[order]
    distinct = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(labels)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0, tps / max(labels.sum(), 1)]
    fpr = np.r_[0, fps / max((1 - labels).sum(), 1)]
    return fpr, tpr, float(np.trapezoid(tpr, fpr))


def read_scores(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = list(csv.DictReader(path.open()))
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["score"]) for r in rows])


def curves_from(items: list[str]) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """``PATH[:NAME]`` scores.csv files -> (name, fpr, tpr, AUROC) each; the name defaults to the folder's."""
    curves = []
    for item in items:
        path, _, name = item.partition(":")
        labels, scores = read_scores(Path(path))
        fpr, tpr, auc = roc_curve(labels, scores)
        curves.append((name or Path(path).parent.name, fpr, tpr, auc))
    return curves


def plot(curves: list[tuple[str, np.ndarray, np.ndarray, float]], out: Path, title: str = "",
         size: int = 480) -> None:
    """A square ROC plot: the chance diagonal, one curve per entry, a legend with each AUROC."""
    margin, big, small = 60, font(15), font(13)
    img = Image.new("RGB", (size + 2 * margin, size + 2 * margin), "white")
    draw = ImageDraw.Draw(img)

    def xy(fx: float, fy: float) -> tuple[float, float]:
        return margin + fx * size, margin + (1 - fy) * size

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(170, 170, 170))
    for t in np.linspace(0, 1, 6):
        draw.text((xy(t, 0)[0] - 10, margin + size + 6), f"{t:.1f}", fill="black", font=small)
        draw.text((margin - 32, xy(0, t)[1] - 7), f"{t:.1f}", fill="black", font=small)
    draw.text((margin + size / 2 - 70, margin + size + 28), "false positive rate", fill="black", font=big)
    draw.text((margin, margin - 24), "true positive rate", fill="black", font=big)
    if title:
        draw.text((margin, 10), title, fill="black", font=big)
    for i, (name, fpr, tpr, auc) in enumerate(curves):
        colour = COLOURS[i % len(COLOURS)]
        draw.line([xy(f, t) for f, t in zip(fpr, tpr)], fill=colour, width=2)
        draw.text((margin + size * 0.35, margin + size * 0.75 + 20 * i), f"{name}: AUROC {auc:.3f}",
                  fill=colour, font=big)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scores", nargs="+", help="scores.csv files, each optionally as PATH:NAME")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    plot(curves_from(args.scores), Path(args.out), args.title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
