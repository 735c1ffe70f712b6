"""The MONAI bundles in ``bundles/``: train -> evaluate -> inference as a user types them
(``python -m monai.bundle run ...`` in a subprocess, from a working folder holding the data, with a
relative ``bundle_root`` and ``dataset_dir``, on tiny generated data; the industrial bundle
trains with its multi-GPU config, two gloo processes under torchrun), their metadata against
MONAI's schema (offline), ``verify_net_in_out``, ``ckpt_export`` against the trained model, and
what a user sees on bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fire", reason="`python -m monai.bundle` needs MONAI's optional package 'fire'")
jsonschema = pytest.importorskip("jsonschema", reason="metadata validation needs 'jsonschema'")

from monai_multiad.bundle_support import (  # noqa: E402
    anomaly_map_network,
    check_command_line,
    flag,
    install_error_hook,
    run_config,
)
from monai_multiad.config import RunConfig  # noqa: E402
from monai_multiad.errors import MultiADInputError, WeightsError  # noqa: E402

from _reference import assert_evaluation_matches, recompute_evaluation  # noqa: E402

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
SCHEMA = BUNDLES / "schema" / "meta_schema_20240725.json"
NAMES = ("multiad_industrial", "multiad_brain_mri")
# what makes a run tiny: the options a user would change, top-level keys of train.json
TINY = {"image_size": 64, "epochs": 1, "batch_size": 8, "backbone": "resnet18", "pretrained": "none"}


def _tiny_args(prefix: str = "--", **extra) -> list[str]:
    """``--epochs 1 ...`` (top-level keys), or with ``prefix="--run_config#"`` the keys of the
    ``run_config`` entry itself, which a user may also override."""
    args = []
    for k, v in {**TINY, **extra}.items():
        args += [f"{prefix}{k}", str(v)]
    return args + ["--device", "cpu"]


def bundle(name: str, *args: str, launcher: list[str] | None = None, check: bool = True, threads: str = "2",
           cwd: Path | None = None):
    """``python -m monai.bundle ARGS`` as a user runs it: in the bundle's folder, or in ``cwd`` with the
    ``--config_file`` paths (``configs/...``) made to point into the bundle."""
    if cwd is not None:
        args = tuple(a.replace("configs/", str(BUNDLES / name / "configs") + "/") for a in args)
    cmd = [*(launcher or [sys.executable]), "-m", "monai.bundle", *args]
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    # utf-8 whatever the locale: a failing torchrun ends its message with an emoji
    proc = subprocess.run(cmd, cwd=cwd or BUNDLES / name, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=300, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _scores_csv(path: Path) -> dict[str, float]:
    import csv

    return {r["path"]: float(r["score"]) for r in csv.DictReader(path.open())}


def _state_dict_file(run_dir: Path, path: Path) -> Path:
    from monai_multiad.export import save_state_dict

    return save_state_dict(run_dir, path)


# ----------------------------------------------------------------------------- data
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def industrial(tmp_path_factory):
    """A tiny MVTec-layout dataset, trained on with the industrial bundle's multi-GPU config: two
    processes under torchrun with gloo on CPU (the single-process path is the brain bundle's)."""
    from monai_multiad.data.synthetic_images import write_mvtec_dataset

    tmp = tmp_path_factory.mktemp("industrial")
    data = write_mvtec_dataset(tmp / "bottle", n_train=12, n_test_good=4, n_test_defect=4, size=64)
    root = tmp / "bundle_root"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    proc = bundle("multiad_industrial", "run", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
                  "--bundle_root", "bundle_root", "--dataset_dir", "bottle", *_tiny_args(), launcher=torchrun,
                  threads="1", cwd=tmp)
    return {"data": Path(data), "root": root, "run": root / "models", "train": proc, "cwd": tmp}


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    """Phantom volumes in the volume-folder layout (4 normal cases, one with a lesion), trained on."""
    from monai_multiad.data.synthetic_volumes import make_phantom_volume, write_nifti

    tmp = tmp_path_factory.mktemp("brain")
    data = tmp / "volumes"
    names = [f"normal_{i}" for i in range(4)]
    for i, case in enumerate(names):
        image, _ = make_phantom_volume((48, 48, 16), lesion=False, seed=10 + i)
        write_nifti(data / case / "flair.nii.gz", np.round(image).astype(np.int16))
    image, label = make_phantom_volume((48, 48, 16), lesion=True, seed=99)
    write_nifti(data / "lesion" / "flair.nii.gz", np.round(image).astype(np.int16))
    write_nifti(data / "lesion" / "mask.nii.gz", label)
    (data / "splits.json").write_text(json.dumps({"train": names, "test": ["lesion"]}))
    root = tmp / "bundle_root"
    bundle("multiad_brain_mri", "run", "--config_file", "configs/train.json", "--bundle_root", "bundle_root",
           "--dataset_dir", "volumes", *_tiny_args("--run_config#", max_steps=2, batch_size=4), cwd=tmp)
    return {"data": data, "root": root, "run": root / "models", "lesion_shape": label.shape, "cwd": tmp}


# ----------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("name", NAMES)
def test_metadata_is_valid_against_monai_schema(name):
    meta = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())
    schema = json.loads(SCHEMA.read_text())
    assert meta["schema"].endswith("/" + SCHEMA.name)
    jsonschema.Draft201909Validator.check_schema(schema)
    jsonschema.validate(meta, schema, cls=jsonschema.Draft201909Validator)
    # MONAI's own check, offline: the schema file is there, so nothing is downloaded
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(BUNDLES / name / "configs" / "metadata.json"), filepath=str(SCHEMA))
    broken = {k: v for k, v in meta.items() if k != "network_data_format"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft201909Validator)


@pytest.mark.parametrize("name", NAMES)
def test_bundle_layout(name):
    root = BUNDLES / name
    for rel in ("configs/metadata.json", "configs/train.json", "configs/evaluate.json", "configs/inference.json",
                "configs/multi_gpu_train.json", "configs/logging.conf", "docs/README.md", "LICENSE"):
        assert (root / rel).is_file(), rel
    for cfg in (root / "configs").glob("*.json"):
        json.loads(cfg.read_text())


# ----------------------------------------------------------------------------- industrial
def test_industrial_train_evaluate_inference(industrial):
    run = industrial["run"]
    for f in ("model.pt", "config.json", "metrics.json", "log.csv"):
        assert (run / f).is_file(), f
    # the CLI's checkpoint names: after the 2 iterations of epoch 1 (see below)
    assert [p.name for p in (run / "checkpoints").glob("last_checkpoint_*.pt")] == ["last_checkpoint_2.pt"]
    (best,) = (run / "checkpoints").glob("best_checkpoint_1_neg_val_loss=*.pt")
    # the same options, from the same defaults, as the CLI: only the bundle's fixed ones and the overrides differ
    # (foreground "auto" is settled to "off" and synthetic_anomalies "auto" to texture for 2D images, as
    # `multiad train` records them)
    expected = RunConfig(dataset_dir=str(industrial["data"]), layout="mvtec", in_channels=3, device="cpu",
                         foreground="off", synthetic_anomalies=["texture"], **TINY)
    assert json.loads((run / "config.json").read_text()) == json.loads(json.dumps(expected.to_dict()))
    # batch_size 8 is the global batch: 11 training images, 6 per rank, 4 per step -> 2 steps on each rank
    summary = json.loads((run / "metrics.json").read_text())["training"]
    assert summary["iterations"] == 2 and summary["epochs"] == 1  # the top-level --epochs 1 took effect
    assert summary["best_checkpoint"] == best.name
    assert "val_loss" in industrial["train"].stdout + industrial["train"].stderr

    # evaluate.json's top-level --output_dir takes effect (its default is bundle_root/eval)
    proc = bundle("multiad_industrial", "run", "--config_file", "configs/evaluate.json",
                  "--bundle_root", "bundle_root", "--device", "cpu", "--output_dir", "evaluated", cwd=industrial["cwd"])
    evaluated_dir = industrial["cwd"] / "evaluated"
    assert not (industrial["root"] / "eval" / "metrics.json").exists()
    metrics = json.loads((evaluated_dir / "metrics.json").read_text())["evaluation"]
    assert metrics["num_images"] == 8 and metrics["num_anomalous"] == 4
    # the run's model on the test images, scored here; scikit-learn and the exact AUPRO, not the metrics code
    reference = recompute_evaluation(run)
    assert_evaluation_matches(metrics, reference)
    evaluated = _scores_csv(evaluated_dir / "scores.csv")
    assert evaluated.keys() == reference["scores"].keys()
    for path, score in evaluated.items():
        assert score == pytest.approx(reference["scores"][path], rel=1e-5, abs=1e-9), path  # float32, another process
    assert "image_auroc" in proc.stdout and (evaluated_dir / "contact_sheet.png").is_file()

    # and predict.json's (default bundle_root/eval/predictions)
    out = industrial["cwd"] / "predicted"
    bundle("multiad_industrial", "run", "--config_file", "configs/predict.json", "--bundle_root",
           "bundle_root", "--dataset_dir", "bottle", "--device", "cpu", "--output_dir", "predicted",
           cwd=industrial["cwd"])
    assert not (industrial["root"] / "eval" / "predictions").exists()
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 8 and all(Path(p["overlay"]).is_file() for p in predictions)
    # inference scores each image as evaluation did, and flags it against the run's fitted threshold
    threshold = json.loads((run / "metrics.json").read_text())["training"]["fusion"]["threshold"]
    cwd = industrial["cwd"]  # paths in both files are as the bundle commands, run from there, wrote them
    by_path = {(cwd / k).resolve(): v for k, v in evaluated.items()}
    assert {(cwd / p["path"]).resolve() for p in predictions} == by_path.keys()
    for p in predictions:
        assert p["score"] == pytest.approx(by_path[(cwd / p["path"]).resolve()], rel=1e-5, abs=1e-7), p["path"]
        assert p["threshold"] == threshold and p["anomalous"] is (p["score"] > threshold)


def test_evaluate_json_shows_the_evaluator(industrial):
    """evaluate.json instantiates the test evaluator, its metrics and its score collector as objects (as
    `multiad evaluate` builds them); without masks the pixel metrics are left out by ``_disabled_``."""
    from monai.bundle import ConfigParser

    from monai_multiad.engines.evaluator import MultiADEvaluator
    from monai_multiad.handlers import ScoreRows

    def parsed(**overrides):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / "multiad_industrial" / "configs" / "evaluate.json"))
        parser.update({"bundle_root": str(industrial["root"]), "device": "cpu", **overrides})
        return parser

    parser = parsed()
    evaluator = parser.get_parsed_content("evaluator")
    assert isinstance(evaluator, MultiADEvaluator) and len(evaluator.data_loader.dataset) == 8
    assert set(parser.get_parsed_content("additional_metrics")) == {"f1", "pixel_auroc", "aupro"}
    assert isinstance(parser.get_parsed_content("score_rows"), ScoreRows)
    assert set(parsed(pixel_metrics=False).get_parsed_content("additional_metrics")) == {"f1"}


def test_industrial_network_def_io_and_ckpt_export(industrial, tmp_path):
    # verify_net_in_out with the README's arguments: the default network at the metadata's 256 px
    from monai.bundle import verify_net_in_out

    configs = BUNDLES / "multiad_industrial" / "configs"
    verify_net_in_out(net_id="network_def", meta_file=str(configs / "metadata.json"),
                      config_file=str(configs / "inference.json"), device="cpu")

    from monai.bundle import ckpt_export

    from monai_multiad.workflow import load_model

    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(_state_dict_file(industrial["run"], tmp_path / "s.pt")),
                meta_file=str(configs / "metadata.json"), config_file=str(configs / "inference.json"),
                use_trace=True, input_shape=[1, 3, 64, 64], **{"run_config#backbone": "resnet18"})
    model = load_model(industrial["run"])[0]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)[0]
        got = torch.jit.load(str(ts))(x)
    assert got.shape == expected.shape == (2, 1, 64, 64)
    assert float((got - expected).abs().max()) < 1e-4

    # a state dict from another network: one line naming what does not fit and the options to pass
    with pytest.raises(WeightsError, match=r"unexpected: student\.se\..*built with backbone=resnet18.*--run_config#"):
        ckpt_export(net_id="network_def", filepath=str(tmp_path / "bad.ts"), ckpt_file=str(tmp_path / "s.pt"),
                    meta_file=str(configs / "metadata.json"), config_file=str(configs / "inference.json"),
                    use_trace=True, input_shape=[1, 3, 64, 64],
                    **{"run_config#backbone": "resnet18", "run_config#student_se": False})


# ----------------------------------------------------------------------------- brain
def test_brain_train_evaluate_screen(brain):
    import nibabel as nib

    cfg = json.loads((brain["run"] / "config.json").read_text())
    assert (cfg["layout"], cfg["in_channels"], cfg["modality"]) == ("volumes", 1, "mri")
    assert cfg["slice_axis"] == RunConfig().slice_axis and cfg["sigma"] == RunConfig().sigma  # defaults untouched

    bundle("multiad_brain_mri", "run", "--config_file", "configs/evaluate.json", "--bundle_root", "bundle_root",
           "--device", "cpu", cwd=brain["cwd"])
    metrics = json.loads((brain["root"] / "eval" / "metrics.json").read_text())["evaluation"]
    reference = recompute_evaluation(brain["run"])
    assert metrics["num_anomalous"] == sum(reference["labels"].values()) > 0
    assert metrics["num_images"] == len(reference["labels"])
    assert_evaluation_matches(metrics, reference)
    evaluated = _scores_csv(brain["root"] / "eval" / "scores.csv")
    assert evaluated.keys() == reference["scores"].keys()
    for path, score in evaluated.items():
        assert score == pytest.approx(reference["scores"][path], rel=1e-5, abs=1e-8), path  # float32 sums in another order

    # a top-level option of `multiad screen` (--map-format) given to screen.json takes effect
    proc = bundle("multiad_brain_mri", "run", "--config_file", "configs/screen.json", "--bundle_root",
                  "bundle_root", "--dataset_dir", "volumes", "--device", "cpu", "--map_format", "nii", cwd=brain["cwd"])
    report = json.loads((brain["root"] / "eval" / "screening" / "report.json").read_text())
    assert [r["status"] for r in report] == ["ok"]  # the test case of splits.json only
    assert report[0]["map"].endswith("anomaly_map.nii")
    scan = nib.load(str(brain["data"] / "lesion" / "flair.nii.gz"))
    amap = nib.load(report[0]["map"])
    assert amap.shape == scan.shape and np.allclose(amap.affine, scan.affine)
    assert "score" in proc.stdout


def _brain_parser(data: Path, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "multiad_brain_mri" / "configs" / "train.json"))
    parser.update({"dataset_dir": str(data), "image_size": 48, "in_channels": 1, "device": "cpu", **overrides})
    return parser


def _brain_datasets(data: Path, **overrides):
    parser = _brain_parser(data, **overrides)
    return parser.get_parsed_content("datasets"), parser.get_parsed_content("run_config")


def test_brain_preprocessing_is_the_config_object(brain):
    """The brain bundle's ``preprocessing`` (a ``Compose`` of the project's dictionary transforms in
    train.json) is what cuts the training slices: the same slices as ``multiad train`` by default, and
    an override of one of its transforms' arguments changes them."""
    from monai_multiad.data.datasets import build_datasets

    (train, val), cfg = _brain_datasets(brain["data"])
    ref_train, ref_val = build_datasets(cfg, "train")
    for ours, ref in ((train, ref_train), (val, ref_val)):
        assert len(ours) == len(ref) > 0
        assert all(ours[i]["name"] == ref[i]["name"] and torch.equal(ours[i]["image"], ref[i]["image"])
                   for i in range(len(ref)))
    assert train[0]["image"].shape == (1, 48, 48)
    (smaller, _), _ = _brain_datasets(brain["data"], **{"preprocessing#transforms#2#spatial_size": [32, 32]})
    assert len(smaller) == len(train) and smaller[0]["image"].shape == (1, 32, 32)


def test_industrial_preprocessing_is_the_config_object(industrial):
    """The industrial bundle's ``preprocessing`` (``LoadAnomalyImaged`` in train.json) loads the training
    images: the same items as ``multiad train``'s datasets, and overriding its size changes them."""
    from monai.bundle import ConfigParser

    from monai_multiad.data.datasets import build_datasets

    def parsed(**overrides):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / "multiad_industrial" / "configs" / "train.json"))
        parser.update({"dataset_dir": str(industrial["data"]), "image_size": 48, "device": "cpu", **overrides})
        return parser

    parser = parsed()
    (train, _), cfg = parser.get_parsed_content("datasets"), parser.get_parsed_content("run_config")
    ref_train, _ = build_datasets(cfg, "train")
    assert len(train) == len(ref_train) > 0 and train[0]["image"].shape == (3, 48, 48)
    assert all(torch.equal(train[i]["image"], ref_train[i]["image"]) for i in range(len(ref_train)))
    (small, _) = parsed(**{"preprocessing#image_size": 32}).get_parsed_content("datasets")
    assert small[0]["image"].shape == (3, 32, 32)


def test_learning_rate_schedule_is_a_config_object(brain):
    """``train#lr_scheduler`` in train.json is the schedule the trainer steps: ``None`` for
    ``lr_schedule constant``, warm-up + cosine (a ``LambdaLR`` on ``train#optimizer``) for ``cosine``."""
    tiny = {"backbone": "resnet18", "pretrained": "none", "batch_size": 4}
    assert _brain_parser(brain["data"], **tiny).get_parsed_content("train#trainer").lr_scheduler is None
    parser = _brain_parser(brain["data"], lr_schedule="cosine", **tiny)
    trainer = parser.get_parsed_content("train#trainer")
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert trainer.lr_scheduler is parser.get_parsed_content("train#lr_scheduler")
    assert trainer.lr_scheduler.optimizer is parser.get_parsed_content("train#optimizer")


def test_brain_network_def_io():
    from monai.bundle import verify_net_in_out

    configs = BUNDLES / "multiad_brain_mri" / "configs"
    verify_net_in_out(net_id="network_def", meta_file=str(configs / "metadata.json"),
                      config_file=str(configs / "inference.json"), device="cpu",
                      **{"run_config#backbone": "resnet18"})
    net = anomaly_map_network(run_config(in_channels=1, backbone="resnet18")).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 64, 64)).shape == (1, 1, 64, 64)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_ends_with_one_line(tmp_path):
    proc = bundle("multiad_industrial", "run", "--config_file", "configs/train.json", "--bundle_root", str(tmp_path),
                  check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "multiad bundle: error: no dataset folder given: pass --dataset_dir /path/to/data")

    # the hook the configs install turns a MultiADInputError, also one MONAI wrapped, into that one line
    with pytest.raises(MultiADInputError) as info:
        run_config(epochs="ten")
    wrapped = RuntimeError("Failed to instantiate component 'monai_multiad.bundle_support.run_config'")
    wrapped.__cause__ = info.value
    saved, err = sys.excepthook, io.StringIO()
    try:
        install_error_hook()
        with contextlib.redirect_stderr(err):
            sys.excepthook(RuntimeError, wrapped, None)
    finally:
        sys.excepthook = saved
    assert err.getvalue() == "multiad bundle: error: bundle option run_config: option epochs must be a int, got 'ten'\n"


def test_run_config_checks_like_the_cli(tmp_path):
    assert run_config(student_se="false", epochs=3).student_se is False
    assert run_config().to_dict() == RunConfig().to_dict()
    with pytest.raises(MultiADInputError, match="unknown option"):
        run_config(epoch=3)
    with pytest.raises(MultiADInputError, match="backbone"):
        run_config(backbone="resnet50")
    # a top-level option no config names (a misspelling, or multiad train's dashes) is refused, not ignored
    configs = str(BUNDLES / "multiad_industrial" / "configs" / "train.json")
    with pytest.raises(MultiADInputError, match="--epoch is not an option of this bundle: did you mean --epochs"):
        check_command_line(["run", "--config_file", configs, "--epoch", "10"])
    with pytest.raises(MultiADInputError, match="did you mean --early_stop_patience"):
        check_command_line(["run", "--config_file", configs, "--early-stop-patience", "1"])
    check_command_line(["run", "--config_file", f"['{configs}']", "--dataset_dir", "/x", "--device", "cpu",
                        "--epochs", "3", "--run_config#epochs", "3", "--train#handlers", "[]"])
    # evaluate.json and screen.json: their top-level keys are the options, checked the same way
    evaluate = str(BUNDLES / "multiad_industrial" / "configs" / "evaluate.json")
    check_command_line(["run", "--config_file", evaluate, "--output_dir", "x", "--layout", "mvtec", "--batch_size", "4"])
    with pytest.raises(MultiADInputError, match="--output-dir is not an option of this bundle: did you mean --output_dir"):
        check_command_line(["run", "--config_file", evaluate, "--output-dir", "x"])
    screen = str(BUNDLES / "multiad_brain_mri" / "configs" / "screen.json")
    check_command_line(["run", "--config_file", screen, "--window", "brain", "--rescreen", "true", "--workers", "2"])
    assert flag("True", "rescreen") is True and flag(False, "rescreen") is False
    with pytest.raises(MultiADInputError, match="--rescreen 'maybe': expected true or false"):
        flag("maybe", "rescreen")


def test_resume_checks_the_checkpoint(industrial):
    """The bundle's ``--resume`` goes through the CLI's check (``workflow.resume_or_start`` ->
    ``run_folder.load_training_checkpoint``): another network, a missing file, nothing left to do."""
    from monai_multiad.run_folder import load_training_checkpoint
    from monai_multiad.data.datasets import build_datasets, build_loader
    from monai_multiad.workflow import build_network, build_trainer

    last = next((industrial["run"] / "checkpoints").glob("last_checkpoint_*.pt"))
    cfg = RunConfig(dataset_dir=str(industrial["data"]), **{**TINY, "epochs": 2, "student_se": False})
    loader = build_loader(build_datasets(cfg, "train")[0], cfg, True)
    trainer = build_trainer(cfg, build_network(cfg), loader, torch.device("cpu"))
    with pytest.raises(WeightsError, match="student_se=True"):
        load_training_checkpoint(last, trainer.checkpoint_objects(), {}, cfg)
    with pytest.raises(MultiADInputError, match="not found"):
        load_training_checkpoint(industrial["run"] / "nothing.pt", trainer.checkpoint_objects(), {}, cfg)
    same = RunConfig(dataset_dir=str(industrial["data"]), **TINY)
    with pytest.raises(MultiADInputError, match="1 epoch.s. done.*--epochs"):  # epochs=1: nothing left to do
        load_training_checkpoint(last, build_trainer(same, build_network(same), loader, "cpu").checkpoint_objects(),
                                 {}, same)
