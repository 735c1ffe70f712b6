"""Interrupting and resuming training, as a user does it: ``multiad train`` run as a process,
killed (SIGKILL) or stopped (SIGTERM), resumed into the same run folder; two processes writing
into one folder; an output that cannot be written; ``--config``, ``--nproc 2`` and early stopping
from the command line. Every command runs as a subprocess in a temporary working folder with
relative paths."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import multiad_command
import torch

from monai_multiad.data.synthetic_images import write_mvtec_dataset

# 64 px, ResNet-18 without downloaded weights, no early stopping; an epoch is 5 batches
TINY = ["--image-size", "64", "--batch-size", "8", "--backbone", "resnet18", "--pretrained", "none",
        "--early-stop-patience", "0", "--val-fraction", "0.2", "--device", "cpu", "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cwd: Path, *args: str, code: int | None = 0, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([*multiad_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV, **kw)
    if code is not None and proc.returncode != code:
        raise AssertionError(f"multiad {' '.join(args)} exited {proc.returncode}, expected {code}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*multiad_command(), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300, what: str = "") -> None:
    t0 = time.monotonic()
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def log_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "log.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def numbers(run_dir: Path, prefix: str) -> list[int]:
    return sorted(int(re.match(rf"{prefix}_checkpoint_(\d+)", p.name).group(1))
                  for p in (run_dir / "checkpoints").glob(f"{prefix}_checkpoint_*.pt"))


def student_state(run_dir: Path) -> dict:
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    return {k[len("student."):]: v for k, v in state["state_dict"].items() if k.startswith("student.")}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A working folder holding ``data/`` (MVTec layout: 40 normal training images, 5 epochs' batches)."""
    root = tmp_path_factory.mktemp("resume")
    write_mvtec_dataset(root / "data", n_train=40, n_test_good=4, n_test_defect=4, size=64, channels=1, seed=0)
    return root


@pytest.fixture(scope="module")
def uninterrupted(work) -> Path:
    run(work, "train", "data", "--run-dir", "straight", "--epochs", "6", *TINY)
    return work / "straight"


def test_sigkill_then_resume_into_the_same_folder_equals_an_uninterrupted_run(work, uninterrupted):
    proc = start(work, "train", "data", "--run-dir", "killed", "--epochs", "6", *TINY)
    ckpt = work / "killed" / "checkpoints"
    wait_for(lambda: numbers(work / "killed", "last"), proc, what="the first epoch's checkpoint")
    per_epoch = numbers(work / "killed", "last")[0]
    wait_for(lambda: (ckpt / f"last_checkpoint_{3 * per_epoch}.pt").is_file(), proc, what="epoch 3's checkpoint")
    proc.send_signal(signal.SIGKILL)  # in epoch 4: no handler runs, nothing is finished
    proc.wait()
    assert not (work / "killed" / "model.pt").exists()
    assert len(log_rows(work / "killed")) >= 3

    run(work, "train", "data", "--run-dir", "killed", "--resume", "killed", "--epochs", "6", *TINY)

    rows = log_rows(work / "killed")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # each epoch once, the log went on
    straight = log_rows(uninterrupted)
    for a, b in zip(rows, straight):
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), abs=1e-6)
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-6)
    # one last checkpoint (the newest, by number) and one best: the best over all 6 epochs
    assert numbers(work / "killed", "last") == [6 * per_epoch]
    best_epoch = 1 + min(range(6), key=lambda i: float(rows[i]["val_loss"]))
    assert numbers(work / "killed", "best") == [best_epoch] == numbers(uninterrupted, "best")
    # the model equals the uninterrupted run's (same seed; each epoch's randomness comes from (seed, epoch))
    resumed, reference = student_state(work / "killed"), student_state(uninterrupted)
    for k, v in reference.items():
        assert torch.allclose(resumed[k].float(), v.float(), atol=1e-6), k
    fusion = torch.load(work / "killed" / "model.pt", weights_only=True)["fusion"]
    ref_fusion = torch.load(uninterrupted / "model.pt", weights_only=True)["fusion"]
    assert fusion["threshold"] == pytest.approx(ref_fusion["threshold"], rel=1e-5)
    assert not list((work / "killed").glob(".multiad.lock"))  # the killed process's stale lock was taken over


def best_student(run_dir: Path) -> dict:
    (path,) = (run_dir / "checkpoints").glob("best_checkpoint_*.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("student", state)  # Ignite saves a lone object's state without its key


def test_best_epoch_before_the_interruption_is_kept(work, uninterrupted):
    """Resume the finished 6-epoch run to 7 epochs with a learning rate of 0: Adam's step is exactly 0, so
    epoch 7's student is the last epoch's, bit for bit, and its validation loss (BatchNorm re-estimated on
    the same normals) is no lower than the best so far, which is not an improvement: the best checkpoint
    stays the earlier epoch's. A resumed run that forgot its best would save epoch 7 as its first best.
    (A learning rate of 1e-12 still moved the smallest float32 weights, and the loss by 1e-7 either way.)"""
    import shutil

    shutil.copytree(uninterrupted, work / "longer")
    before = numbers(work / "longer", "best")
    first_rows = log_rows(work / "longer")
    run(work, "train", "data", "--run-dir", "longer", "--resume", "longer", "--epochs", "7", "--lr", "0", *TINY)
    rows = log_rows(work / "longer")
    assert [int(r["epoch"]) for r in rows] == list(range(1, 8))
    assert [r["val_loss"] for r in rows[:6]] == [r["val_loss"] for r in first_rows]
    assert float(rows[6]["val_loss"]) >= min(float(r["val_loss"]) for r in rows[:6])  # the premise
    assert numbers(work / "longer", "best") == before
    best = best_student(work / "longer")
    for k, v in student_state(work / "longer").items():
        assert torch.equal(best[k], v), k  # model.pt is the best epoch's student
    summary = json.loads((work / "longer" / "metrics.json").read_text())["training"]
    assert summary["best_val_loss"] == pytest.approx(min(float(r["val_loss"]) for r in rows))


def test_resume_past_the_requested_epochs_is_a_clear_error(work, uninterrupted):
    proc = run(work, "train", "data", "--run-dir", "straight", "--resume", "straight", "--epochs", "6", *TINY, code=2)
    assert "6 epoch(s) done" in proc.stderr and "--epochs" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_finishes_from_the_best_epoch_and_exits_0(work):
    proc = start(work, "train", "data", "--run-dir", "termed", "--epochs", "100", *TINY)
    wait_for(lambda: len(log_rows(work / "termed")) >= 2, proc, what="two epochs")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "interrupted" in err and "--resume termed" in err and "Traceback" not in err
    metrics = json.loads((work / "termed" / "metrics.json").read_text())["training"]
    assert metrics["interrupted"] is True and metrics["epochs"] < 100
    best = best_student(work / "termed")
    for k, v in student_state(work / "termed").items():
        assert torch.equal(best[k], v), k
    # the finished run screens images
    run(work, "predict", "data/test/good", "--run", "termed", "--out", "termed_pred")
    assert json.loads((work / "termed_pred" / "predictions.json").read_text())


def test_a_second_train_into_a_busy_run_folder_is_refused(work):
    first = start(work, "train", "data", "--run-dir", "busy", "--epochs", "100", *TINY)
    try:
        wait_for(lambda: (work / "busy" / ".multiad.lock").is_file(), first, what="the lock")
        second = run(work, "train", "data", "--run-dir", "busy", "--epochs", "1", *TINY, code=2)
        assert f"pid {first.pid}" in second.stderr and "multiad train" in second.stderr
        assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert first.poll() is None  # the first one goes on
        evaluate = run(work, "evaluate", "--run", "busy", code=2)  # writes into the run folder too
        assert f"pid {first.pid}" in evaluate.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    assert not (work / "busy" / ".multiad.lock").exists()


@pytest.fixture(scope="module")
def scan(work) -> str:
    """A phantom head with a lesion, as NIfTI (screened with the 1-channel run trained above)."""
    from monai_multiad.data.synthetic_volumes import make_phantom_volume, write_nifti

    image, _ = make_phantom_volume((64, 64, 24), lesion=True, seed=1)
    write_nifti(work / "scan.nii.gz", image)
    return "scan.nii.gz"


def test_screening_into_a_folder_another_screening_holds_is_refused(work, uninterrupted, scan):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = work / "held"
        out.mkdir()
        lock = {"pid": holder.pid, "host": os.uname().nodename, "command": "multiad screen", "started": "now"}
        (out / ".multiad.lock").write_text(json.dumps(lock))
        proc = run(work, "screen", scan, "--run", "straight", "--out", "held", code=2)
        assert f"multiad screen (pid {holder.pid}" in proc.stderr and ".multiad.lock" in proc.stderr
        assert sorted(p.name for p in out.iterdir()) == [".multiad.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and is taken over
    proc = run(work, "screen", scan, "--run", "straight", "--out", "held")
    assert "removing the lock" in proc.stderr
    assert (work / "held" / "report.csv").is_file() and not (work / "held" / ".multiad.lock").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_map_that_cannot_be_written_fails_that_scan_with_the_file_named(work, uninterrupted, scan):
    """Files over 16 KiB cannot be written: the scan's map or montage fails, the scan is reported
    as failed naming the file, the report (small) is written, exit status 1, no temporary file."""
    proc = run(work, "screen", scan, "--run", "straight", "--out", "fullmaps", code=1,
               preexec_fn=_file_size_limit(16 * 1024))
    assert re.search(r"scan\.nii\.gz: FAILED \S+: could not be written", proc.stdout), proc.stdout
    assert "Traceback" not in proc.stderr
    report = list(csv.DictReader((work / "fullmaps" / "report.csv").open()))
    assert report[0]["status"] == "failed" and "could not be written" in report[0]["error"]
    assert not [p for p in (work / "fullmaps").rglob(".*") if p.name != ".multiad.lock"]
    assert not (work / "fullmaps" / ".multiad.lock").exists()


def _file_size_limit(limit: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_checkpoint_that_cannot_be_written_is_one_clear_line_and_no_partial_file(work):
    """A storage that takes no file over 256 KiB (RLIMIT_FSIZE: writes fail with EFBIG as on a full
    disk): the first checkpoint (megabytes) fails; the command says which file, exits 1, and leaves
    no temporary file."""
    proc = run(work, "train", "data", "--run-dir", "full", "--epochs", "2", *TINY, code=1,
               preexec_fn=_file_size_limit(256 * 1024))
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"checkpoints/\w+_checkpoint_\S+\.pt: could not be written", lines[0]), lines[0]
    assert "File too large" in lines[0], lines[0]  # the system's reason, found under torch's own error
    leftovers = [p.name for p in (work / "full").rglob("*") if p.is_file()]
    assert not [n for n in leftovers if n.endswith(".pt") or "tmp" in n], leftovers
    assert not (work / "full" / ".multiad.lock").exists()


def test_config_file_is_the_starting_point_and_options_override_it(work, uninterrupted):
    run(work, "train", "data", "--run-dir", "from_config", "--config", "straight/config.json", "--epochs", "1",
        "--device", "cpu")
    cfg = json.loads((work / "from_config" / "config.json").read_text())
    ref = json.loads((uninterrupted / "config.json").read_text())
    assert cfg["epochs"] == 1 and ref["epochs"] == 6
    assert {k: v for k, v in cfg.items() if k != "epochs"} == {k: v for k, v in ref.items() if k != "epochs"}
    assert len(log_rows(work / "from_config")) == 1


def test_early_stopping_stops(work):
    """lr ~0: the validation loss cannot improve by min_delta, so patience 1 stops after epoch 2."""
    run(work, "train", "data", "--run-dir", "stopped", "--epochs", "20", *TINY, "--early-stop-patience", "1",
        "--lr", "1e-12")
    rows = log_rows(work / "stopped")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert json.loads((work / "stopped" / "metrics.json").read_text())["training"]["epochs"] == 2


def test_nproc_2_from_the_command_line(work):
    proc = run(work, "train", "data", "--run-dir", "two", "--epochs", "2", "--nproc", "2", *TINY)
    assert "run folder: two" in proc.stdout
    assert [int(r["epoch"]) for r in log_rows(work / "two")] == [1, 2]
    assert (work / "two" / "model.pt").is_file() and not (work / "two" / ".multiad.lock").exists()
    run(work, "evaluate", "--run", "two")
    assert json.loads((work / "two" / "metrics.json").read_text())["evaluation"]["num_images"] == 8


BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def bundle_train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The industrial bundle's train.json, with its run options given at the top level, as ``multiad
    train``'s are (``--epochs 2``)."""
    config = str(BUNDLES / "multiad_industrial" / "configs" / "train.json")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--bundle_root", "bundle_root",
           "--dataset_dir", "data", "--device", "cpu", "--image_size", "64", "--batch_size", "8", "--backbone",
           "resnet18", "--pretrained", "none", "--in_channels", "1", "--early_stop_patience", "0", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return proc


def test_bundle_resume_goes_on_from_the_checkpoint_and_keeps_the_best_record(work):
    """The industrial bundle, 2 epochs, then ``--resume`` its last checkpoint to 3 epochs with a
    learning rate too small to change a weight (as above): training goes on from iteration 2 x epoch
    length, the log goes on, and the best-checkpoint record saved in the last checkpoint is carried
    over, so epoch 3 (no better) does not replace the best checkpoint of epochs 1-2."""
    bundle_train(work, "--epochs", "2")
    models = work / "bundle_root" / "models"
    (best_before,) = (models / "checkpoints").glob("best_checkpoint_*.pt")
    (last,) = (models / "checkpoints").glob("last_checkpoint_*.pt")
    assert "best_checkpointer" in torch.load(last, weights_only=True)  # the record travels with the checkpoint
    first = json.loads((models / "metrics.json").read_text())["training"]
    assert first["epochs"] == 2 and first["best_checkpoint"] == best_before.name

    bundle_train(work, "--epochs", "3", "--lr", "1e-12", "--resume", str(last.relative_to(work)))
    summary = json.loads((models / "metrics.json").read_text())["training"]
    assert summary["epochs"] == 3 and summary["iterations"] == first["iterations"] // 2 * 3
    rows = log_rows(models)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[2]["val_loss"]) >= min(float(r["val_loss"]) for r in rows[:2])  # the premise
    assert [p.name for p in (models / "checkpoints").glob("best_checkpoint_*.pt")] == [best_before.name]
    assert numbers(models, "last") == [summary["iterations"]]
    best = best_student(models)
    for k, v in student_state(models).items():
        assert torch.equal(best[k], v), k  # model.pt is the best epoch's student
