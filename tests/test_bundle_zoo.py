"""The bundles as graphs MONAI's tools drive, as the model zoo's are: ``ConfigWorkflow`` finds every required
property of train.json, evaluate.json and inference.json; ``verify_net_in_out`` builds ``network_def`` from the
metadata's shapes; ``ckpt_export`` in its default (scripted) form exports a trained run's plain state dict to a
TorchScript file giving the network's map; inference.json (a ``SupervisedEvaluator`` with the bundles'
inferers) writes maps and scores equal to those of screening and prediction. Tiny runs, as tests/test_bundles.py
trains them."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fire", reason="`python -m monai.bundle` needs MONAI's optional package 'fire'")

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
NAMES = ("multiad_industrial", "multiad_brain_mri")
TINY = {"image_size": 64, "epochs": 1, "batch_size": 4, "backbone": "resnet18", "pretrained": "none", "max_steps": 2}


def bundle(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` from ``cwd`` with ``configs/...`` pointing into the bundle."""
    args = tuple(a.replace("configs/", str(BUNDLES / name / "configs") + "/") for a in args)
    cmd = [sys.executable, "-m", "monai.bundle", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _train(name: str, cwd: Path, data: str) -> Path:
    args = []
    for k, v in TINY.items():
        args += [f"--{k}", str(v)]
    bundle(name, "run", "--config_file", "configs/train.json", "--bundle_root", "bundle_root", "--dataset_dir", data,
           "--device", "cpu", *args, cwd=cwd)
    return cwd / "bundle_root" / "models"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny trained run of each bundle, beside its data: {name: (working folder, data folder name, run)}."""
    from monai_multiad.data.synthetic_images import write_mvtec_dataset
    from monai_multiad.data.synthetic_volumes import make_phantom_volume, write_nifti

    industrial = tmp_path_factory.mktemp("zoo_industrial")
    write_mvtec_dataset(industrial / "bottle", n_train=8, n_test_good=2, n_test_defect=2, size=64)
    brain = tmp_path_factory.mktemp("zoo_brain")
    names = [f"normal_{i}" for i in range(3)]
    for i, case in enumerate(names):
        image, _ = make_phantom_volume((40, 44, 12), lesion=False, seed=10 + i)
        write_nifti(brain / "volumes" / case / "flair.nii.gz", np.round(image).astype(np.int16))
    image, label = make_phantom_volume((40, 44, 12), lesion=True, seed=99)
    write_nifti(brain / "volumes" / "lesion" / "flair.nii.gz", np.round(image).astype(np.int16))
    write_nifti(brain / "volumes" / "lesion" / "mask.nii.gz", label)
    (brain / "volumes" / "splits.json").write_text(json.dumps({"train": names, "test": ["lesion"]}))
    return {"multiad_industrial": (industrial, "bottle", _train("multiad_industrial", industrial, "bottle")),
            "multiad_brain_mri": (brain, "volumes", _train("multiad_brain_mri", brain, "volumes"))}


# ----------------------------------------------------------------------------- MONAI's workflow properties
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("config,kind", [("train", "train"), ("evaluate", "infer"), ("inference", "infer")])
def test_config_workflow_finds_every_required_property(runs, name, config, kind, tmp_path, monkeypatch):
    from monai.bundle import ConfigWorkflow

    cwd, data, run = runs[name]
    monkeypatch.chdir(cwd)
    configs = BUNDLES / name / "configs"
    overrides = {"device": "cpu", "dataset_dir": data}
    if config == "train":  # a fresh run folder: initialize writes its config.json
        overrides.update(bundle_root=str(tmp_path), **{k: v for k, v in TINY.items() if k != "max_steps"})
    else:
        overrides.update(bundle_root="bundle_root", output_dir=str(tmp_path / "out"))
    workflow = ConfigWorkflow(config_file=str(configs / f"{config}.json"), meta_file=str(configs / "metadata.json"),
                              logging_file=str(configs / "logging.conf"), workflow_type=kind, **overrides)
    workflow.initialize()
    assert workflow.check_properties() == []
    if config == "train":
        assert workflow.max_epochs == TINY["epochs"] and workflow.trainer.state.max_epochs == TINY["epochs"]
    else:
        assert len(workflow.dataset) > 0 and workflow.evaluator.data_loader.dataset is workflow.dataset


def test_max_epochs_is_the_trainers(runs, tmp_path, monkeypatch):
    """``train#trainer#max_epochs`` is what the trainer runs for: ``--epochs`` by default, else as given."""
    from monai.bundle import ConfigParser

    cwd, data, _ = runs["multiad_brain_mri"]
    monkeypatch.chdir(cwd)
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "multiad_brain_mri" / "configs" / "train.json"))
    parser.update({"dataset_dir": data, "device": "cpu", "bundle_root": str(tmp_path), "epochs": 3,
                   **{k: v for k, v in TINY.items() if k not in ("epochs", "max_steps")}})
    assert parser.get_parsed_content("train#trainer").state.max_epochs == 3
    parser["train#trainer#max_epochs"] = 2
    assert parser.get_parsed_content("train#trainer", lazy=False).state.max_epochs == 2


# ----------------------------------------------------------------------------- network_def and its checkpoint
@pytest.mark.parametrize("name", NAMES)
def test_verify_net_in_out(name, tmp_path):
    """MONAI's check of ``network_def`` against ``network_data_format``: the bundle's default network."""
    proc = bundle(name, "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                  "--config_file", "configs/inference.json", "--device", "cpu", cwd=tmp_path)
    assert "data shape of network is verified with no error" in (proc.stdout + proc.stderr)


@pytest.mark.parametrize("channels,options", [(3, {}), (1, {"foreground": "on", "feature_norm": True})])
def test_network_def_scripts_to_the_same_map(channels, options):
    """``torch.jit.script`` compiles the default network (EfficientNet-Lite0 with its memory bank, segmentation
    head, and for scans the foreground mask) and gives the eager map."""
    from monai_multiad.bundle_support import anomaly_map_network, run_config

    torch.manual_seed(0)
    net = anomaly_map_network(run_config(in_channels=channels, layout="volumes" if channels == 1 else "mvtec",
                                         **options)).eval()
    if options.get("feature_norm"):
        for k in range(4):  # statistics that change the features
            getattr(net, f"feature_mean{k}").uniform_(-0.1, 0.1)
            getattr(net, f"feature_std{k}").uniform_(0.5, 2.0)
    scripted = torch.jit.script(net)
    x = torch.rand(2, channels, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = net(x), scripted(x)
    assert got.shape == expected.shape == (2, 1, 96, 96)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_ckpt_export_scripts_the_plain_state_dict(runs, name, tmp_path):
    """``ckpt_export`` in its default form (``torch.jit.script``, no ``--key_in_ckpt``) from the plain state
    dict :func:`~monai_multiad.bundle_support.write_state_dict` writes: the file's map is the run's network's,
    at the trained size and at another (a scripted graph keeps no traced shape)."""
    from monai_multiad.bundle_support import write_state_dict
    from monai_multiad.run_folder import load_model

    cwd, _, run = runs[name]
    state = write_state_dict(run, tmp_path / "model_state.pt")
    assert state.is_file() and (run / "model.pt").is_file()
    model, cfg, _ = load_model(run)
    assert set(torch.load(state, weights_only=True)) == set(model.state_dict())
    ts = tmp_path / "model.ts"
    options = []
    for key in ("backbone", "in_channels", "layout", "image_size"):
        options += [f"--run_config#{key}", str(getattr(cfg, key))]
    bundle(name, "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(state),
           "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json", *options, cwd=cwd)
    exported = torch.jit.load(str(ts))
    for size in (64, 80):
        x = torch.rand(2, cfg.in_channels, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            expected, got = model(x)[0], exported(x)
        assert got.shape == expected.shape == (2, 1, size, size)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- inference.json
def _rows(path: Path) -> dict[str, dict]:
    return {r["path"]: r for r in csv.DictReader(path.open())}


def _run_inference(runs, name: str, out: Path) -> dict[str, dict]:
    """The bundle's inference.json on its tiny run's data set, writing to ``out``: the rows of scores.csv."""
    cwd, data, _ = runs[name]
    bundle(name, "run", "--config_file", "configs/inference.json", "--bundle_root", "bundle_root",
           "--dataset_dir", data, "--device", "cpu", "--output_dir", str(out), cwd=cwd)
    return _rows(out / "scores.csv")


def _load_map(cwd: Path, row: dict):
    import nibabel as nib

    return nib.load(row["map"] if Path(row["map"]).is_absolute() else str(cwd / row["map"]))


def test_brain_inference_writes_maps_on_the_scan_grid(runs, tmp_path):
    import nibabel as nib

    from monai_multiad.screening import screen_volume
    from monai_multiad.transforms import load_volume

    cwd, data, run = runs["multiad_brain_mri"]
    out = tmp_path / "maps"
    rows = _run_inference(runs, "multiad_brain_mri", out)
    assert len(rows) == 1  # the test case of splits.json
    (row,) = rows.values()
    scan = cwd / row["path"]
    assert scan == cwd / data / "lesion" / "flair.nii.gz"
    written = _load_map(cwd, row)
    assert Path(written.get_filename()) == out / "lesion" / "flair_anomaly_map.nii.gz"
    image = nib.load(str(scan))
    assert written.shape == image.shape and np.allclose(written.affine, image.affine)
    reference = screen_volume(run, load_volume(scan), device="cpu")
    assert float(row["score"]) == pytest.approx(reference.scan_score, rel=1e-5)
    assert [int(v) for v in row["top_slices"].split()] == reference.top_slices
    np.testing.assert_allclose(written.get_fdata(), reference.anomaly_map[0].numpy(), rtol=1e-5, atol=1e-5)
    assert float(written.get_fdata().max()) > 0
    report = json.loads((out / "scores.json").read_text())
    assert report["threshold"] == reference.threshold and row["anomalous"] == str(reference.anomalous)


def test_industrial_inference_scores_as_predict(runs, tmp_path):
    from PIL import Image

    from monai_multiad.bundle_support import image_inputs
    from monai_multiad.inference import predict

    cwd, data, run = runs["multiad_industrial"]
    rows = _run_inference(runs, "multiad_industrial", tmp_path / "maps")
    predicted = {str(Path(p["path"]).resolve()): p for p in
                 predict(run, image_inputs(cwd / data), tmp_path / "predicted", device="cpu")}
    assert {str((cwd / p).resolve()) for p in rows} == predicted.keys() and len(rows) == 4
    for path, row in rows.items():
        reference = predicted[str((cwd / path).resolve())]
        assert float(row["score"]) == pytest.approx(reference["score"], rel=1e-5, abs=1e-7), path
        assert row["anomalous"] == str(reference["anomalous"])
        amap = _load_map(cwd, row)
        width, height = Image.open(cwd / path).size
        assert amap.shape == (height, width)  # back at the image's own size
        assert float(amap.get_fdata().max()) == pytest.approx(float(row["score"]), rel=1e-4)
