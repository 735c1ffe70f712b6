"""Training, evaluation and prediction end to end, through the Python API and the CLI."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from monai_multiad.cli import main
from monai_multiad.config import RunConfig
from monai_multiad.data.synthetic_images import write_mvtec_dataset
from monai_multiad.errors import MultiADInputError
from monai_multiad.data.datasets import build_datasets
from monai_multiad.workflow import load_model, train

from _reference import assert_evaluation_matches, recompute_evaluation

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY = ["--image-size", "64", "--batch-size", "8", "--early-stop-patience", "0", "--discriminator-channels", "16", "32",
        "--device", "cpu", "--val-fraction", "0.2"]


@pytest.fixture(scope="module")
def textures(tmp_path_factory) -> Path:
    return write_mvtec_dataset(tmp_path_factory.mktemp("data") / "tex", n_train=24, n_test_good=6, n_test_defect=6,
                               size=64, channels=3, seed=0)


@pytest.fixture(scope="module")
def trained_run(textures, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", str(textures), "--run-dir", str(run), "--epochs", "2", *TINY]) == 0
    return run


def test_student_trained_on_normals_scores_planted_defects_higher(textures, tmp_path):
    """A few dozen steps of distillation on normal textures: defects score above normals."""
    cfg = RunConfig(dataset_dir=str(textures), image_size=64, batch_size=8, epochs=20, max_steps=36,
                    early_stop_patience=0, discriminator_channels=(16, 32), device="cpu", val_fraction=0.2)
    train(cfg, tmp_path / "run", progress=False)
    model, _, _ = load_model(tmp_path / "run")
    from monai_multiad.data.images import AnomalyImageDataset, samples_for

    ds = AnomalyImageDataset(samples_for(textures, "test"), image_size=64)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    labels = np.array([ds[i]["label"] for i in range(len(ds))])
    with torch.no_grad():
        amap, scores = model(images)
    assert scores[labels == 1].mean() > scores[labels == 0].mean()
    assert roc_auc_score(labels, scores.numpy()) >= 0.8
    # the map is hottest on the defect: mean map inside the masks beats outside
    masks = torch.stack([ds[i]["mask"] for i in range(len(ds))]) > 0.5
    assert float(amap[masks].mean()) > float(amap[~masks].mean())


def test_run_folder_contents(trained_run):
    for name in ("config.json", "model.pt", "log.csv", "metrics.json"):
        assert (trained_run / name).is_file(), name
    assert list((trained_run / "checkpoints").glob("last_checkpoint_*.pt"))
    assert list((trained_run / "checkpoints").glob("best_checkpoint_*.pt"))
    summary = json.loads((trained_run / "metrics.json").read_text())["training"]
    assert summary["epochs"] == 2 and summary["fusion"]["threshold"] > 0
    # the defaults' extra maps: a memory bank filled from the normals (fewer positions than its 4096
    # entries here) and a segmentation head trained for no more iterations than the student
    assert 0 < summary["memory_bank"] <= 4096 and isinstance(summary["segmentation_head_loss"], float)
    assert summary["segmentation_head_iterations"] == min(300, summary["iterations"])
    model, cfg, fusion = load_model(trained_run)
    assert cfg.image_size == 64 and model.fusion.fitted
    assert torch.allclose(model.fusion.scale, torch.tensor(fusion["stage_scale"]))


def test_evaluate_metrics_match_sklearn(trained_run, tmp_path):
    """metrics.json and scores.csv against the run's model on the test images, scored here, and
    scikit-learn (AUROCs, F1-max) or the exact sort-based AUPRO: not the package's metrics code."""
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(trained_run), "--out", str(out), "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["evaluation"]
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 12
    labels = [int(r["label"]) for r in rows]
    scores = [float(r["score"]) for r in rows]
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    reference = recompute_evaluation(trained_run)
    assert_evaluation_matches(metrics, reference)
    assert {r["path"]: int(r["label"]) for r in rows} == reference["labels"]
    for r in rows:
        assert float(r["score"]) == pytest.approx(reference["scores"][r["path"]], rel=1e-5, abs=1e-9), r["path"]
    assert 0.0 < metrics["pixel_auroc"] < 1.0 and 0.0 < metrics["aupro"] < 1.0  # not a degenerate case
    assert (out / "contact_sheet.png").stat().st_size > 0


def test_fusion_is_fitted_on_the_validation_normals(trained_run):
    """The decision threshold is the documented quantile (threshold_quantile, 0.99 by default) of the
    validation normals' image scores, and each stage's offset and scale the mean and standard deviation
    of its map over their pixels (map_normalization "zscore", the default), recomputed here with the saved model."""
    model, cfg, fusion = load_model(trained_run)
    assert cfg.threshold_quantile == fusion["threshold_quantile"] == RunConfig().threshold_quantile == 0.99
    assert cfg.map_normalization == fusion["normalization"] == RunConfig().map_normalization == "zscore"
    train_ds, val_ds = build_datasets(cfg, "train")
    assert not {s["image"] for s in train_ds.samples} & {s["image"] for s in val_ds.samples}
    images = torch.stack([val_ds[i]["image"] for i in range(len(val_ds))])
    with torch.no_grad():
        scores = torch.cat([model(images[i:i + cfg.batch_size])[1] for i in range(0, len(images), cfg.batch_size)])
        maps = model.stage_maps(images).double()
    assert fusion["num_images"] == len(val_ds) == len(scores) > 1
    expected = float(np.quantile(scores.numpy().astype(np.float64), 0.99))
    assert fusion["threshold"] == pytest.approx(expected, rel=1e-6)
    assert float(model.fusion.threshold) == pytest.approx(expected, rel=1e-6)
    assert float(scores.max()) >= fusion["threshold"] > float(np.quantile(scores.numpy(), 0.5))
    assert fusion["stage_offset"] == pytest.approx(maps.mean(dim=(0, 2, 3)).tolist(), rel=1e-5)
    assert fusion["stage_scale"] == pytest.approx(maps.std(dim=(0, 2, 3), unbiased=False).tolist(), rel=1e-4)
    summary = json.loads((trained_run / "metrics.json").read_text())["training"]
    assert summary["fusion"]["threshold"] == fusion["threshold"]


def test_predict_writes_overlays_at_original_size(trained_run, textures, tmp_path):
    from PIL import Image

    big = tmp_path / "in" / "big.png"
    big.parent.mkdir()
    Image.open(next((textures / "test" / "good").glob("*.png"))).resize((90, 70)).save(big)
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "pred"
    code = main(["predict", str(tmp_path / "in"), "--run", str(trained_run), "--out", str(out), "--device", "cpu"])
    assert code == 1  # one image failed, the other was still scored
    results = {Path(r["path"]).name: r for r in json.loads((out / "predictions.json").read_text())}
    assert "broken.png" in results["broken.png"]["error"]
    assert Image.open(results["big.png"]["overlay"]).size == (90, 70)
    big = results["big.png"]
    threshold = load_model(trained_run)[2]["threshold"]
    assert big["threshold"] == threshold and np.isfinite(threshold)
    assert big["anomalous"] is (big["score"] > threshold)


@pytest.mark.parametrize("size", [64, 96])  # 64: the training size; 96: resized on the way in by both
def test_predict_scores_an_image_as_evaluate_does(trained_run, textures, tmp_path, size):
    data = textures if size == 64 else write_mvtec_dataset(tmp_path / "tex96", n_train=1, n_test_good=3,
                                                           n_test_defect=3, size=size, channels=3, seed=1)
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(trained_run), "--dataset-dir", str(data), "--out", str(out),
                 "--device", "cpu"]) == 0
    evaluated = {Path(r["path"]).resolve(): float(r["score"]) for r in csv.DictReader((out / "scores.csv").open())}
    folders = [str(d) for d in sorted((data / "test").iterdir())]  # good/, blob/, scratch/
    assert main(["predict", *folders, "--run", str(trained_run), "--out", str(tmp_path / "pred"),
                 "--device", "cpu"]) == 0
    predicted = {Path(r["path"]).resolve(): r for r in json.loads((tmp_path / "pred" / "predictions.json").read_text())}
    assert predicted.keys() == evaluated.keys() and len(evaluated) >= 6
    threshold = load_model(trained_run)[2]["threshold"]
    for path, score in evaluated.items():
        assert predicted[path]["score"] == pytest.approx(score, rel=1e-5, abs=1e-7), path
        assert predicted[path]["anomalous"] is (predicted[path]["score"] > threshold)


def test_resume_continues_from_last_epoch(textures, trained_run, tmp_path):
    run = tmp_path / "resumed"
    assert main(["train", str(textures), "--run-dir", str(run), "--epochs", "3", "--resume", str(trained_run), *TINY]) == 0
    log = list(csv.DictReader((run / "log.csv").open()))
    # the log goes on from the resumed run's (its epochs 1-2 copied), then the epoch trained here
    assert [int(r["epoch"]) for r in log] == [1, 2, 3]
    before = list(csv.DictReader((trained_run / "log.csv").open()))
    assert [float(r["val_loss"]) for r in log[:2]] == pytest.approx([float(r["val_loss"]) for r in before])
    assert json.loads((run / "metrics.json").read_text())["training"]["epochs"] == 3


def test_resume_from_another_backbone_is_a_clear_error(textures, trained_run, tmp_path, capsys):
    code = main(["train", str(textures), "--run-dir", str(tmp_path / "r"), "--resume", str(trained_run),
                 "--backbone", "resnet18", "--pretrained", "none", *TINY])
    assert code == 2
    err = capsys.readouterr().err
    assert "last_checkpoint" in err and "backbone" in err


@pytest.mark.parametrize("make, expect", [
    (lambda p: p / "missing", "not found"),
    (lambda p: p, "layout"),
])
def test_bad_dataset_folder(tmp_path, capsys, make, expect):
    (tmp_path / "something.txt").write_text("x")
    code = main(["train", str(make(tmp_path)), "--run-dir", str(tmp_path / "run"), *TINY])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("multiad: error:") and str(tmp_path) in err and expect in err.lower()
    assert len(err.splitlines()) == 1


def test_config_errors_name_the_option():
    with pytest.raises(MultiADInputError, match="backbone"):
        RunConfig(backbone="vgg")
    with pytest.raises(MultiADInputError, match="epochs"):
        RunConfig.from_dict({"epochs": "ten"})
    with pytest.raises(MultiADInputError, match="unknown option"):
        RunConfig.from_dict({"epoch": 3})


def test_load_model_rejects_other_files(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(MultiADInputError, match="model.pt"):
        load_model(tmp_path)
    with pytest.raises(MultiADInputError, match="no trained model"):
        load_model(tmp_path / "nothing")


def test_every_train_option_is_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for f in RunConfig.__dataclass_fields__:
        if f != "dataset_dir":
            assert "--" + f.replace("_", "-") in text, f


@pytest.mark.skipif(not (SHARED_DATA / "magnetic_tile").is_dir(), reason=f"{SHARED_DATA / 'magnetic_tile'} absent")
def test_magnetic_tile_brief_training_beats_chance(tmp_path):
    """Real defects: a short run on a subset of ../shared/data/magnetic_tile (linked, not copied)."""
    src = SHARED_DATA / "magnetic_tile"
    root = tmp_path / "mt"
    rng = np.random.default_rng(0)
    picks = {"train/good": 48, "test/good": 24}
    for defect in ("blowhole", "break", "crack", "fray", "uneven"):
        picks[f"test/{defect}"] = 6
    for sub, n in picks.items():
        files = sorted((src / sub).glob("*.jpg"))
        (root / sub).mkdir(parents=True)
        for f in rng.choice(files, size=min(n, len(files)), replace=False):
            os.symlink(f, root / sub / f.name)
            if sub.startswith("test/") and not sub.endswith("good"):
                gt = src / "ground_truth" / sub[5:] / f"{f.stem}_mask.png"
                (root / "ground_truth" / sub[5:]).mkdir(parents=True, exist_ok=True)
                os.symlink(gt, root / "ground_truth" / sub[5:] / gt.name)
    cfg = RunConfig(dataset_dir=str(root), image_size=128, in_channels=1, batch_size=8, epochs=20, max_steps=40,
                    early_stop_patience=0, discriminator_channels=(32, 64), device="cpu", val_fraction=0.15)
    train(cfg, tmp_path / "run", progress=False)
    from monai_multiad.inference import evaluate

    metrics = evaluate(tmp_path / "run", device="cpu")
    assert metrics["image_auroc"] > 0.65, metrics


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_training_finishes_from_best_epoch(textures, tmp_path, monkeypatch, how):
    """Ctrl-C (KeyboardInterrupt) or SIGTERM (a scheduler's time limit) in epoch 3: model.pt holds the
    student of the best completed epoch by validation loss, here epoch 1 (epoch 2's loss is made
    worse), not the last one, and the fusion is fitted."""
    import signal

    import monai_multiad.workflow as workflow
    from monai_multiad.engines.trainer import MultiADTrainer

    original = MultiADTrainer._iteration

    def interrupt_in_third_epoch(self, engine, batch):
        if engine.state.epoch == 3:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "train() installs no SIGTERM handler"
            os.kill(os.getpid(), signal.SIGTERM)  # train()'s handler raises KeyboardInterrupt here
            pytest.fail("SIGTERM did not interrupt training")
        return original(self, engine, batch)

    real_metric = workflow.distillation_loss_metric
    made_up = iter([1.0, 2.0])  # epoch 1 best, epoch 2 worse

    def validation_loss_of_epoch():
        metric = real_metric()
        metric.compute = lambda: next(made_up)  # the evaluator's key metric, as Ignite computes it
        return metric

    monkeypatch.setattr(MultiADTrainer, "_iteration", interrupt_in_third_epoch)
    monkeypatch.setattr(workflow, "distillation_loss_metric", validation_loss_of_epoch)
    cfg = RunConfig(dataset_dir=str(textures), image_size=64, batch_size=8, epochs=5, early_stop_patience=0,
                    discriminator_channels=(16,), device="cpu", val_fraction=0.2)
    run = tmp_path / "run"
    summary = train(cfg, run, progress=False)
    assert summary["interrupted"] and summary["epochs"] == 3 and summary["best_val_loss"] == 1.0
    assert [float(r["val_loss"]) for r in csv.DictReader((run / "log.csv").open())] == [1.0, 2.0]
    (best,) = (run / "checkpoints").glob("best_checkpoint_*.pt")
    assert best.name.startswith("best_checkpoint_1_")  # epoch 1
    (last,) = (run / "checkpoints").glob("last_checkpoint_*.pt")
    best_state = torch.load(best, weights_only=True)
    best_student = best_state.get("student", best_state)  # Ignite saves a lone object's state dict bare
    last_student = torch.load(last, weights_only=True)["student"]
    saved = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    saved_student = {k[len("student."):]: v for k, v in saved.items() if k.startswith("student.")}
    assert saved_student.keys() == best_student.keys() and len(best_student) > 0
    for k, v in best_student.items():
        assert torch.equal(saved_student[k], v), k
    assert any(not torch.equal(saved_student[k], v) for k, v in last_student.items())  # epoch 2 trained on
    model, _, _ = load_model(run)
    assert model.fusion.fitted


def test_a_non_finite_loss_ends_training_with_the_iteration_named(textures, tmp_path, monkeypatch):
    """The trainer's step refuses a non-finite loss before any update or handler (hence no TerminateOnNan)."""
    from monai_multiad.losses import DistillationLoss

    monkeypatch.setattr(DistillationLoss, "forward", lambda self, teacher, student: torch.tensor(float("nan")))
    cfg = RunConfig(dataset_dir=str(textures), image_size=64, batch_size=8, epochs=1, early_stop_patience=0,
                    discriminator_channels=(16,), device="cpu", val_fraction=0.2)
    with pytest.raises(FloatingPointError, match="training loss became nan at iteration 1"):
        train(cfg, tmp_path / "run", progress=False)
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))


def test_foreground_auto_is_settled_by_the_detected_layout(textures, tmp_path):
    """``foreground auto``: on for a volume folder (NIfTI files, or a splits.json), off for 2D images,
    as data.images.detect_layout finds the layout."""
    from monai_multiad.workflow import resolve_options

    volumes = tmp_path / "volumes"
    (volumes / "case_1").mkdir(parents=True)
    (volumes / "case_1" / "flair.nii.gz").write_bytes(b"")
    assert resolve_options(RunConfig(dataset_dir=str(volumes))).foreground == "on"
    assert resolve_options(RunConfig(dataset_dir=str(textures))).foreground == "off"
    with pytest.raises(MultiADInputError, match="not found"):
        resolve_options(RunConfig(dataset_dir=str(tmp_path / "missing")))
