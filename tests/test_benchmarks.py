"""Smoke tests of benchmarks/speed.py, benchmarks/extra_maps_speed.py and benchmarks/accuracy.py on tiny
inputs (CPU, no data needed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_smoke(tmp_path):
    speed = _load("speed")
    out, md = tmp_path / "speed.json", tmp_path / "speed.md"
    speed.main(["--backbones", "resnet18", "--batch-sizes", "1", "--devices", "cpu", "--repeats", "1",
                "--warmup", "0", "--image-size", "64", "--source-size", "96", "--volume-slices", "4",
                "--modes", "pipeline", "volume", "--no-isolate", "--threads", "1", "--out", str(out),
                "--markdown", str(md)])
    report = json.loads(out.read_text())
    assert {"date", "torch", "monai", "torch_threads", "weights", "memory", "image_size"} <= set(report["meta"])
    assert report["meta"]["image_size"] == 64
    (row,) = report["results"]
    assert {"pipeline_images_per_s", "bare_images_per_s", "overhead_ratio", "train_images_per_s",
            "inference_peak_mb", "train_peak_mb", "bare_unfolded_ms", "folding_speedup"} <= set(row), row
    assert row["backbone"] == "resnet18" and row["batch_size"] == 1 and row["device"] == "cpu"
    assert row["pipeline_images_per_s"] > 0 and row["overhead_ratio"] > 0
    assert row["folding_speedup"] == pytest.approx(row["bare_unfolded_ms"] / row["bare_ms"])
    assert "| folding speed-up |" in md.read_text()
    (volume,) = report["volume"]
    assert volume["status"] == "ok" or volume["status"].startswith("skipped"), volume
    assert "| resnet18 | cpu | 1 |" in md.read_text()


def test_extra_maps_speed_times_every_variant(tmp_path):
    rows = _load("extra_maps_speed").main(["--batch-size", "1", "--image-size", "64", "--repeats", "1", "--bank", "32",
                                           "--threads", "1", "--out", str(tmp_path / "extra.json")])
    assert [r["variant"] for r in rows] == ["plain", "bank", "head", "bank+head"]
    assert rows[0]["ratio"] == 1.0 and all(r["ms_per_batch"] > 0 for r in rows)
    assert json.loads((tmp_path / "extra.json").read_text())["rows"] == rows


def test_speed_cohort_mode_times_a_folder_per_worker_count(tmp_path):
    """The cohort mode screens a folder of phantoms with cohort.screen_paths once per worker count
    and sets each end-to-end time against the bare networks on the slices screened."""
    speed = _load("speed")
    out, md = tmp_path / "cohort.json", tmp_path / "cohort.md"
    speed.main(["--modes", "cohort", "--backbones", "resnet18", "--devices", "cpu", "--image-size", "64",
                "--cohort-volumes", "3", "--cohort-slices", "6", "--cohort-workers", "0", "1",
                "--volume-batch-size", "4", "--no-isolate", "--threads", "1", "--out", str(out), "--markdown", str(md)])
    (cohort,) = json.loads(out.read_text())["cohort"]
    assert cohort["status"] == "ok", cohort
    assert cohort["screened_slices"] > 0 and cohort["model_s"] > 0
    assert [r["workers"] for r in cohort["runs"]] == [0, 1]
    assert all(r["end_to_end_s"] > 0 and r["ratio"] == r["end_to_end_s"] / cohort["model_s"] for r in cohort["runs"])
    table = md.read_text()
    assert "| resnet18 | cpu | 3 x 6 (" in table and "| nii.gz | 1 |" in table


def test_speed_training_cost_table(tmp_path):
    """The training-cost mode at a tiny size: every part timed, the whole steps too, and the table written."""
    speed = _load("speed")
    out, md = tmp_path / "cost.json", tmp_path / "cost.md"
    speed.main(["--modes", "train-cost", "--backbones", "resnet18", "--devices", "cpu", "--cost-sizes", "64",
                "--cost-batch-size", "2", "--repeats", "1", "--warmup", "0", "--no-isolate", "--threads", "1",
                "--out", str(out), "--markdown", str(md)])
    report = json.loads(out.read_text())
    assert report["results"] == [] and report["volume"] == [] and report["meta"]["modes"] == ["train-cost"]
    eager, *others = report["train_cost"]
    assert (eager["variant"], eager["status"], eager["image_size"], eager["batch_size"]) == ("eager", "ok", 64, 2)
    for key in (*speed.COST_PARTS, "step_ms", "step_with_discriminator_ms", "step_cached_ms"):
        assert eager[key] > 0, key
    assert eager["cached_speedup"] == pytest.approx(eager["step_ms"] / eager["step_cached_ms"])
    assert 0 < eager["discriminator_share_of_step"] < 1
    assert eager["student_step_ms"] > eager["student_forward_ms"]
    assert [r["variant"] for r in others] == ["channels_last", "compile"]
    assert all(r["status"].startswith("skipped on CPU") for r in others)
    table = md.read_text()
    assert "| teacher fwd | student fwd | student fwd+bwd+step | discriminator |" in table
    assert "| resnet18 | cpu | 64 | 2 | eager |" in table and "| resnet18 | cpu | 64 | 2 | compile |" in table


def test_speed_peer_without_anomalib_is_one_line(monkeypatch, capsys):
    """``--peer`` where anomalib cannot be imported: one line saying so, nothing measured, a normal return
    (exit status 0 from the command line)."""
    speed = _load("speed")
    monkeypatch.setitem(sys.modules, "anomalib", None)  # import anomalib -> ImportError, installed or not
    assert speed.main(["--peer", "--devices", "cpu"]) == {}
    lines = capsys.readouterr().out.splitlines()
    assert lines == [speed.PEER_MISSING] and "anomalib is not installed" in lines[0]


@pytest.mark.slow
def test_accuracy_smoke(tmp_path):
    from monai_multiad.data.synthetic_images import write_mvtec_dataset

    accuracy = _load("accuracy")
    data = write_mvtec_dataset(tmp_path / "data" / "tiles", n_train=16, n_test_good=4, n_test_defect=4, size=64)
    out = tmp_path / "out"
    accuracy.main(["--dataset-dir", str(data), "--out", str(out), "--backbone", "resnet18", "--image-size", "64",
                   "--max-steps", "3", "--epochs", "1", "--device", "cpu"])
    report = json.loads((out / "results.json").read_text())
    (row,) = report["rows"]
    assert row["config"] == "full" and row["category"] == "tiles"
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert 0.0 <= row[key] <= 1.0
    assert {"train_seconds", "device", "seed", "options"} <= set(row)
    assert {"torch", "monai"} <= set(report["meta"]["versions"])
    assert set(report["means"]) == {"full"}
    assert "| tiles |" in (out / "results.md").read_text()


def test_accuracy_finds_categories(tmp_path):
    accuracy = _load("accuracy")
    for name in ("a", "b"):
        (tmp_path / name / "train").mkdir(parents=True)
        (tmp_path / name / "test").mkdir()
    (tmp_path / "notes").mkdir()
    assert list(accuracy.find_categories(tmp_path)) == ["a", "b"]
    assert list(accuracy.find_categories(tmp_path, ["b"])) == ["b"]
    assert list(accuracy.find_categories(tmp_path / "a")) == ["a"]
    with pytest.raises(SystemExit):
        accuracy.find_categories(tmp_path, ["c"])
