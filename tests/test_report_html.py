"""report.html: the screening page (order, marks, escaping, nothing fetched), written by `multiad screen`,
and opened in a real headless Chromium (no console message, the table in order, a screenshot with the
table and the first montage)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_multiad.cli import main
from monai_multiad.config import RunConfig
from monai_multiad.data.synthetic_volumes import make_phantom_volume, write_nifti
from monai_multiad.networks import MultiAD
from monai_multiad.report_html import ScanFigures, render_report, write_report_html
from monai_multiad.screening import screen_volume
from monai_multiad.workflow import save_model

ODD_NAME = 'a<b>&c "d"'  # a scan name that must be escaped everywhere it appears


class Page(HTMLParser):
    """What a test reads from a page: table rows by table id (the row's class, its cells' text),
    every attribute value, the image sources, the text of elements by class."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[tuple[str, list[str]]]] = {}
        self.attrs: list[tuple[str, str, str]] = []
        self.images: list[str] = []
        self.tags: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag == "table":
            self._table = a.get("id", "")
            self.tables.setdefault(self._table, [])
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append((a.get("class", ""), []))
        elif tag in ("td", "th") and self._table is not None and self.tables[self._table]:
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1][1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def body_rows(self, table: str) -> list[tuple[str, list[str]]]:
        return [(cls, cells) for cls, cells in self.tables[table] if cells and cells[0] != "#" and cells[0] != "Scan"]


def _png(color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (12, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _rows() -> list[dict]:
    base = {"status": "ok", "threshold": 0.5, "num_slices": 20, "screened_slices": 18, "error": ""}
    return [
        {**base, "scan": "/d/low.nii.gz", "name": "low", "scan_score": 0.1, "anomalous": False, "top_slices": [3, 4]},
        {**base, "scan": "/d/broken.nii.gz", "name": "broken", "status": "failed", "scan_score": None,
         "anomalous": None, "top_slices": [], "error": "broken.nii.gz: not a NIfTI file <header> & more"},
        {**base, "scan": f"/d/{ODD_NAME}.nii.gz", "name": ODD_NAME, "scan_score": 0.9, "anomalous": True,
         "top_slices": [7, 8]},
        {**base, "scan": "/d/mid.nii.gz", "name": "mid", "scan_score": 0.6, "anomalous": True, "top_slices": [1, 2]},
    ]


def _figures() -> dict[str, ScanFigures]:
    return {r["name"]: ScanFigures(_png(), [k for k in r["top_slices"]], [(k, 0.05 * k) for k in range(2, 20)], "axial")
            for r in _rows() if r["status"] == "ok"}


def test_scans_are_sorted_by_score_and_the_flagged_ones_marked():
    page = Page(render_report(_rows(), _figures(), threshold_source="the run's normal threshold"))
    rows = page.body_rows("scans")
    assert [cells[1] for _, cells in rows] == [ODD_NAME, "mid", "low"]  # highest score first
    assert [cells[2] for _, cells in rows] == ["0.9", "0.6", "0.1"]
    assert [cls for cls, _ in rows] == ["flagged", "flagged", "scan"]
    assert [cells[3] for _, cells in rows] == ["FLAGGED", "FLAGGED", "normal"]
    failed = page.body_rows("failed")
    assert failed == [("", ["broken", "/d/broken.nii.gz", "broken.nii.gz: not a NIfTI file <header> & more"])]


def test_threshold_and_its_source_are_shown_and_a_row_source_wins():
    html = render_report(_rows(), _figures(), threshold_source="the run's normal threshold")
    assert 'class="threshold-value">0.5<' in html and "the run&#x27;s normal threshold" in html
    assert "calibration" not in html.lower()  # no calibration given: none shown
    rows = [{**r, "threshold_source": "calibrated at FPR 0.05"} for r in _rows()]
    html = render_report(rows, threshold_source="the run's normal threshold",
                         calibration={"fpr": 0.05, "fpr_interval": [0.02, 0.09], "num_scans": 40,
                                      "scan": {"threshold": 0.5}, "scores": list(range(40))})
    assert "calibrated at FPR 0.05" in html and "normal threshold" not in html
    cal = Page(html).tables[""]  # the calibration table: every short item, long lists left out
    assert ("", ["fpr", "0.05"]) in cal and ("", ["fpr_interval", "0.02, 0.09"]) in cal
    assert ("", ["scan.threshold", "0.5"]) in cal and not any(c[0] == "scores" for _, c in cal)
    rows = [{**r, "slice_threshold": 0.25, "slice_threshold_source": "slice level <calibrated>"} for r in _rows()]
    html = render_report(rows, _figures())
    assert "Slice threshold" in html and "slice level &lt;calibrated&gt;" in html
    assert html.count(">slice threshold 0.25</text>") == 3  # the curves' dashed line is the slice threshold
    no_threshold = [{**r, "threshold": None, "anomalous": None} for r in _rows()]
    assert "No threshold is known" in render_report(no_threshold)


def test_every_text_is_escaped():
    html = render_report(_rows(), _figures())
    assert "a<b>" not in html and '"d"' not in html and "<header>" not in html
    assert "a&lt;b&gt;&amp;c &quot;d&quot;" in html
    page = Page(html)
    assert ODD_NAME in [c[1] for _, c in page.body_rows("scans")]  # and reads back as the name
    assert f"montage of {ODD_NAME}" in [v for tag, k, v in page.attrs if tag == "img" and k == "alt"]
    assert set(page.tags) <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "b", "span", "div",
                              "table", "caption", "thead", "tbody", "tr", "th", "td", "a", "section", "img",
                              "svg", "rect", "polyline", "line", "circle", "text", "details", "summary"}


def test_the_page_is_self_contained():
    html = render_report(_rows(), _figures(), calibration={"fpr": 0.05})
    page = Page(html)
    assert len(page.images) == 3 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert base64.b64decode(page.images[0].split(",", 1)[1]) == _png()
    assert not re.search(r"https?:|//[a-z]|<script|<link|@import|url\(", html, re.I)
    for tag, key, value in page.attrs:  # no attribute refers to anything but the page itself or a data: URI
        if key in ("src", "href"):
            assert value.startswith(("data:", "#")), (tag, key, value)
    assert html.isascii() and "Content-Security-Policy" in html
    assert len(re.findall(r'<polyline class="scores"', html)) == 3
    figures = {"low": ScanFigures(None, [], [(0, 0.1), (1, float("nan")), (2, 0.3)])}  # a NaN slice score
    html = render_report(_rows(), figures)
    assert "nan" not in re.search(r'<polyline class="scores"[^>]*>', html).group(0).lower()
    assert "No montage was found" in html and "No slice scores" in html  # the scans without figures


def test_writer_reads_the_screening_folder_and_the_runs_calibration(tmp_path):
    """The page reads each scan's figures from its folder and where the threshold came from from the rows
    (their ``threshold_source`` and ``threshold_kind``), never from comparing the threshold with the run's."""
    out, run = tmp_path / "out", tmp_path / "run"
    uncalibrated = "uncalibrated: the 0.99 quantile of validation normal slices"
    rows = [{**r, "threshold_source": uncalibrated, "threshold_kind": "uncalibrated"} for r in _rows()]
    for r in rows:
        if r["status"] == "ok":
            folder = out / r["name"]
            folder.mkdir(parents=True)
            (folder / "montage.png").write_bytes(_png((0, 0, 255)))
            (folder / "slice_scores.csv").write_text("slice,array_index,score,above_threshold\n"
                                                     "2,2,0.1,0\n1,1,0.7,1\n3,3,0.3,0\n")
            (folder / "result.json").write_text(json.dumps({"slice_axis": "coronal", "top_k": 1}))
    run.mkdir()
    # a calibration whose scan threshold equals the rows' threshold: the rows still say it was not used
    (run / "calibration.json").write_text(json.dumps({"scan": {"threshold": 0.5, "fpr": 0.05}, "num_scans": 30}))
    path = write_report_html(out, rows, run / "model.pt")
    html = path.read_text()
    assert path == out / "report.html" and not list(out.glob(".report*"))  # written atomically
    assert uncalibrated in html and "coronal axis" in html
    assert base64.b64encode(_png((0, 0, 255))).decode() in html
    assert "slices 1, 3, 2 (highest score first)" in html  # the montage's slices, read from slice_scores.csv
    assert "scan.fpr" in html and "not the threshold used here" in html
    calibrated = "calibrated: FPR 0.05 [0.01, 0.1] on 30 normal scans"
    rows = [{**r, "threshold_source": calibrated, "threshold_kind": "calibrated"} for r in _rows()]
    html = write_report_html(out, rows, run).read_text()
    assert calibrated in html and "scan.fpr" in html and "not the threshold used here" not in html
    rows = [{**r, "threshold_source": "given by the caller", "threshold_kind": "given"} for r in _rows()]
    html = write_report_html(out, rows, run).read_text()
    assert "given by the caller" in html and "not the threshold used here" in html


# ---- the page `multiad screen` writes, in a real browser ----------------------------------------------------------


@pytest.fixture(scope="module")
def screened(tmp_path_factory) -> Path:
    """`multiad screen` on a phantom with a lesion (named with <>&"), a normal phantom and a missing file, with
    an untrained run whose threshold lies between the two scans' scores: one scan flagged, one not, one failed."""
    tmp = tmp_path_factory.mktemp("report")
    run = tmp / "run"
    torch.manual_seed(0)
    cfg = RunConfig(backbone="resnet18", pretrained="none", discriminator=False, in_channels=1, image_size=64)
    net = MultiAD("resnet18", in_channels=1, pretrained=False, discriminator=False)
    save_model(run / "model.pt", net, cfg)
    scans = []
    for name, lesion, seed in ((ODD_NAME, True, 0), ("normal", False, 1)):
        image, _ = make_phantom_volume((48, 40, 16), lesion=lesion, seed=seed)
        scans.append(write_nifti(tmp / "scans" / f"{name}.nii.gz", np.round(image).astype(np.int16)))
    scores = [screen_volume(run, s, device="cpu", top_k=2).scan_score for s in scans]
    assert scores[0] != scores[1]
    save_model(run / "model.pt", net, cfg, fusion_stats={"threshold": float(np.mean(scores))})
    code = main(["screen", *map(str, scans), str(tmp / "scans" / "missing.nii.gz"), "--run", str(run),
                 "--out", str(tmp / "out"), "--device", "cpu", "--top-k", "2"])
    assert code == 1  # one scan failed
    return tmp / "out"


def test_screen_writes_report_html_after_the_csv(screened):
    report = json.loads((screened / "report.json").read_text())
    html = (screened / "report.html").read_text()
    assert (screened / "report.html").stat().st_mtime_ns >= (screened / "report.json").stat().st_mtime_ns
    ok = sorted((r for r in report if r["status"] == "ok"), key=lambda r: -r["scan_score"])
    page = Page(html)
    assert [c[1] for _, c in page.body_rows("scans")] == [r["name"] for r in ok]
    assert [cls == "flagged" for cls, _ in page.body_rows("scans")] == [r["anomalous"] for r in ok]
    assert sum(r["anomalous"] for r in ok) == 1
    assert [c[0] for _, c in page.body_rows("failed")] == ["missing"]
    montage = (screened / ok[0]["name"] / "montage.png").read_bytes()
    assert page.images[0] == "data:image/png;base64," + base64.b64encode(montage).decode()
    assert "0.99 quantile" in html  # the run's normal threshold: where it comes from


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browse(browser: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", "--window-size=1200,1600", *args,
           page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console(stderr: str) -> list[str]:
    """The page's console messages (errors, CSP violations, uncaught exceptions) in Chromium's log."""
    return re.findall(r":CONSOLE[^\]]*\] (.*)", stderr)


@pytest.fixture
def browser() -> str:
    """Chromium's path; the test skips, naming it, where it is not installed (before any screening)."""
    path = _chromium()
    if path is None:
        pytest.skip("chromium not found (apt-get install chromium): the browser test needs it")
    return path


def test_report_opens_in_a_headless_browser(browser, screened, tmp_path):
    # the log does show a page's console: a page with an error and a blocked fetch must be caught
    probe = tmp_path / "probe.html"
    probe.write_text('<!DOCTYPE html><meta http-equiv="Content-Security-Policy" content="img-src data:">'
                     '<img src="http://127.0.0.1:9/x.png"><script>console.error("probe"); missing();</script>')
    seen = _console(_browse(browser, probe, tmp_path / "profile", "--dump-dom").stderr)
    assert any("probe" in m for m in seen) and any("Uncaught" in m for m in seen), seen

    page = screened / "report.html"
    shot = tmp_path / "report.png"
    done = _browse(browser, page, tmp_path / "profile", f"--screenshot={shot}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert _console(done.stderr) == []  # no console error, nothing blocked
    dom = _browse(browser, page, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0 and _console(dom.stderr) == []
    report = json.loads((screened / "report.json").read_text())
    ok = sorted((r for r in report if r["status"] == "ok"), key=lambda r: -r["scan_score"])
    rendered = Page(dom.stdout)
    assert [c[1] for _, c in rendered.body_rows("scans")] == [r["name"] for r in ok]  # ODD_NAME as text, in order
    assert len(rendered.images) == 2

    from PIL import Image

    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (1600, 1200, 3)
    colours = {tuple(c) for c in image.reshape(-1, 3)[::7]}
    assert len(colours) > 50  # text, table, montage: not a blank page
    top = image[:500].reshape(-1, 3)
    for rgb in ((0xEE, 0xF1, 0xF5), (0xFD, 0xE8, 0xE6)):  # the table's header and its flagged row
        assert (np.abs(top.astype(int) - rgb).max(axis=1) <= 2).sum() > 500, rgb
    dark_rows = np.flatnonzero((image.max(axis=2) < 20).mean(axis=1) > 0.5)  # the montage's black gaps between tiles
    assert len(dark_rows) and dark_rows[0] < 1000, "the first montage is not on the first screen"
