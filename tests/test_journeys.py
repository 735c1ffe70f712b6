"""A newcomer's first hour, as subprocesses in a fresh working folder with relative paths only:
the README's demo command as written, the industrial journey (train -> evaluate -> predict, and
resume), the plain-folder layout, a labels-only evaluation, volumes (train on NIfTI -> screen a
DICOM series), and every unusable output path
or mismatched mask: exit status 2, one line naming the path, no traceback, nothing written and the
inputs byte-identical. (Both MONAI bundles run with a relative ``bundle_root`` in test_bundles.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TRAIN, copy_work, multiad_command

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
TINY = TINY_TRAIN
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}


def multiad(cwd: Path, *args: str, code: int | None = 0, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*multiad_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=ENV if env is None else env)
    if code is not None and proc.returncode != code:
        raise AssertionError(f"multiad {' '.join(args)} exited {proc.returncode}, expected {code}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def bundle(cwd: Path, name: str, config: str, *args: str, code: int | None = 0) -> subprocess.CompletedProcess:
    config_file = str(BUNDLES / name / "configs" / config)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file, *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)
    if code is not None and proc.returncode != code:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` -> its content hash ("dir" for folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def work(tiny_texture_run, tmp_path_factory) -> Path:
    """A working folder holding ``data/tex`` (MVTec layout) and ``runs/tex`` trained on it with
    ``multiad train data/tex --run-dir runs/tex`` (a copy of the suite's shared tiny run)."""
    return copy_work(tiny_texture_run, tmp_path_factory.mktemp("journey") / "work")


# ----------------------------------------------------------------------------- the README's demo
@pytest.mark.slow
def test_readme_demo_command_as_written(tmp_path):
    """``multiad demo``, nothing else: the default relative folder ./multiad_demo, to the end."""
    proc = multiad(tmp_path, "demo", timeout=1800)  # about half a minute on 2 idle cores; far more on a busy machine
    report = json.loads((tmp_path / "multiad_demo" / "demo_report.json").read_text())
    assert report["checks"] == {"textures_image_auroc": True, "phantom_flagged": True,
                                "top_slices_in_lesion": True}, proc.stdout[-3000:]
    screening = report["screening"]
    assert screening["anomalous"] and set(screening["top_slices"]) <= set(screening["lesion_slices"])
    assert report["evaluation"]["image_auroc"] >= 0.9
    # the summary says where to look, and every path it names is there (relative to the working folder)
    summary = proc.stdout[proc.stdout.index("multiad demo: summary"):]
    for rel in ("multiad_demo/run/contact_sheet.png", "multiad_demo/demo_report.json",
                "multiad_demo/volumes/screening/phantom_lesion/anomaly_map.nii.gz",
                "multiad_demo/volumes/screening/phantom_lesion/montage.png"):
        assert rel in summary and (tmp_path / rel).is_file(), rel
    assert "FLAGGED" in summary and "all as expected" in summary
    assert list((tmp_path / "multiad_demo" / "predictions").glob("*_overlay.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multiad_demo"]  # nothing outside its folder


# ----------------------------------------------------------------------------- industrial
def test_industrial_train_evaluate_predict(work, tiny_texture_run):
    run = work / "runs" / "tex"
    for name in ("config.json", "model.pt", "metrics.json", "log.csv"):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("best_checkpoint_*.pt"))
    cfg = json.loads((run / "config.json").read_text())
    # resolved once where it was trained (work is a copy of that folder): usable from any folder
    assert cfg["dataset_dir"] == str(tiny_texture_run / "data" / "tex")

    proc = multiad(work, "evaluate", "--run", "runs/tex", "--out", "eval/tex", "--device", "cpu")
    metrics = json.loads((work / "eval" / "tex" / "metrics.json").read_text())["evaluation"]
    assert metrics["num_images"] == 8 and metrics["pixel_auroc"] is not None and "image_auroc" in proc.stdout
    for name in ("scores.csv", "contact_sheet.png"):
        assert (work / "eval" / "tex" / name).is_file()

    proc = multiad(work, "predict", "data/tex/test/blob", "data/tex/test/scratch", "--run", "runs/tex",
                   "--out", "predictions", "--device", "cpu")
    predictions = json.loads((work / "predictions" / "predictions.json").read_text())
    assert len(predictions) == 4 and all(Path(p["overlay"]).is_file() for p in predictions)
    assert len({p["overlay"] for p in predictions}) == 4  # same file names in two folders: two overlays
    assert "data/tex/test/blob/000.png: score" in proc.stdout

    # from another working folder, the run's relative path is all it takes (the data path is in the run)
    (work / "elsewhere").mkdir(exist_ok=True)
    multiad(work / "elsewhere", "evaluate", "--run", "../runs/tex", "--out", "ev", "--device", "cpu")
    assert (work / "elsewhere" / "ev" / "metrics.json").is_file()


def test_resume_with_relative_folders(work):
    multiad(work, "train", "data/tex", "--run-dir", "runs/more", "--resume", "runs/tex", *TINY[:4], "--epochs", "2",
            *TINY[6:])
    log = (work / "runs" / "more" / "log.csv").read_text().splitlines()
    source = (work / "runs" / "tex" / "log.csv").read_text().splitlines()
    # the resumed run's log goes on from the run it resumed: epoch 1 from there, epoch 2 trained here
    assert [line.split(",")[0] for line in log[1:]] == ["1", "2"] and log[1] == source[1]


def test_labels_only_evaluation_reports_image_metrics(work):
    """Defect images without masks (no ground_truth/): image metrics, pixel metrics skipped with the reason."""
    labels = work / "data" / "labels_only"
    shutil.copytree(work / "data" / "tex", labels)
    shutil.rmtree(labels / "ground_truth")
    proc = multiad(work, "evaluate", "--run", "runs/tex", "--dataset-dir", "data/labels_only", "--out", "eval/labels",
                   "--device", "cpu")
    out = work / "eval" / "labels"
    metrics = json.loads((out / "metrics.json").read_text())["evaluation"]
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["f1_max"] <= 1.0
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert metrics["pixel_metrics"].startswith("skipped") and "mask" in metrics["pixel_metrics"]
    assert "skipped" in proc.stdout and (out / "scores.csv").is_file() and (out / "contact_sheet.png").is_file()
    assert len((out / "scores.csv").read_text().splitlines()) == 1 + 8


# ----------------------------------------------------------------------------- plain folders
def test_folder_layout_journey(work):
    """anomalib's Folder layout: good/, <defect>/, mask/<defect>/ (masks for one kind only)."""
    src, root = work / "data" / "tex", work / "data" / "plain"
    shutil.copytree(src / "train" / "good", root / "good")
    for kind in ("scratch", "blob"):
        shutil.copytree(src / "test" / kind, root / kind)
    shutil.copytree(src / "ground_truth" / "scratch", root / "mask" / "scratch")
    multiad(work, "train", "data/plain", "--layout", "folder", "--run-dir", "runs/plain", *TINY)
    assert json.loads((work / "runs" / "plain" / "config.json").read_text())["layout"] == "folder"
    proc = multiad(work, "evaluate", "--run", "runs/plain", "--device", "cpu")
    metrics = json.loads((work / "runs" / "plain" / "metrics.json").read_text())["evaluation"]
    # test split: every fifth of good/'s 12 images (2) and the 4 defect images, 2 of them with masks
    assert (metrics["num_images"], metrics["num_anomalous"]) == (6, 4)
    assert metrics["pixel_auroc"] is not None and "2 of 4" in metrics["pixel_metrics"]
    assert "image_auroc" in proc.stdout
    # the layout asked for is the one read: an MVTec folder is not a plain-folder dataset
    err = multiad(work, "train", "data/tex", "--layout", "folder", "--run-dir", "runs/wrong", *TINY, code=2).stderr
    assert err.startswith("multiad: error: ") and "data/tex/good" in err and len(err.strip().splitlines()) == 1
    assert not (work / "runs" / "wrong").exists()


# ----------------------------------------------------------------------------- volumes
def test_volumes_train_on_nifti_then_screen_dicom(work):
    from monai_multiad.data.synthetic_volumes import make_phantom_volume, write_dicom_series, write_nifti

    for i in range(3):
        image, _ = make_phantom_volume((48, 48, 12), lesion=False, seed=10 + i)
        write_nifti(work / "data" / "vols" / f"normal_{i}.nii.gz", np.round(image).astype(np.int16))
    image, _ = make_phantom_volume((48, 48, 12), lesion=True, seed=99)
    write_dicom_series(work / "data" / "dicom" / "series1", image)
    tiny = [*TINY, "--in-channels", "1", "--val-fraction", "0.34", "--max-steps", "2"]
    multiad(work, "train", "data/vols", "--run-dir", "runs/vols", *tiny)
    assert json.loads((work / "runs" / "vols" / "config.json").read_text())["layout"] == "auto"
    proc = multiad(work, "screen", "data/dicom/series1", "--run", "runs/vols", "--out", "screening", "--device", "cpu")
    report = json.loads((work / "screening" / "report.json").read_text())
    assert [r["status"] for r in report] == ["ok"] and "data/dicom/series1: score" in proc.stdout
    for name in ("anomaly_map.nii.gz", "montage.png", "slice_scores.csv", "result.json"):
        assert (work / "screening" / "series1" / name).is_file(), name


# ----------------------------------------------------------------------------- what cannot be used
BAD_OUTPUTS = {
    "screen --out a file": (["screen", "data/tex/test/good/000.png", "--run", "runs/tex", "--out", "a_file.txt"],
                            "a_file.txt", "is a file"),
    "train --run-dir a file": (["train", "data/tex", "--run-dir", "a_file.txt", *TINY], "a_file.txt", "is a file"),
    "evaluate --out a file": (["evaluate", "--run", "runs/tex", "--out", "a_file.txt"], "a_file.txt", "is a file"),
    "predict --out a file": (["predict", "data/tex/test/good", "--run", "runs/tex", "--out", "a_file.txt"],
                             "a_file.txt", "is a file"),
    "demo --out a file": (["demo", "--out", "a_file.txt"], "a_file.txt", "is a file"),
    "evaluate --out below a file": (["evaluate", "--run", "runs/tex", "--out", "a_file.txt/eval"],
                                    "a_file.txt/eval", "is a file, not a folder"),
    "predict --out an input folder": (["predict", "data/tex/test/good", "--run", "runs/tex", "--out",
                                       "data/tex/test/good"], "data/tex/test/good", "is an input folder"),
    "train --run-dir the dataset": (["train", "data/tex", "--run-dir", "data/tex", *TINY], "data/tex",
                                    "is an input folder"),
    "screen --out an input folder": (["screen", "data/tex", "--run", "runs/tex", "--out", "data/tex"], "data/tex",
                                     "is an input folder"),
    "train --resume nothing": (["train", "data/tex", "--run-dir", "runs/new", "--resume", "runs/nothing", *TINY],
                               "runs/nothing", "not found"),
}


def _assert_refused(work: Path, before: dict, proc: subprocess.CompletedProcess, path: str, problem: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, proc.stderr
    assert err.startswith(f"multiad: error: {path}") and problem in err, err
    assert tree_digest(work) == before  # nothing written, inputs byte-identical


@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
def test_unusable_output_path_is_one_line_before_any_work(work, case):
    args, path, problem = BAD_OUTPUTS[case]
    (work / "a_file.txt").write_text("not a folder\n")
    before = tree_digest(work)
    _assert_refused(work, before, multiad(work, *args, code=None, timeout=120), path, problem)


def test_mask_of_another_aspect_ratio_is_one_line(work):
    from PIL import Image

    bad = work / "data" / "bad_mask"
    if not bad.exists():
        shutil.copytree(work / "data" / "tex", bad)
        Image.new("L", (64, 32), 255).save(bad / "ground_truth" / "blob" / "000_mask.png")  # 32x64 for a 64x64 image
    before = tree_digest(work)
    proc = multiad(work, "evaluate", "--run", "runs/tex", "--dataset-dir", "data/bad_mask", "--out", "eval/bad",
                   "--device", "cpu", code=None)
    mask = str(work / "data" / "bad_mask" / "ground_truth" / "blob" / "000_mask.png")
    _assert_refused(work, before, proc, mask, "32x64")
    assert str(work / "data" / "bad_mask" / "test" / "blob" / "000.png") in proc.stderr and "64x64" in proc.stderr


def test_bundle_output_folder_that_is_a_file(work):
    (work / "a_file.txt").write_text("not a folder\n")
    before = tree_digest(work)
    proc = bundle(work, "multiad_industrial", "evaluate.json", "--run_dir", "runs/tex", "--output_dir", "a_file.txt",
                  "--device", "cpu", code=None)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("multiad bundle: error: a_file.txt: is a file")
    assert tree_digest(work) == before
