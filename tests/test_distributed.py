"""Data-parallel training on CPU with gloo: two processes agree on the student, rank 0 writes the run."""

from __future__ import annotations

import dataclasses

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import monai_multiad.distributed as distributed
from monai_multiad.cli import distributed_main
from monai_multiad.config import RunConfig
from monai_multiad.data.synthetic_images import write_mvtec_dataset
from monai_multiad.errors import MultiADInputError

TINY = dict(backbone="resnet18", pretrained="none", image_size=64, batch_size=4, early_stop_patience=0,
            discriminator_channels=[8], device="cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_mvtec_dataset(tmp_path_factory.mktemp("ddp") / "data", n_train=16, n_test_good=2,
                               n_test_defect=2, size=64, channels=3, seed=0)


def _recording_worker(local_rank, cfg, run_dir, *args):
    """``distributed._worker`` that also saves each rank's student parameters as training ends
    (just before the fusion is fitted), to ``<run_dir>/../student_rank<R>.pt``."""
    import ignite.distributed as idist

    import monai_multiad.workflow as workflow

    fit_fusion = workflow.fit_fusion

    def recording_fit_fusion(network, *a, **k):
        params = {n: p.detach().clone() for n, p in network.student.named_parameters()}
        torch.save(params, Path(run_dir).parent / f"student_rank{idist.get_rank()}.pt")
        return fit_fusion(network, *a, **k)

    workflow.fit_fusion = recording_fit_fusion
    return distributed._worker(local_rank, cfg, run_dir, *args)


def test_default_backend_cpu():
    if not torch.cuda.is_available():
        assert distributed.default_backend(2) == "gloo"
    assert distributed.default_backend(2, device="cpu") == "gloo"


@pytest.fixture(scope="module")
def ddp_run(dataset, tmp_path_factory) -> dict:
    """One full epoch on two gloo processes (7 images per rank, 2 per rank's batch: 4 iterations), so
    that validation, the per-epoch log and both checkpoints happen under DDP too."""
    cfg = RunConfig(dataset_dir=str(dataset), epochs=1, **TINY)
    tmp = tmp_path_factory.mktemp("ddp_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distributed, "_worker", _recording_worker)  # spawned children import it by name
        summary = distributed.train_distributed(cfg, tmp / "run", nproc=2, backend="gloo")
    return {"cfg": cfg, "run": tmp / "run", "tmp": tmp, "summary": summary}


def test_two_gloo_processes_same_student_and_complete_run(ddp_run):
    cfg, run_dir, tmp_path, summary = ddp_run["cfg"], ddp_run["run"], ddp_run["tmp"], ddp_run["summary"]
    assert summary["epochs"] == 1 and summary["iterations"] == 4
    names = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    for expected in ("config.json", "model.pt", "metrics.json", "log.csv"):
        assert expected in names
    ckpts = {n.split("/")[-1].split("_")[0] for n in names if n.startswith("checkpoints/")}
    assert ckpts == {"last", "best"}
    assert json.loads((run_dir / "metrics.json").read_text())["training"] == summary

    rank0 = torch.load(tmp_path / "student_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "student_rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "DDP ranks ended with different students"
    saved = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[f"student.{k}"], v) for k, v in rank0.items())
    from monai_multiad.workflow import load_model

    model, loaded_cfg, fusion = load_model(run_dir)
    # the "auto" options settled for 2D images
    assert loaded_cfg == dataclasses.replace(cfg, foreground="off", synthetic_anomalies=["texture"])
    assert model.fusion.fitted
    # every rank fits the fusion on all held-out normals
    assert summary["fusion"]["num_images"] == summary["val_images"]


def test_only_rank0_writes_tensorboard_events(ddp_run):
    pytest.importorskip("tensorboard", reason="the per-epoch TensorBoard log needs the optional 'tensorboard' "
                                              "(pip install monai-multiad[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((ddp_run["run"] / "tensorboard").glob("events.*"))
    assert len(events) == 1, events
    log = EventAccumulator(str(events[0]))
    log.Reload()
    assert [e.step for e in log.Scalars("val_loss")] == [1]  # the one epoch, logged once


def test_torchrun_entry_point(dataset, tmp_path):
    run_dir = tmp_path / "run"
    options = [o for k, v in TINY.items() for o in (f"--{k.replace('_', '-')}",
                                                      *(map(str, v) if isinstance(v, list) else [str(v)]))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "monai_multiad.distributed", str(dataset), "--run-dir", str(run_dir), "--max-steps", "3", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("trained 1 epoch(s), 3 iterations") == 1  # printed by rank 0 only
    for name in ("config.json", "model.pt", "metrics.json"):
        assert (run_dir / name).is_file()
    assert json.loads((run_dir / "config.json").read_text())["max_steps"] == 3


def test_input_error_of_a_rank_is_reported(tmp_path):
    cfg = RunConfig(dataset_dir=str(tmp_path / "missing"), **TINY)
    with pytest.raises(MultiADInputError, match="missing"):
        distributed.train_distributed(cfg, tmp_path / "run", nproc=2, backend="gloo")
    assert not (tmp_path / "run").exists()


def test_entry_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as e:
        distributed_main(["data", "--run-dir", "r", "--backbone", "vgg"])
    assert e.value.code == 2 and "--backbone" in capsys.readouterr().err
