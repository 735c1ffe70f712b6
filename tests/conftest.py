"""Fixtures the test files share, so that the suite trains each tiny run once.

``tiny_texture_run``: a working folder holding ``data/tex`` (a small MVTec-layout texture set with planted
defects) and ``runs/tex``, trained there as a user trains (the ``multiad`` command, relative paths) with
:data:`TINY_TRAIN`. ``tiny_volume_run``: a working folder holding ``data/train`` (three normal phantom heads,
NIfTI) and ``runs/vol`` trained on them with :data:`TINY_VOLUME_TRAIN`. Tests that write next to a run take
their own copy (:func:`copy_work`)."""

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


#: a tiny run on volumes: one channel, 4 steps, two stages
TINY_VOLUME_TRAIN = ["--image-size", "64", "--batch-size", "8", "--backbone", "resnet18", "--pretrained", "none",
                     "--early-stop-patience", "0", "--device", "cpu", "--in-channels", "1", "--val-fraction", "0.34",
                     "--max-steps", "4", "--stages", "1", "2"]
#: the phantom heads' shape
PHANTOM_SHAPE = (48, 48, 14)


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


def write_phantom(path: Path, seed: int, lesion: bool = False, shape: tuple = PHANTOM_SHAPE):
    """A phantom head as a NIfTI file (int16); returns its lesion label volume."""
    import numpy as np

    from monai_multiad.data.synthetic_volumes import make_phantom_volume, write_nifti

    image, label = make_phantom_volume(shape, lesion=lesion, seed=seed)
    write_nifti(path, np.round(image).astype(np.int16))
    return label


@pytest.fixture(scope="session")
def tiny_volume_run(tmp_path_factory) -> Path:
    """The working folder with ``data/train`` (normal phantoms, seeds 10-12) and ``runs/vol``
    (``multiad train data/train --run-dir runs/vol``)."""
    cwd = tmp_path_factory.mktemp("tiny_volume_run")
    for i in range(3):
        write_phantom(cwd / "data" / "train" / f"normal_{i}.nii.gz", seed=10 + i)
    proc = subprocess.run([*multiad_command(), "train", "data/train", "--run-dir", "runs/vol", *TINY_VOLUME_TRAIN],
                          cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    return cwd


def copy_work(source: Path, target: Path) -> Path:
    """A copy of a shared working folder, for a test file that writes beside its run."""
    shutil.copytree(source, target)
    return target
