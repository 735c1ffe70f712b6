"""``report.html``: one screening's results as a single self-contained page to open in a browser.

Scans are listed by scan score, highest first; a flagged scan (score above the threshold) is
marked, and the page says which threshold was used and where it came from (the rows'
``threshold_source`` and ``threshold_kind``, :class:`~monai_multiad.report.ReportRow`). Per scan: the
montage ``screen`` wrote (its most anomalous slices, the map over the image, radiological display) and
the slice-score curve along the slice axis as inline SVG.
Scans that could not be screened are listed with their error.

Nothing is fetched: the montages are ``data:`` URIs, the style is inline, there is no script, and a
Content-Security-Policy forbids the browser any other source. Every text is HTML-escaped and the page
is pure ASCII (other characters as references), so it reads the same whatever the locale.

:func:`render_report` is the pure part (rows and per-scan figures in, HTML out);
:func:`write_report_html` reads a screening folder's per-scan files and writes the page atomically.
"""

from __future__ import annotations

import base64
import csv
import datetime
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from monai_multiad.inferers import MONTAGE_SLICES
from monai_multiad.outputs import write_text

__all__ = ["ScanFigures", "render_report", "write_report_html", "load_scan_figures"]

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #1b1b1b; background: #fff; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin: 0 0 0.3em; }
.meta, .caption, .path { color: #555; font-size: 0.9em; }
.path { word-break: break-all; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #eef1f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.flagged td { background: #fde8e6; }
.mark { font-weight: bold; padding: 0.05em 0.45em; border-radius: 0.3em; }
.mark.flagged { color: #fff; background: #c0392b; } .mark.normal { color: #1e6b34; background: #e3f3e6; }
.mark.unknown { color: #555; background: #eee; }
.threshold { background: #f6f7f9; border-left: 4px solid #4a6fa5; padding: 0.5em 0.8em; margin: 0.8em 0; }
section.scan { border-top: 1px solid #ddd; padding: 1em 0; }
section.scan.flagged { border-left: 4px solid #c0392b; padding-left: 0.8em; }
img.montage { max-width: 100%; image-rendering: pixelated; background: #000; display: block; }
svg.curve { display: block; margin-top: 0.6em; max-width: 100%; }
td.error { color: #8a1c12; }
"""


@dataclass
class ScanFigures:
    """What the page shows of one scan beyond its report row."""

    montage_png: bytes | None = None  #: the PNG bytes of its montage
    montage_slices: list[int] = field(default_factory=list)  #: the montage's slices, left to right
    slice_scores: list[tuple[int, float]] = field(default_factory=list)  #: (canonical slice, score), by slice
    axis: str | None = None  #: the slice axis ("axial", ...)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or x == "":
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if math.isfinite(x) else str(x)
    if isinstance(x, (list, tuple)):
        return ", ".join(_fmt(v, digits) for v in x)
    return str(x)


def _e(x: Any, digits: int = 4) -> str:
    return escape(_fmt(x, digits), quote=True)


def _score(row: Mapping) -> float:
    s = row.get("scan_score")
    try:
        s = float(s)
    except (TypeError, ValueError):
        return -math.inf
    return s if math.isfinite(s) else -math.inf


def _mark(anomalous: Any) -> str:
    if anomalous is True:
        return '<span class="mark flagged">FLAGGED</span>'
    if anomalous is False:
        return '<span class="mark normal">normal</span>'
    return '<span class="mark unknown">no threshold</span>'


def _flatten(obj: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar and short-list items of a (nested) dict as ``("a.b", value)``; long lists (scores) left out."""
    items: list[tuple[str, Any]] = []
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            items += _flatten(v, key + ".")
        elif isinstance(v, (list, tuple)):
            if len(v) <= 4 and all(isinstance(t, (int, float, str, bool)) or t is None for t in v):
                items.append((key, list(v)))
        else:
            items.append((key, v))
    return items


def _threshold_block(rows: Sequence[Mapping], source: str | None, calibration: Mapping | None) -> str:
    used = any(r.get("threshold_kind") == "calibrated" for r in rows)
    thresholds = sorted({float(r["threshold"]) for r in rows if r.get("threshold") is not None})
    if not thresholds:
        text = "No threshold is known for this run: no scan is flagged; the scores can still be ranked."
    else:
        shown = " / ".join(_e(t, 6) for t in thresholds)
        text = (f'Threshold on the scan score: <b class="threshold-value">{shown}</b>. A scan is '
                f'<span class="mark flagged">FLAGGED</span> when its score is above it.')
    parts = [f'<div class="threshold" id="threshold"><p>{text}</p>']
    if source:
        parts.append(f'<p class="threshold-source">Where it comes from: {escape(source)}</p>')
    slice_thr = sorted({float(r["slice_threshold"]) for r in rows if r.get("slice_threshold") is not None})
    if slice_thr:
        slice_src = next((str(r["slice_threshold_source"]) for r in rows if r.get("slice_threshold_source")), "")
        parts.append(f'<p class="slice-threshold">Slice threshold (the dashed line of the slice-score curves): '
                     f'<b>{" / ".join(_e(t, 6) for t in slice_thr)}</b>{"; " if slice_src else ""}'
                     f'{escape(slice_src)}</p>')
    if calibration:
        items = "".join(f"<tr><th>{escape(k)}</th><td>{_e(v, 6)}</td></tr>" for k, v in _flatten(calibration)[:40])
        parts.append(f'<details class="calibration"><summary>The run&#x27;s calibration record (calibration.json in '
                     f'the run folder{"" if used else "; not the threshold used here"})</summary>'
                     f'<table>{items}</table></details>')
    parts.append("</div>")
    return "".join(parts)


def _curve_svg(scores: Sequence[tuple[int, float]], threshold: float | None, top: Sequence[int],
               num_slices: int | None, axis: str | None, threshold_label: str = "threshold", width: int = 640,
               height: int = 170) -> str:
    """The slice scores along the axis as an SVG polyline, the threshold dashed, the top slices dotted."""
    scores = [(int(k), float(s)) for k, s in scores if math.isfinite(s)]  # a NaN would break the SVG
    threshold = threshold if threshold is not None and math.isfinite(threshold) else None
    if not scores:
        return '<p class="caption">No slice scores.</p>'
    left, right, top_pad, bottom = 56, 12, 10, 34
    ks = [k for k, _ in scores]
    vals = [s for _, s in scores]
    x0, x1 = 0, max((num_slices or 0) - 1, max(ks), 1)
    shown = vals + ([threshold] if threshold is not None else [])
    lo, hi = min(shown), max(shown)
    pad = 0.08 * (hi - lo) if hi > lo else max(abs(hi) * 0.1, 1e-3)
    lo, hi = lo - pad, hi + pad
    w, h = width - left - right, height - top_pad - bottom

    def px(k: float) -> float:
        return left + (k - x0) / (x1 - x0) * w

    def py(s: float) -> float:
        return top_pad + (hi - s) / (hi - lo) * h

    out = [f'<svg class="curve" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img"><title>slice score along the {_e(axis or "slice")} axis'
           f'</title><rect x="{left}" y="{top_pad}" width="{w}" height="{h}" fill="#fafbfc" stroke="#bbb"/>']
    pts = " ".join(f"{px(k):.1f},{py(s):.1f}" for k, s in scores)
    out.append(f'<polyline class="scores" fill="none" stroke="#2c5d9e" stroke-width="1.5" points="{pts}"/>')
    if threshold is not None and lo <= threshold <= hi:
        y = py(threshold)
        out.append(f'<line class="threshold" x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#c0392b" '
                   f'stroke-dasharray="5,4"/><text x="{left + w - 4}" y="{y - 4:.1f}" font-size="11" fill="#c0392b" '
                   f'text-anchor="end">{escape(threshold_label)} {_e(threshold)}</text>')
    by_slice = dict(scores)
    for k in top:
        if k in by_slice:
            out.append(f'<circle class="top" cx="{px(k):.1f}" cy="{py(by_slice[k]):.1f}" r="3.5" fill="#c0392b"/>')
    for s in (lo, hi):
        out.append(f'<text x="{left - 6}" y="{py(s) + 4:.1f}" font-size="11" text-anchor="end">{_e(s, 3)}</text>')
    for k in (x0, x1):
        out.append(f'<text x="{px(k):.1f}" y="{top_pad + h + 14}" font-size="11" text-anchor="middle">{k}</text>')
    out.append(f'<text x="{left + w / 2:.1f}" y="{height - 4}" font-size="11" text-anchor="middle">slice index '
               f'({_e(axis or "slice")} axis); red dots: the top slices</text></svg>')
    return "".join(out)


def _scan_section(i: int, row: Mapping, fig: ScanFigures | None) -> str:
    flagged = row.get("anomalous") is True
    fig = fig or ScanFigures()
    parts = [f'<section class="scan{" flagged" if flagged else ""}" id="scan-{i}">',
             f'<h2>{i}. <span class="name">{_e(row.get("name"))}</span> {_mark(row.get("anomalous"))}</h2>',
             f'<p class="path">{_e(row.get("scan"))}</p>',
             f'<p>Scan score <b>{_e(row.get("scan_score"))}</b> (threshold {_e(row.get("threshold"))}); top slices '
             f'{_e(row.get("top_slices"))}; {_e(row.get("screened_slices"))} of {_e(row.get("num_slices"))} slices '
             f'screened.</p>']
    if fig.montage_png:
        data = base64.b64encode(fig.montage_png).decode("ascii")
        slices = f"slices {_e(fig.montage_slices)}" if fig.montage_slices else "the most anomalous slices"
        parts.append(f'<img class="montage" alt="montage of {_e(row.get("name"))}" '
                     f'src="data:image/png;base64,{data}">'
                     f'<p class="caption">Montage: {slices} (highest score first), anomaly map over the image, '
                     f'radiological display.</p>')
    else:
        parts.append('<p class="caption">No montage was found for this scan.</p>')
    slice_thr = row.get("slice_threshold")  # slices are marked against it where the row has one
    parts.append(_curve_svg(fig.slice_scores, row.get("threshold") if slice_thr is None else slice_thr,
                            row.get("top_slices") or [], row.get("num_slices"), fig.axis,
                            "threshold" if slice_thr is None else "slice threshold"))
    parts.append("</section>")
    return "".join(parts)


def render_report(rows: Sequence[Mapping], figures: Mapping[str, ScanFigures] | None = None, *,
                  threshold_source: str | None = None, calibration: Mapping | None = None,
                  run: str | None = None, generated: str | None = None,
                  title: str = "multiad screening report") -> str:
    """The page for the report ``rows`` of :func:`~monai_multiad.cohort.screen_paths`.

    Args:
        rows: one dict per scan (``name``, ``scan``, ``status``, ``scan_score``, ``anomalous``,
            ``threshold``, ``top_slices``, ``num_slices``, ``screened_slices``, ``error``; optional
            ``threshold_source``), in any order: the page sorts the screened ones by score, highest first.
        figures: per row ``name``, its :class:`ScanFigures` (montage, slice scores).
        threshold_source: where the threshold came from, in words (a row's ``threshold_source`` wins).
        calibration: the run's ``calibration.json``, shown as a table when given.
        run, generated: shown in the header (the run folder; when the page was made).

    Returns:
        the HTML document, ASCII only.
    """
    figures = figures or {}
    ok = sorted((r for r in rows if r.get("status", "ok") == "ok"), key=lambda r: (-_score(r), str(r.get("name"))))
    failed = [r for r in rows if r.get("status", "ok") != "ok"]
    sources = [str(r["threshold_source"]) for r in rows if r.get("threshold_source")]
    source = sources[0] if sources else threshold_source
    n_flagged = sum(r.get("anomalous") is True for r in ok)
    meta = [f"{len(rows)} scans: {len(ok)} screened, {n_flagged} flagged, {len(failed)} failed."]
    if run:
        meta.append(f"Run: {escape(run)}.")
    if generated:
        meta.append(f"Written {escape(generated)}.")
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
             f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
             f'<h1>{escape(title)}</h1><p class="meta">{" ".join(meta)}</p>',
             _threshold_block(rows, source, calibration)]
    if ok:
        body = []
        for i, r in enumerate(ok, 1):
            flagged = r.get("anomalous") is True
            body.append(f'<tr class="{"flagged" if flagged else "scan"}"><td class="num">{i}</td>'
                        f'<td class="name"><a href="#scan-{i}">{_e(r.get("name"))}</a></td>'
                        f'<td class="num score">{_e(r.get("scan_score"))}</td><td>{_mark(r.get("anomalous"))}</td>'
                        f'<td>{_e(r.get("top_slices"))}</td><td class="num">{_e(r.get("screened_slices"))}</td></tr>')
        parts.append('<table id="scans"><caption>Screened scans, highest score first</caption><thead><tr><th>#</th>'
                     '<th>Scan</th><th>Scan score</th><th>Result</th><th>Top slices</th><th>Slices screened</th>'
                     f'</tr></thead><tbody>{"".join(body)}</tbody></table>')
    else:
        parts.append("<p>No scan could be screened.</p>")
    if failed:
        body = "".join(f'<tr><td class="name">{_e(r.get("name"))}</td><td class="path">{_e(r.get("scan"))}</td>'
                       f'<td class="error">{_e(r.get("error") or "unknown error")}</td></tr>' for r in failed)
        parts.append('<h2 id="failed-title">Scans that could not be screened</h2><table id="failed"><thead><tr>'
                     f'<th>Scan</th><th>Path</th><th>Error</th></tr></thead><tbody>{body}</tbody></table>')
    parts += [_scan_section(i, r, figures.get(str(r.get("name")))) for i, r in enumerate(ok, 1)]
    parts.append("</body></html>\n")
    return "".join(parts).encode("ascii", "xmlcharrefreplace").decode("ascii")


def load_scan_figures(folder: str | Path) -> ScanFigures:
    """A scan's figures from the folder ``screen`` wrote for it (missing files leave blanks)."""
    folder = Path(folder)
    fig = ScanFigures()
    try:
        fig.montage_png = (folder / "montage.png").read_bytes()
    except OSError:
        pass
    try:
        with (folder / "slice_scores.csv").open(newline="") as f:
            fig.slice_scores = sorted((int(r["slice"]), float(r["score"])) for r in csv.DictReader(f))
    except (OSError, KeyError, ValueError):
        pass
    try:
        result = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        result = {}
    fig.axis = result.get("slice_axis")
    if fig.slice_scores:  # the montage's slices: the highest-scored ones, as screen_volume picks them
        n = max(int(result.get("top_k") or 0), MONTAGE_SLICES)
        fig.montage_slices = [k for k, _ in sorted(fig.slice_scores, key=lambda t: (-t[1], t[0]))[:n]]
    return fig


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_report_html(out_dir: str | Path, rows: Sequence[Mapping], run_dir: str | Path | None = None) -> Path:
    """Write ``out_dir/report.html`` for the rows of a screening into ``out_dir`` (atomically).

    The montages and slice scores are read from each scan's folder ``out_dir/<name>/``; the run's
    ``calibration.json`` (when ``run_dir`` is a run folder) is shown beside the threshold; where the threshold
    came from is the rows' ``threshold_source``. Returns the path."""
    out_dir = Path(out_dir)
    run_folder = None
    if run_dir is not None:
        run_folder = Path(run_dir)
        run_folder = run_folder.parent if run_folder.suffix == ".pt" else run_folder
    calibration = _read_json(run_folder / "calibration.json") if run_folder is not None else None
    calibration = calibration if isinstance(calibration, Mapping) else None
    figures = {str(r.get("name")): load_scan_figures(out_dir / str(r.get("name")))
               for r in rows if r.get("status", "ok") == "ok" and r.get("name")}
    page = render_report(rows, figures, calibration=calibration, run=None if run_folder is None else str(run_folder),
                         generated=datetime.datetime.now().isoformat(timespec="seconds"))
    path = out_dir / "report.html"
    write_text(path, page)
    return path
