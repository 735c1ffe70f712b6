"""Fixtures the test files share, so that the suite trains each tiny run once.

``tiny_texture_run``: a working folder holding ``data/tex`` (a small MVTec-layout texture set with planted
defects) and ``runs/tex``, trained there as a user trains (the ``multiad`` command, relative paths) with
:data:`TINY_TRAIN`. Tests that write next to it take their own copy (:func:`copy_work`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

#: a tiny run: 64 px, ResNet-18 without downloaded weights, a small discriminator, one epoch (2 steps on 10 images)
TINY_TRAIN = ["--image-size", "64", "--batch-size", "8", "--epochs", "1", "--backbone", "resnet18",
              "--pretrained", "none", "--discriminator-channels", "16", "32", "--early-stop-patience", "0",
              "--val-fraction", "0.2", "--device", "cpu"]


def multiad_command() -> list[str]:
    """The ``multiad`` script of this environment (what the README runs), else the module."""
    script = Path(sys.executable).parent / "multiad"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "monai_multiad"]


def write_textures(root: Path) -> Path:
    from monai_multiad.data.synthetic_images import write_mvtec_dataset

    return write_mvtec_dataset(root, n_train=12, n_test_good=4, n_test_defect=4, size=64, channels=3, seed=0)


@pytest.fixture(scope="session")
def tiny_texture_run(tmp_path_factory) -> Path:
    """The working folder with ``data/tex`` and ``runs/tex`` (``multiad train data/tex --run-dir runs/tex``)."""
    cwd = tmp_path_factory.mktemp("tiny_texture_run")
    write_textures(cwd / "data" / "tex")
    proc = subprocess.run([*multiad_command(), "train", "data/tex", "--run-dir", "runs/tex", *TINY_TRAIN], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    return cwd


def copy_work(source: Path, target: Path) -> Path:
    """A copy of a shared working folder, for a test file that writes beside its run."""
    shutil.copytree(source, target)
    return target
