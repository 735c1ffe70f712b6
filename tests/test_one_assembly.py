"""One assembly: ``multiad train`` and the bundles' ``train.json`` build a training run from the same
builders (:mod:`monai_multiad.workflow`, :mod:`monai_multiad.run_folder`), so they write the same run
folder; every ``RunConfig`` option is a top-level key of both bundles' ``train.json``, overridden on
the command line as ``--epochs 2``. The runs are subprocesses in a temporary working folder with
relative paths, as a user types them."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import multiad_command

pytest.importorskip("fire", reason="`python -m monai.bundle` needs MONAI's optional package 'fire'")

from monai_multiad.config import RunConfig  # noqa: E402

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
# the options each bundle sets its own default for; every other top-level default is RunConfig's
OWN_DEFAULTS = {
    "multiad_industrial": {"layout": "mvtec", "in_channels": 3},
    "multiad_brain_mri": {"layout": "volumes", "in_channels": 1, "modality": "mri"},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# the same tiny run, spelled for the CLI (--image-size) and for the bundle (--image_size)
TINY = {"layout": "mvtec", "in_channels": 1, "image_size": 64, "batch_size": 8, "backbone": "resnet18",
        "pretrained": "none", "epochs": 2, "device": "cpu"}


def _train_config(name: str) -> dict:
    return json.loads((BUNDLES / name / "configs" / "train.json").read_text())


@pytest.mark.parametrize("name", sorted(OWN_DEFAULTS))
def test_every_run_option_is_a_top_level_key_given_to_run_config(name):
    config = _train_config(name)
    options = [f.name for f in fields(RunConfig)]
    given = {k: v for k, v in config["run_config"].items() if k != "_target_"}
    # a new RunConfig option must be added here too, or this fails
    assert sorted(given) == sorted(options)
    assert given == {k: f"@{k}" for k in options}
    # with RunConfig's defaults, except the few the bundle sets for its data
    defaults = json.loads(json.dumps(RunConfig().to_dict()))
    assert {k: config[k] for k in options} == {**defaults, **OWN_DEFAULTS[name]}


def _normalised(run_dir: Path) -> set[str]:
    """The run folder's files, numbers and scores in checkpoint names replaced by N, TensorBoard's
    event file (host, time, pid in its name) by one name."""
    names = set()
    for p in run_dir.rglob("*"):
        if p.is_file():
            rel = p.relative_to(run_dir).as_posix()
            rel = re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents", rel)
            names.add(re.sub(r"-?\d+(\.\d+)?", "N", rel) if rel.startswith("checkpoints/") else rel)
    return names


def _log(run_dir: Path) -> list[dict]:
    with (run_dir / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> dict:
    from monai_multiad.data.synthetic_images import write_mvtec_dataset

    cwd = tmp_path_factory.mktemp("one_assembly")
    write_mvtec_dataset(cwd / "data", n_train=12, n_test_good=2, n_test_defect=2, size=64, channels=1, seed=0)
    cli = multiad_command()
    cli_args = [a for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    bundle_args = [a for k, v in TINY.items() for a in (f"--{k}", str(v))]
    commands = {
        "cli": [*cli, "train", "data", "--run-dir", "cli_run", *cli_args],
        "bundle": [sys.executable, "-m", "monai.bundle", "run", "--config_file",
                   str(BUNDLES / "multiad_industrial" / "configs" / "train.json"), "--bundle_root", "bundle_root",
                   "--dataset_dir", "data", *bundle_args],
    }
    for cmd in commands.values():
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return {"cli": cwd / "cli_run", "bundle": cwd / "bundle_root" / "models", "cwd": cwd, "bundle_cmd": commands["bundle"]}


def test_cli_and_bundle_write_the_same_run_folder(two_runs):
    cli, bundle = two_runs["cli"], two_runs["bundle"]
    assert _normalised(cli) == _normalised(bundle)
    assert {"checkpoints/last_checkpoint_N.pt", "checkpoints/best_checkpoint_N_neg_val_loss=N.pt", "log.csv",
            "model.pt", "config.json", "metrics.json"} <= _normalised(cli)
    # the same options from the same defaults: the bundle's top-level --epochs 2 ... took effect
    assert json.loads((cli / "config.json").read_text()) == json.loads((bundle / "config.json").read_text())
    summaries = [json.loads((run / "metrics.json").read_text())["training"] for run in (cli, bundle)]
    assert summaries[0].keys() == summaries[1].keys()
    assert summaries[0]["fusion"].keys() == summaries[1]["fusion"].keys()
    assert summaries[0]["epochs"] == summaries[1]["epochs"] == 2
    logs = [_log(run) for run in (cli, bundle)]
    assert list(logs[0][0]) == list(logs[1][0]) and len(logs[0]) == len(logs[1]) == 2
    # and the same objects built in the same order: the same numbers
    for a, b in zip(*logs):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-5)


def test_sigterm_finishes_a_bundle_run_from_the_best_epoch(two_runs):
    """As ``multiad train`` (tests/test_resume.py): SIGTERM after two epochs ends training, the run is
    finished from its best epoch (model.pt written, ``"interrupted": true``) and the command exits 0."""
    cmd = [*two_runs["bundle_cmd"], "--epochs", "100", "--early_stop_patience", "0", "--bundle_root", "termed"]
    proc = subprocess.Popen(cmd, cwd=two_runs["cwd"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    run_dir = two_runs["cwd"] / "termed" / "models"
    t0 = time.monotonic()
    while not ((run_dir / "log.csv").is_file() and len(_log(run_dir)) >= 2):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 300, "no two epochs in 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())["training"]
    assert summary["interrupted"] is True and 2 <= summary["epochs"] < 100
    assert (run_dir / "model.pt").is_file() and (run_dir / "checkpoints" / summary["best_checkpoint"]).is_file()
