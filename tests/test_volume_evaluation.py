"""``multiad evaluate`` on a volume folder: scan-level AUROC (a scan is abnormal when its label
volume is non-empty), slice and voxel AUROC, sensitivity and specificity at the thresholds that
``screen`` flags with (calibrated when the run has a calibration), ``scores.csv`` per slice and
``scans.csv`` per scan. Commands run as subprocesses in a temporary folder with relative paths;
every number is recomputed here from the CSV files (sklearn), not read back from the code."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import multiad_command
from sklearn.metrics import roc_auc_score

TINY = ["--image-size", "48", "--batch-size", "8", "--backbone", "resnet18", "--pretrained", "none",
        "--early-stop-patience", "0", "--val-fraction", "0.25", "--device", "cpu", "--in-channels", "1",
        "--epochs", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}


def multiad(cwd: Path, *args: str, code: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([*multiad_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == code, f"multiad {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    """6 normal phantom heads to train on, 3 normal and 3 with a lesion to test on (splits.json);
    a 2-epoch run; ``multiad evaluate`` on the folder."""
    from monai_multiad.data.synthetic_volumes import make_phantom_volume, write_nifti

    work = tmp_path_factory.mktemp("volume_eval")
    data = work / "heads"
    splits = {"train": [], "test": []}
    for i in range(12):
        lesion = i >= 9
        name = f"case{i:02d}"
        image, label = make_phantom_volume((48, 48, 16), lesion=lesion, seed=i)
        write_nifti(data / name / "image.nii.gz", image)
        write_nifti(data / name / "mask.nii.gz", (label if lesion else np.zeros_like(label)).astype(np.uint8))
        splits["test" if i >= 6 else "train"].append(name)
    (data / "splits.json").write_text(json.dumps(splits))
    multiad(work, "train", "heads", "--run-dir", "run", *TINY)
    multiad(work, "evaluate", "--run", "run")
    return work


def test_scan_level_evaluation_matches_an_independent_computation(evaluated):
    m = json.loads((evaluated / "run" / "metrics.json").read_text())["evaluation"]
    slices = rows(evaluated / "run" / "scores.csv")
    scans = rows(evaluated / "run" / "scans.csv")
    assert {s["case"] for s in slices} == {s["case"] for s in scans} == {f"case{i:02d}" for i in range(6, 12)}
    assert m["num_scans"] == 6 and m["num_abnormal_scans"] == 3 and m["top_k"] == 3
    for scan in scans:  # label: any labelled slice; score: mean of the 3 highest slice scores
        own = [s for s in slices if s["case"] == scan["case"]]
        assert int(scan["label"]) == int(scan["case"] >= "case09") == max(int(s["label"]) for s in own)
        top = sorted((float(s["score"]) for s in own), reverse=True)[:3]
        assert float(scan["scan_score"]) == pytest.approx(np.mean(top), rel=1e-6)
        assert int(scan["num_slices"]) == len(own)
    labels = [int(s["label"]) for s in scans]
    scores = [float(s["scan_score"]) for s in scans]
    assert m["scan_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m["slice_auroc"] == pytest.approx(roc_auc_score([int(s["label"]) for s in slices],
                                                           [float(s["score"]) for s in slices]), abs=1e-12)
    assert m["slice_auroc"] == m["image_auroc"] and m["voxel_auroc"] == m["pixel_auroc"] is not None
    assert "resampled to 48 x 48" in m["pixel_metrics"]
    # sensitivity / specificity at the thresholds screen uses: uncalibrated here, the training threshold
    assert "uncalibrated" in m["scan_threshold_source"] and m["scan_threshold"] == m["normal_threshold"]
    flagged = [sc > m["scan_threshold"] for sc in scores]
    assert m["scan_sensitivity"] == pytest.approx(np.mean([f for f, y in zip(flagged, labels) if y]))
    assert m["scan_specificity"] == pytest.approx(np.mean([not f for f, y in zip(flagged, labels) if not y]))
    assert [s["anomalous"] == "True" for s in scans] == flagged
    slice_flags = [(float(s["score"]) > m["slice_threshold"], int(s["label"])) for s in slices]
    assert m["slice_sensitivity"] == pytest.approx(np.mean([f for f, y in slice_flags if y]))
    assert m["slice_specificity"] == pytest.approx(np.mean([not f for f, y in slice_flags if not y]))


def test_evaluation_uses_the_calibrated_thresholds_when_the_run_has_them(evaluated):
    """Calibrated on the 6 training heads (normal) at FPR 0.2: evaluate then reports sensitivity and
    specificity at the calibrated scan and slice thresholds, and says so."""
    multiad(evaluated, "calibrate", "--run", "run", *[f"heads/case{i:02d}/image.nii.gz" for i in range(6)],
            "--fpr", "0.2")
    calibration = json.loads((evaluated / "run" / "calibration.json").read_text())
    multiad(evaluated, "evaluate", "--run", "run", "--out", "calibrated_eval")
    m = json.loads((evaluated / "calibrated_eval" / "metrics.json").read_text())["evaluation"]
    assert m["scan_threshold"] == pytest.approx(calibration["scan"]["threshold"])
    assert m["slice_threshold"] == pytest.approx(calibration["slice"]["threshold"])
    assert "calibrated" in m["scan_threshold_source"] and "uncalibrated" not in m["scan_threshold_source"]
    scans = rows(evaluated / "calibrated_eval" / "scans.csv")
    normal_flags = [float(s["scan_score"]) > m["scan_threshold"] for s in scans if s["label"] == "0"]
    assert m["scan_specificity"] == pytest.approx(1 - np.mean(normal_flags))


def test_a_test_split_of_only_abnormal_scans_skips_the_scan_auroc_and_says_why(evaluated):
    from monai_multiad.inference import volume_metrics
    from monai_multiad.run_folder import load_model

    _, cfg, fusion = load_model(evaluated / "run")
    slices = [{"case": "a", "label": 1, "score": 2.0, "slice_index": 0},
              {"case": "b", "label": 1, "score": 1.0, "slice_index": 0}]
    _, m = volume_metrics(slices, cfg, fusion, evaluated / "no_such_run")
    assert m["scan_auroc"] is None and "all 2 test scans are abnormal" in m["scan_metrics"]
