"""Screening a cohort as a user does it: ``multiad screen`` on a folder of cases or a list file, run as
a subprocess in a temporary working folder with relative paths. Two gloo processes (``--nproc 2``, and
torchrun) give the report one process gives; a job killed (SIGKILL) after 3 of 6 scans resumes, keeps
those 3 untouched and finishes the other 3, with the report of an uninterrupted run; a scan screened
with another model, or with other settings, is screened again."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_multiad.cohort import expand_scans
from monai_multiad.report import REPORT_FIELDS
from monai_multiad.config import RunConfig
from monai_multiad.data.synthetic_volumes import make_phantom_volume, write_nifti
from monai_multiad.networks import MultiAD
from monai_multiad.run_folder import save_model
from test_journeys import multiad as run_multiad

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
CASES = [f"case_{i}" for i in range(6)]


def multiad(cwd: Path, *args: str, code: int | None = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    """The journeys' ``multiad`` runner, one thread per process (several run at once here)."""
    return run_multiad(cwd, *args, code=code, timeout=timeout, env=ENV)


def _save_run(folder: Path, seed: int) -> None:
    """A run folder with an untrained tiny network (the weights from ``seed``): enough to screen with."""
    torch.manual_seed(seed)
    cfg = RunConfig(backbone="resnet18", pretrained="none", discriminator=False, in_channels=1, image_size=48)
    save_model(folder / "model.pt", MultiAD("resnet18", in_channels=1, pretrained=False, discriminator=False), cfg,
               fusion_stats={"threshold": 1.0})


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """``data/cohort/case_{0..5}.nii.gz`` (phantoms, with a label volume that is not a scan),
    ``data/broken.nii.gz`` (not a NIfTI file), ``lists/cohort.txt`` (the six cases and the broken file
    fourth, relative to the list), and two runs, ``runs/a`` and ``runs/b``, with different weights."""
    cwd = tmp_path_factory.mktemp("cohort")
    for i, case in enumerate(CASES):
        image, label = make_phantom_volume((40, 36, 10), lesion=i % 2 == 1, seed=i)
        write_nifti(cwd / "data" / "cohort" / f"{case}.nii.gz", np.round(image).astype(np.int16))
    write_nifti(cwd / "data" / "cohort" / "case_5_mask.nii.gz", label.astype(np.uint8))
    (cwd / "data" / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    entries = [f"../data/cohort/{c}.nii.gz" for c in CASES]
    entries.insert(3, "../data/broken.nii.gz")
    (cwd / "lists").mkdir()
    (cwd / "lists" / "cohort.txt").write_text("# the cohort\n" + "\n".join(entries) + "\n\n")
    _save_run(cwd / "runs" / "a", seed=0)
    _save_run(cwd / "runs" / "b", seed=1)
    return cwd


def report(out: Path) -> list[dict]:
    return json.loads((out / "report.json").read_text())


def assert_same_report(got: Path, expected: Path) -> None:
    """Row for row, in the same order: the same scans, statuses, scores (to 1e-6), top slices and
    thresholds; the same files under both folders, and the same maps (to 1e-6)."""
    a, b = report(got), report(expected)
    assert [r["scan"] for r in a] == [r["scan"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if k == "seconds":
                continue
            if k in ("map", "dicom_map", "dicom_seg") and x[k]:
                assert Path(x[k]).relative_to(got) == Path(y[k]).relative_to(expected)
            elif isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], abs=1e-6), (x["name"], k)
            else:
                assert x[k] == y[k], (x["name"], k)
    files = sorted(str(p.relative_to(got)) for p in got.rglob("*"))
    assert files == sorted(str(p.relative_to(expected)) for p in expected.rglob("*"))
    assert not [f for f in files if Path(f).name.startswith(".")]  # no temporary file, no lock left
    for r in a:
        if r["status"] == "ok":
            ref = expected / Path(r["map"]).relative_to(got)
            np.testing.assert_allclose(nib.load(r["map"]).get_fdata(), nib.load(ref).get_fdata(), atol=1e-6)


@pytest.fixture(scope="module")
def one_process(work) -> Path:
    """The list file screened by one process with run a."""
    multiad(work, "screen", "lists/cohort.txt", "--run", "runs/a", "--out", "out/one", "--device", "cpu", code=1)
    return work / "out" / "one"


@pytest.fixture(scope="module")
def uninterrupted(work) -> Path:
    """The cohort folder screened by one process with run a, start to end."""
    multiad(work, "screen", "data/cohort", "--run", "runs/a", "--out", "out/straight", "--device", "cpu")
    return work / "out" / "straight"


def test_scans_from_a_folder_of_cases_and_from_a_list_file(work):
    cohort = [work / "data" / "cohort" / f"{c}.nii.gz" for c in CASES]
    assert expand_scans([work / "data" / "cohort"]) == cohort  # sorted by name; the label volume left out
    assert expand_scans([work / "lists" / "cohort.txt"]) == [*cohort[:3], work / "data" / "broken.nii.gz",
                                                             *cohort[3:]]
    (work / "lists" / "nested.lst").write_text("../data/cohort\n  # a comment\n../data/missing.nii.gz\n")
    assert expand_scans([work / "lists" / "nested.lst"]) == [*cohort, work / "data" / "missing.nii.gz"]


def test_report_of_one_process(work, one_process):
    rows = report(one_process)
    assert [r["name"] for r in rows] == [*CASES[:3], "broken", *CASES[3:]]
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["failed"] + ["ok"] * 3
    assert "broken.nii.gz" in rows[3]["error"] and "\n" not in rows[3]["error"]
    assert len({r["scan_score"] for r in rows if r["status"] == "ok"}) > 1  # the scans are told apart
    # one row type: report.json, report.csv and each scan's result.json have its fields, in its order, and a
    # failed scan's row says the same threshold and where it came from as the others
    assert all(tuple(r) == REPORT_FIELDS for r in rows)
    with open(one_process / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == REPORT_FIELDS and [r["name"] for r in table] == [r["name"] for r in rows]
    assert {(r["threshold"], r["threshold_source"], r["threshold_kind"]) for r in rows} == {
        (rows[0]["threshold"], rows[0]["threshold_source"], "uncalibrated")}
    record = json.loads((one_process / CASES[0] / "result.json").read_text())
    assert {k: record[k] for k in REPORT_FIELDS} == rows[0]


def test_two_gloo_processes_give_the_report_of_one(work, one_process):
    """Rank 0 screens entries 0, 2, 4, 6 and rank 1 entries 1, 3, 5: the broken scan fails on rank 1, which
    goes on; rank 0 merges one report in the list's order."""
    proc = multiad(work, "screen", "lists/cohort.txt", "--run", "runs/a", "--out", "out/two", "--device", "cpu",
                   "--nproc", "2", code=1)
    assert "Traceback" not in proc.stderr
    assert_same_report(work / "out" / "two", one_process)
    assert proc.stdout.count("FAILED") == 1 and proc.stdout.count(": score ") == 6
    assert "data/cohort/case_5.nii.gz: score" in proc.stdout


def test_reading_in_workers_and_writing_in_a_thread_give_the_report_of_one_process(work, one_process):
    multiad(work, "screen", "lists/cohort.txt", "--run", "runs/a", "--out", "out/workers", "--device", "cpu",
            "--workers", "2", code=1)
    assert_same_report(work / "out" / "workers", one_process)


def test_uncompressed_maps(work, one_process):
    """``--map-format nii``: the same maps, uncompressed; scans screened into .nii.gz are screened again."""
    out = work / "out" / "nii"
    shutil.copytree(one_process, out)
    proc = multiad(work, "screen", "lists/cohort.txt", "--run", "runs/a", "--out", "out/nii", "--device", "cpu",
                   "--map-format", "nii", code=1)
    assert "already screened" not in proc.stderr
    for row, ref in zip(report(out), report(one_process)):
        assert row["scan_score"] == ref["scan_score"]
        if row["status"] == "ok":
            assert row["map"].endswith("anomaly_map.nii") and Path(row["map"]).read_bytes()[:2] != b"\x1f\x8b"
            np.testing.assert_array_equal(nib.load(row["map"]).get_fdata(), nib.load(ref["map"]).get_fdata())
            assert not (Path(row["map"]).parent / "anomaly_map.nii.gz").exists()  # the other format's map went


def test_torchrun_gives_the_report_of_one_process(work, one_process):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "monai_multiad.distributed", "screen", "lists/cohort.txt", "--run-folder", "runs/a", "--out",
           "out/torchrun", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0 and proc.stdout.count("wrote out/torchrun/report.csv") == 1, proc.stderr[-4000:]
    # a failed scan is said on stderr by rank 0, in one line: exit status 1 would make torchrun print a traceback
    assert proc.stderr.count("multiad: 1 of 7 scans failed") == 1 and "Traceback" not in proc.stderr
    assert_same_report(work / "out" / "torchrun", one_process)


# what a SIGKILL in the middle of writing the 4th scan's result.json leaves: the scan's other outputs, a
# half-written temporary file, no result.json; the test kills the process while it waits there
HANG_AT_THE_FOURTH_RECORD = """
import sys, time
from pathlib import Path
import monai_multiad.scan_outputs as scan_outputs
write_json, records = scan_outputs.write_json, []
def hanging_write_json(path, obj):
    if Path(path).name == "result.json":
        records.append(path)
        if len(records) == 4:
            (Path(path).parent / ".result.json.half").write_text("{")
            Path("hanging").write_text(str(path))
            time.sleep(600)
    return write_json(path, obj)
scan_outputs.write_json = hanging_write_json
from monai_multiad.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_after_three_scans_resumes_the_other_three(work, uninterrupted):
    out = work / "out" / "killed"
    args = ["screen", "data/cohort", "--run", "runs/a", "--out", "out/killed", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-c", HANG_AT_THE_FOURTH_RECORD, *args], cwd=work, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not (work / "hanging").is_file():
        if proc.poll() is not None:
            raise AssertionError(f"ended ({proc.returncode}) before the 4th scan:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() - t0 > 120:
            proc.kill()
            raise AssertionError("timed out waiting for the 4th scan")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (work / "hanging").unlink()
    done = [c for c in CASES if (out / c / "result.json").is_file()]
    assert done == CASES[:3] and (out / CASES[3] / "anomaly_map.nii.gz").is_file()
    assert not (out / "report.json").exists()
    kept = {c: ((out / c / "result.json").read_bytes(), (out / c / "anomaly_map.nii.gz").stat().st_mtime_ns)
            for c in done}

    proc = multiad(work, *args)
    assert "3 of 6 scans were already screened there with this model and these settings" in proc.stderr
    assert "Traceback" not in proc.stderr
    for c, (record, stamp) in kept.items():  # kept as they were, not screened again
        assert (out / c / "result.json").read_bytes() == record
        assert (out / c / "anomaly_map.nii.gz").stat().st_mtime_ns == stamp
    assert_same_report(out, uninterrupted)  # the half-written file is gone too

    proc = multiad(work, *args)  # all done: nothing screened, the same report
    assert "6 of 6 scans were already screened" in proc.stderr
    assert_same_report(out, uninterrupted)


def test_a_scan_screened_with_another_model_is_screened_again(work, uninterrupted):
    out, fresh_b = work / "out" / "mixed", work / "out" / "b"
    multiad(work, "screen", "data/cohort", "--run", "runs/b", "--out", "out/b", "--device", "cpu")
    shutil.copytree(uninterrupted, out)  # all six screened with run a
    # case_0 screened again, with run b: run a's record does not count for it
    proc = multiad(work, "screen", "data/cohort/case_0.nii.gz", "--run", "runs/b", "--out", "out/mixed",
                   "--device", "cpu")
    assert "already screened" not in proc.stderr
    assert report(out)[0]["scan_score"] == pytest.approx(report(fresh_b)[0]["scan_score"], abs=1e-6)
    # now the cohort with run b: case_0 kept, the five screened with run a screened again
    proc = multiad(work, "screen", "data/cohort", "--run", "runs/b", "--out", "out/mixed", "--device", "cpu")
    assert "1 of 6 scans were already screened" in proc.stderr
    assert_same_report(out, fresh_b)
    assert all(a["scan_score"] != b["scan_score"] for a, b in zip(report(uninterrupted), report(out)))
    # other settings are another screening too, and --rescreen screens everything again
    proc = multiad(work, "screen", "data/cohort", "--run", "runs/b", "--out", "out/mixed", "--device", "cpu",
                   "--top-k", "1")
    assert "already screened" not in proc.stderr and {r["top_slices"].__len__() for r in report(out)} == {1}
    before = (out / "case_0" / "result.json").stat().st_mtime_ns
    proc = multiad(work, "screen", "data/cohort", "--run", "runs/b", "--out", "out/mixed", "--device", "cpu",
                   "--top-k", "1", "--rescreen")
    assert "already screened" not in proc.stderr and (out / "case_0" / "result.json").stat().st_mtime_ns != before
