"""``multiad calibrate``: the threshold at a false-positive rate and its bootstrap interval
(monai_multiad/calibration.py), checked against independent numpy computations and a simulation;
then as a user runs it, as subprocesses in a temporary working folder with relative paths: on
generated phantom volumes (calibrate on normal scans, screen normal and lesion scans with the
calibrated thresholds), on 2D images (calibrate, predict), the errors (too few normals, a bad scan,
a held run folder: exit 2, one line, nothing written); and on the real lgg_flair volumes at slice
level (skipped, naming the folder, where it is absent)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PHANTOM_SHAPE, copy_work, multiad_command, write_phantom

from monai_multiad.calibration import min_normals, threshold_at_fpr

TINY = ["--image-size", "64", "--batch-size", "8", "--backbone", "resnet18", "--pretrained", "none",
        "--early-stop-patience", "0", "--val-fraction", "0.2", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}
LGG = Path(__file__).resolve().parents[2] / "shared" / "data" / "lgg_flair"


def multiad(cwd: Path, *args: str, code: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([*multiad_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=ENV)
    if code is not None and proc.returncode != code:
        raise AssertionError(f"multiad {' '.join(args)} exited {proc.returncode}, expected {code}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def reference_threshold(scores, fpr: float) -> float:
    """The ceil((n+1)(1-fpr))-th smallest score, by numpy's inverted-CDF quantile (smallest x with
    ECDF(x) >= q): q = (n+1)(1-fpr)/n (a hair less, so that an integral (n+1)(1-fpr) stays that rank)."""
    x = np.asarray(scores, dtype=float)
    q = min(1.0, (x.size + 1) * (1 - fpr) / x.size - 1e-12)
    return float(np.quantile(x, q, method="inverted_cdf"))


# ----------------------------------------------------------------------------- the arithmetic
@pytest.mark.parametrize("n, fpr", [(19, 0.05), (23, 0.05), (57, 0.05), (200, 0.05), (9, 0.1), (31, 0.1), (500, 0.01)])
def test_threshold_is_the_conformal_order_statistic(n, fpr):
    scores = np.random.default_rng(n).gamma(2.0, size=n)
    out = threshold_at_fpr(scores, fpr, n_boot=50)
    assert out["threshold"] == pytest.approx(reference_threshold(scores, fpr), abs=0)
    assert out["rank"] == math.ceil((n + 1) * (1 - fpr) - 1e-9) and out["n"] == n
    above = float(np.mean(scores > out["threshold"]))
    assert out["calibration_fpr"] == pytest.approx(above) and above <= fpr  # at most fpr of the normals above it


def test_too_few_normals():
    assert (min_normals(0.05), min_normals(0.1), min_normals(0.01)) == (19, 9, 99)
    threshold_at_fpr(np.arange(19.0), 0.05, n_boot=10)  # enough
    with pytest.raises(ValueError, match=r"^18 normal scans cannot calibrate FPR 0.05: at least 19 are needed"):
        threshold_at_fpr(np.arange(18.0), 0.05)
    with pytest.raises(ValueError, match="between 0 and 1"):
        threshold_at_fpr(np.arange(50.0), 1.5)


def test_bootstrap_interval_against_numpy():
    """The documented procedure, written again with numpy: B resamples with replacement (the same
    generator and draws), each resample's threshold by the inverted-CDF quantile, the fraction of the
    calibration scores above it, then the 2.5 and 97.5 percentiles."""
    fpr, B = 0.05, 2000
    x = np.random.default_rng(7).normal(size=57)
    draws = np.random.default_rng(0).integers(0, x.size, size=(B, x.size))
    fractions = [np.mean(x > reference_threshold(x[row], fpr)) for row in draws]
    assert threshold_at_fpr(x, fpr)["interval"] == pytest.approx(list(np.percentile(fractions, [2.5, 97.5])))

    # slices resampled by scan: 12 scans of 5 to 14 slices, each scan with its own offset
    rng = np.random.default_rng(3)
    scans = [rng.normal(loc=rng.normal(scale=0.5), size=rng.integers(5, 15)) for _ in range(12)]
    scores, groups = np.concatenate(scans), np.repeat(np.arange(12), [len(s) for s in scans])
    draws = np.random.default_rng(0).integers(0, 12, size=(B, 12))
    fractions = [np.mean(scores > reference_threshold(np.concatenate([scans[g] for g in row]), fpr)) for row in draws]
    out = threshold_at_fpr(scores, fpr, groups=groups)
    assert out["interval"] == pytest.approx(list(np.percentile(fractions, [2.5, 97.5])))
    assert out["groups"] == 12 and out["threshold"] == reference_threshold(scores, fpr)


def test_the_rule_keeps_its_promise_on_new_normals():
    """Normal scores from a known distribution (standard normal): the FPR a calibrated threshold has on
    new normals, 1 - Phi(t), is on average at most fpr (conformal) and not far below it, and the
    bootstrap interval holds it in most repetitions."""
    from scipy.stats import norm

    rng = np.random.default_rng(11)
    fpr, n, reps = 0.05, 40, 300
    true, covered = [], 0
    for _ in range(reps):
        out = threshold_at_fpr(rng.normal(size=n), fpr, n_boot=400, seed=int(rng.integers(1 << 30)))
        true.append(norm.sf(out["threshold"]))
        covered += out["interval"][0] <= true[-1] <= out["interval"][1]
    assert fpr - 1 / (n + 1) - 0.01 <= np.mean(true) <= fpr + 0.01
    assert covered / reps >= 0.8


# ----------------------------------------------------------------------------- volumes, as a user
SHAPE = PHANTOM_SHAPE


def _phantom(path: Path, seed: int, lesion: bool = False) -> np.ndarray:
    return write_phantom(path, seed, lesion, SHAPE)


@pytest.fixture(scope="module")
def vols(tiny_volume_run, tmp_path_factory) -> Path:
    """``runs/vol``: a tiny model trained on 3 normal phantoms (a copy of the suite's shared volume run);
    ``data/normals/`` 9 more normal phantoms (and an empty mask, which calibrate must leave out),
    ``data/normal_series/`` a tenth as a DICOM series, ``data/new/`` a normal and a lesion phantom to screen."""
    from monai_multiad.data.synthetic_volumes import make_phantom_volume, write_dicom_series, write_nifti

    cwd = copy_work(tiny_volume_run, tmp_path_factory.mktemp("calibrate") / "work")
    for i in range(9):
        _phantom(cwd / "data" / "normals" / f"normal_{i}.nii.gz", seed=100 + i)
    write_nifti(cwd / "data" / "normals" / "normal_0_mask.nii.gz", np.zeros(SHAPE, np.uint8))
    image, _ = make_phantom_volume(SHAPE, lesion=False, seed=120)
    write_dicom_series(cwd / "data" / "normal_series", image)
    _phantom(cwd / "data" / "new" / "normal_new.nii.gz", seed=200)
    _phantom(cwd / "data" / "new" / "lesion_new.nii.gz", seed=201, lesion=True)
    return cwd


NORMALS = ["data/normals", "data/normal_series"]


def _slice_scores(folder: Path) -> list[dict]:
    with (folder / "slice_scores.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_calibrate_on_normal_scans_then_screen_flags_with_it(vols):
    cwd = vols
    # never calibrated: screen says so, and flags with the fusion's threshold
    proc = multiad(cwd, "screen", "data/new/lesion_new.nii.gz", "--run", "runs/vol", "--out", "before", "--device",
                   "cpu")
    assert "(uncalibrated: the 0.99 quantile of validation normal slices; run 'multiad calibrate' for a known " \
           "false-positive rate)" in proc.stdout
    before = json.loads((cwd / "before" / "report.json").read_text())[0]
    assert before["threshold_source"].startswith("uncalibrated") and before["slice_threshold"] == before["threshold"]

    model = hashlib.sha256((cwd / "runs" / "vol" / "model.pt").read_bytes()).hexdigest()
    proc = multiad(cwd, "calibrate", "--run", "runs/vol", *NORMALS, "--fpr", "0.1", "--device", "cpu")
    assert "wrote runs/vol/calibration.json" in proc.stdout
    cal = json.loads((cwd / "runs" / "vol" / "calibration.json").read_text())
    assert hashlib.sha256((cwd / "runs" / "vol" / "model.pt").read_bytes()).hexdigest() == model  # untouched
    assert cal["fpr"] == 0.1 and cal["kind"] == "volumes" and cal["num_scans"] == 10 and cal["num_normal_scans"] == 10
    assert len(cal["inputs"]) == 10 and not any("mask" in p for p in cal["inputs"])
    assert cal["package_version"] and cal["created"] and cal["settings"]["top_k"] == 3
    assert cal["bootstrap"]["samples"] == 2000 and cal["scan"]["n"] == 10 and cal["slice"]["groups"] == 10

    # the same normals screened independently: the thresholds are the rule applied to their scores
    files = sorted(str(p.relative_to(cwd)) for p in (cwd / "data" / "normals").glob("normal_?.nii.gz"))
    multiad(cwd, "screen", *files, "data/normal_series", "--run", "runs/vol", "--out", "normals_screened",
            "--device", "cpu")
    rows = json.loads((cwd / "normals_screened" / "report.json").read_text())
    assert cal["scan"]["threshold"] == pytest.approx(reference_threshold([r["scan_score"] for r in rows], 0.1),
                                                     rel=1e-9)
    slices = [float(s["score"]) for r in rows for s in _slice_scores(Path(r["map"]).parent)]
    assert cal["num_slices"] == cal["slice"]["n"] == len(slices)
    assert cal["slice"]["threshold"] == pytest.approx(reference_threshold(slices, 0.1), rel=1e-5)  # csv: 6 digits
    lo, hi = cal["scan"]["interval"]
    assert 0 <= lo <= cal["scan"]["calibration_fpr"] <= 0.1 and lo <= hi <= 1

    # screening new scans flags with the calibrated thresholds and says so
    proc = multiad(cwd, "screen", "data/new/normal_new.nii.gz", "data/new/lesion_new.nii.gz", "--run", "runs/vol",
                   "--out", "after", "--device", "cpu")
    scan_thr, slice_thr = cal["scan"]["threshold"], cal["slice"]["threshold"]
    assert f"threshold {scan_thr:.4g} (calibrated: FPR 0.1 [{lo:.3g}, {hi:.3g}] on 10 normal scans)" in proc.stdout
    assert f"slice threshold {slice_thr:.4g} (calibrated: FPR 0.1 [" in proc.stdout
    assert "normal slices of 10 scans)" in proc.stdout
    report = json.loads((cwd / "after" / "report.json").read_text())
    for r in report:
        assert r["threshold"] == scan_thr and r["slice_threshold"] == slice_thr
        assert r["threshold_source"].startswith("calibrated: FPR 0.1")
        assert r["anomalous"] == (r["scan_score"] > scan_thr)
        for s in _slice_scores(Path(r["map"]).parent):
            assert int(s["above_threshold"]) == (float(s["score"]) > slice_thr)
    assert "threshold_source" in (cwd / "after" / "report.csv").read_text().splitlines()[0]


def test_too_few_normal_scans_is_one_line_and_nothing_is_written(vols):
    before = tree_digest(vols / "runs")
    proc = multiad(vols, "calibrate", "--run", "runs/vol", "data/normals", "--fpr", "0.05", "--device", "cpu", code=2)
    assert proc.stderr.strip() == ("multiad: error: 9 normal scans cannot calibrate FPR 0.05: at least 19 are needed "
                                   "(the threshold is the ceil((n+1)(1-fpr))-th smallest of n normal scores)")
    # a scan that cannot be read ends the calibration, naming it; the previous calibration stays as it was
    (vols / "data" / "broken").mkdir(exist_ok=True)
    (vols / "data" / "broken" / "bad.nii.gz").write_bytes(b"not a nifti file")
    proc = multiad(vols, "calibrate", "--run", "runs/vol", "data/normals", "data/broken/bad.nii.gz", "--fpr", "0.1",
                   "--device", "cpu", code=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("multiad: error:") and "bad.nii.gz" in lines[0], proc.stderr
    proc = multiad(vols, "calibrate", "--run", "runs/vol", "data/normals", "data/new/../normals/normal_1.nii.gz",
                   "--fpr", "0.1", code=2)
    assert "given twice" in proc.stderr
    assert tree_digest(vols / "runs") == before


def test_a_held_run_folder_is_refused(vols):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock = vols / "runs" / "vol" / ".multiad.lock"
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "command": "multiad train",
                                    "started": "now"}))
        before = tree_digest(vols / "runs")
        proc = multiad(vols, "calibrate", "--run", "runs/vol", *NORMALS, "--fpr", "0.1", code=2)
        assert f"in use by multiad train (pid {holder.pid}" in proc.stderr
        assert tree_digest(vols / "runs") == before
    finally:
        holder.kill()
        holder.wait()
        lock.unlink(missing_ok=True)


def test_a_calibration_made_otherwise_is_not_used_and_screen_says_why(vols):
    cal = json.loads((vols / "runs" / "vol" / "calibration.json").read_text())
    # another top-k: the scan threshold no longer applies (the slice threshold still does)
    proc = multiad(vols, "screen", "data/new/lesion_new.nii.gz", "--run", "runs/vol", "--out", "topk1", "--top-k",
                   "1", "--device", "cpu")
    assert "(uncalibrated: calibration.json was made with top_k 3, not 1; the 0.99 quantile" in proc.stdout
    row = json.loads((vols / "topk1" / "report.json").read_text())[0]
    assert row["slice_threshold"] == cal["slice"]["threshold"] and row["threshold"] != cal["scan"]["threshold"]
    # a model trained again since (another model.pt): neither threshold is used
    shutil.copytree(vols / "runs" / "vol", vols / "runs" / "retrained")
    cal["model_sha256"] = "0" * 64
    (vols / "runs" / "retrained" / "calibration.json").write_text(json.dumps(cal))
    proc = multiad(vols, "screen", "data/new/lesion_new.nii.gz", "--run", "runs/retrained", "--out", "stale",
                   "--device", "cpu")
    assert "(uncalibrated: calibration.json was made for an earlier model.pt;" in proc.stdout
    row = json.loads((vols / "stale" / "report.json").read_text())[0]
    assert row["threshold"] == row["slice_threshold"] != cal["slice"]["threshold"]


# ----------------------------------------------------------------------------- 2D images, as a user
def test_calibrate_on_normal_images_then_predict_flags_with_it(tmp_path):
    from monai_multiad.data.synthetic_images import write_mvtec_dataset
    from monai_multiad.data.synthetic_volumes import write_nifti

    cwd = tmp_path
    write_mvtec_dataset(cwd / "data" / "tex", n_train=12, n_test_good=10, n_test_defect=4, size=64, channels=3, seed=0)
    multiad(cwd, "train", "data/tex", "--run-dir", "runs/tex", *TINY, "--epochs", "1")
    proc = multiad(cwd, "predict", "data/tex/test/good", "--run", "runs/tex", "--out", "plain", "--device", "cpu")
    assert proc.stdout.splitlines()[0].endswith("(uncalibrated: the 0.99 quantile of validation normal images; run "
                                                "'multiad calibrate' for a known false-positive rate)")
    normal_scores = [r["score"] for r in json.loads((cwd / "plain" / "predictions.json").read_text())]

    proc = multiad(cwd, "calibrate", "--run", "runs/tex", "data/tex/test/good", "--fpr", "0.1", "--device", "cpu")
    cal = json.loads((cwd / "runs" / "tex" / "calibration.json").read_text())
    assert cal["kind"] == "images" and cal["num_images"] == 10 and len(cal["inputs"]) == 10
    assert cal["image"]["threshold"] == pytest.approx(reference_threshold(normal_scores, 0.1), rel=1e-9)
    assert "image threshold" in proc.stdout and "scan threshold" not in proc.stdout

    proc = multiad(cwd, "predict", "data/tex/test/good", "data/tex/test/blob", "data/tex/test/scratch", "--run",
                   "runs/tex", "--out", "flagged", "--device", "cpu")
    thr = cal["image"]["threshold"]
    lo, hi = cal["image"]["interval"]
    assert proc.stdout.splitlines()[0] == (f"threshold {thr:.4g} (calibrated: FPR 0.1 [{lo:.3g}, {hi:.3g}] on 10 "
                                           "normal images)")
    preds = json.loads((cwd / "flagged" / "predictions.json").read_text())
    assert len(preds) == 14
    for r in preds:
        assert r["threshold"] == thr and r["threshold_source"].startswith("calibrated: FPR 0.1")
        assert r["anomalous"] == (r["score"] > thr)

    # volumes and images mixed: one line, nothing written
    write_nifti(cwd / "scan.nii.gz", np.ones((8, 8, 4), np.int16))
    before = tree_digest(cwd / "runs")
    proc = multiad(cwd, "calibrate", "--run", "runs/tex", "data/tex/test/good", "scan.nii.gz", code=2)
    assert "mix volumes" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = multiad(cwd, "calibrate", "--run", "runs/tex", "data/tex/test/good", "--fpr", "0.05", code=2)
    assert "10 normal images cannot calibrate FPR 0.05: at least 19 are needed" in proc.stderr
    assert tree_digest(cwd / "runs") == before


# ----------------------------------------------------------------------------- real data: lgg_flair
LGG_TRAIN, LGG_CALIBRATE = 4, 20  # patients of the train split: trained on; then others, calibrated on


def _fraction_above_by_patient(scores: list[np.ndarray], threshold: float, n_boot: int = 2000) -> list[float]:
    """95 % interval of the fraction of slices above ``threshold``, patients resampled with replacement."""
    draws = np.random.default_rng(1).integers(0, len(scores), size=(n_boot, len(scores)))
    fractions = [np.mean(np.concatenate([scores[g] for g in row]) > threshold) for row in draws]
    return [float(v) for v in np.percentile(fractions, [2.5, 97.5])]


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not (LGG / "splits.json").is_file(), reason=f"{LGG} is absent (the shared lgg_flair data)")
def test_lgg_flair_slice_calibration_on_train_patients_measured_on_test_patients(tmp_path):
    """Every lgg_flair patient has a tumour, so the calibration is at slice level: a tiny model trained
    briefly (16 steps) on the normal slices of 4 train patients; its slice threshold calibrated at FPR
    0.05 on the normal slices (label slice empty) of 20 other train patients; then measured on the 20
    test patients: the FPR on their normal slices (with its own by-patient bootstrap interval) against
    the calibration's interval, and the sensitivity on their tumour slices. Printed for
    docs/results.md ("Calibrated threshold on lgg_flair"). It checks the arithmetic on real score
    distributions, not accuracy: the tiny model does not tell tumour slices apart."""
    from sklearn.metrics import roc_auc_score

    from monai_multiad.calibration import lesion_slices, calibrate, write_calibration
    from monai_multiad.inferers import load_run
    from monai_multiad.screening import screen_volume

    splits = json.loads((LGG / "splits.json").read_text())
    data = tmp_path / "lgg"
    data.mkdir()
    for name in splits["train"][:LGG_TRAIN]:
        (data / name).symlink_to(LGG / name)
    (data / "splits.json").write_text(json.dumps({"train": splits["train"][:LGG_TRAIN]}))
    multiad(tmp_path, "train", "lgg", "--run-dir", "run", "--layout", "volumes", "--in-channels", "1",
            "--image-size", "64", "--batch-size", "16", "--max-steps", "16", "--epochs", "4", "--stages", "1", "2",
            "--early-stop-patience", "0", "--val-fraction", "0.25", "--device", "cpu")
    run_dir = tmp_path / "run"
    scans = [LGG / p / "flair.nii.gz" for p in splits["train"][LGG_TRAIN:LGG_TRAIN + LGG_CALIBRATE]]
    record = calibrate(run_dir, scans, 0.05, device="cpu", level="slice",
                       labels={s: s.parent / "mask.nii.gz" for s in scans})
    write_calibration(run_dir, record)
    part = record["slice"]
    thr, (lo, hi) = part["threshold"], part["interval"]
    assert record["scan"] is None and part["groups"] == LGG_CALIBRATE and part["calibration_fpr"] <= 0.05
    assert lo <= part["calibration_fpr"] <= hi

    run = load_run(run_dir, "cpu")
    normal, tumour = [], []
    for p in splits["test"]:
        res = screen_volume(run, LGG / p / "flair.nii.gz")
        assert res.slice_threshold == thr and res.slice_threshold_source.startswith("calibrated: FPR 0.05")
        lesion = lesion_slices(LGG / p / "mask.nii.gz", "axial")
        normal.append(np.array([s for k, s in res.slice_scores.items() if k not in lesion]))
        tumour.append(np.array([s for k, s in res.slice_scores.items() if k in lesion]))
    normal_all, tumour_all = np.concatenate(normal), np.concatenate(tumour)
    fpr = float(np.mean(normal_all > thr))
    test_lo, test_hi = _fraction_above_by_patient(normal, thr)
    sensitivity = float(np.mean(tumour_all > thr))
    auroc = roc_auc_score([0] * normal_all.size + [1] * tumour_all.size, np.concatenate([normal_all, tumour_all]))
    print(f"\nlgg_flair slice calibration at FPR 0.05: threshold {thr:.4g} from {part['n']} normal slices of "
          f"{part['groups']} train patients (FPR there {part['calibration_fpr']:.4f}, bootstrap interval "
          f"[{lo:.4f}, {hi:.4f}]); on the {len(normal)} test patients: {normal_all.size} normal slices, FPR {fpr:.4f} "
          f"(by-patient interval [{test_lo:.4f}, {test_hi:.4f}]; {'inside' if lo <= fpr <= hi else 'outside'} the "
          f"calibration interval), {tumour_all.size} tumour slices, sensitivity {sensitivity:.4f}; "
          f"slice AUROC {auroc:.4f}")
    # the test patients' FPR is consistent with the calibration: their two by-patient intervals overlap
    assert test_lo <= hi and lo <= test_hi
