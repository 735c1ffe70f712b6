"""The package as a user installs and meets it: ``multiad --version``, ``python -m monai_multiad``,
``multiad bundle list | path`` (the MONAI bundles ship inside the package), ``multiad export`` of a
tiny trained run checked against the model, YAML configurations and ``--print-config`` read back to
the same configuration, ``train --run``, the help's option groups; the bundles' metadata pinned to
this version; and (slow) a wheel built from the checkout holding the bundles and the licence.
Commands run as subprocesses from a temporary working folder with relative paths, like a user's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import monai_multiad
from conftest import copy_work, multiad_command, write_textures
from monai_multiad import cli
from monai_multiad.config import RunConfig, field_sections

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
NAMES = ("multiad_brain_mri", "multiad_industrial")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# a tiny run: 64 px, ResNet-18 without downloaded weights, one epoch of 2 steps on 10 images
TINY = ["--image-size", "64", "--batch-size", "8", "--epochs", "1", "--backbone", "resnet18", "--pretrained", "none",
        "--discriminator-channels", "16", "32", "--early-stop-patience", "0", "--val-fraction", "0.2",
        "--device", "cpu"]


def run(cwd: Path, *args: str, code: int = 0, module: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", *args] if module else [*multiad_command(), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)
    if proc.returncode != code:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}, expected {code}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs tomllib (Python 3.11+)")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("multiad: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- version
def test_version_is_the_one_in_pyproject(tmp_path):
    from importlib.metadata import version

    wanted = _pyproject()["project"]["version"]
    assert monai_multiad.__version__ == version("monai-multiad") == wanted
    assert run(tmp_path, "--version").stdout == f"multiad {wanted}\n"  # no command needed
    assert run(tmp_path, "monai_multiad", "--version", module=True).stdout == f"multiad {wanted}\n"


@pytest.mark.parametrize("name", NAMES)
def test_bundle_metadata_pins_this_version(name):
    meta = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())
    assert meta["required_packages_version"]["monai-multiad"] == monai_multiad.__version__
    assert meta["version"] in meta["changelog"]
    newest = max(meta["changelog"], key=lambda v: tuple(int(p) for p in v.split(".")))
    assert meta["version"] == newest
    # MONAI's bundle specification: value_range is [MIN, MAX], or [] where there is no bound
    for kind in ("inputs", "outputs"):
        for tensor in meta["network_data_format"][kind].values():
            value_range = tensor["value_range"]
            assert value_range == [] or (len(value_range) == 2 and value_range[0] < value_range[1]), value_range
    assert meta["network_data_format"]["inputs"]["image"]["value_range"] == [0, 1]
    metrics = meta["eval_metrics"]
    assert metrics and all(0.5 < v <= 1.0 for v in metrics.values()), metrics  # fractions, above chance


# ----------------------------------------------------------------------------- packaging
def _tracked(folder: str) -> list[Path]:
    """The files under ``folder`` that git tracks (outside a git checkout: those that exist)."""
    try:
        out = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True)
        return [Path(p) for p in out.stdout.split()]
    except (OSError, subprocess.CalledProcessError):
        return [p.relative_to(ROOT) for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]


def test_every_package_is_in_pyproject():
    """pyproject.toml lists its packages (to map monai_multiad.bundles to bundles/): every package folder
    of monai_multiad/ and every folder of bundles/ that git tracks must be there, so that wheels carry them."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.parts) for p in _tracked("monai_multiad") if p.name == "__init__.py"}
    found |= {".".join(("monai_multiad", *p.parent.parts)) for p in _tracked("bundles")}
    missing = sorted(found - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    assert _pyproject()["tool"]["setuptools"]["package-dir"] == {"monai_multiad.bundles": "bundles"}


def test_bundle_list_and_path(tmp_path, monkeypatch, capsys):
    folders = {}
    for name in NAMES:  # as a shell's $(multiad bundle path brain_mri) runs it
        folder = Path(run(tmp_path, "bundle", "path", name.removeprefix("multiad_")).stdout.strip())
        assert folder.is_absolute() and folder.name == name
        files = [p.relative_to(Path("bundles") / name) for p in _tracked(f"bundles/{name}")]
        assert {"configs/metadata.json", "configs/train.json", "docs/README.md", "LICENSE"} <= set(map(str, files))
        for rel in files:  # every file of the bundle, as in the repository
            assert (folder / rel).read_bytes() == (BUNDLES / name / rel).read_bytes(), rel
        assert (folder.parent / "schema" / "meta_schema_20240725.json").is_file()
        folders[name] = folder
    proc = run(tmp_path, "monai_multiad.bundles", "path", "industrial", module=True)  # without PyTorch: quick
    assert proc.stdout == f"{folders['multiad_industrial']}\n"
    listing = run(tmp_path, "monai_multiad.bundles", "list", module=True).stdout.splitlines()
    assert [line.split()[0] for line in listing] == list(NAMES)
    for line, name in zip(listing, NAMES):
        version = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())["version"]
        assert line.split()[1:] == [version, str(folders[name])]
    _one_line_error(run(tmp_path, "bundle", "path", "lungs", code=2), "no bundle named 'lungs'",
                    "brain_mri, industrial")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written

    # the same answers in-process: the full name, `multiad bundle list`
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bundle", "path", "multiad_brain_mri"]) == 0
    assert capsys.readouterr().out == f"{folders['multiad_brain_mri']}\n"
    assert cli.main(["bundle", "list"]) == 0
    assert capsys.readouterr().out.splitlines() == listing


# ----------------------------------------------------------------------------- configuration files
def test_yaml_config_round_trip(tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    yaml_text = run(tmp_path, "train", "data", *TINY, "--lr", "3e-4", "--stages", "2", "3", "--foreground", "on",
                    "--print-config").stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # printing trains nothing, writes nothing
    assert [line for line in yaml_text.splitlines() if line.startswith("#")] == ["# data", "# model", "# training"]
    (tmp_path / "run.yaml").write_text(yaml_text)
    cfg = RunConfig.load(tmp_path / "run.yaml")
    every = {f for names in field_sections().values() for f in names}
    assert every == set(RunConfig().to_dict()) and all(re.search(rf"^{f}: ", yaml_text, re.M) for f in every)
    assert (cfg.dataset_dir, cfg.image_size, cfg.backbone, cfg.lr, cfg.stages, cfg.foreground) == (
        "data", 64, "resnet18", 3e-4, [2, 3], "on")
    assert cfg.epochs == 1 and cfg.memory_bank == RunConfig().memory_bank  # given, and default
    # read back, printed again: the same text; as JSON too
    assert run(tmp_path, "train", "--config", "run.yaml", "--print-config").stdout == yaml_text
    json_text = run(tmp_path, "train", "--config", "run.yaml", "--print-config", "--print-format", "json").stdout
    assert json.loads(json_text) == cfg.to_dict()
    (tmp_path / "run.json").write_text(json_text)
    monkeypatch.chdir(tmp_path)  # the rest in-process: the same main()
    assert cli.main(["train", "--config", "run.json", "--print-config"]) == 0
    assert capsys.readouterr().out == yaml_text
    # the command line overrides the file
    assert cli.main(["train", "--config", "run.yaml", "--epochs", "3", "--print-config"]) == 0
    assert capsys.readouterr().out == RunConfig.from_dict({**cfg.to_dict(), "epochs": 3}).dumps()

    # a file a person writes: YAML 1.2 numbers (1e-3), yes/no and on/off as the command line takes them
    (tmp_path / "mine.yml").write_text("dataset_dir: data\nlr: 1e-3\nstudent_se: no\nforeground: off\n"
                                       "discriminator_channels: [16, 32]\n")
    mine = RunConfig.load(tmp_path / "mine.yml")
    assert (mine.lr, mine.student_se, mine.foreground, mine.discriminator_channels) == (1e-3, False, "off", [16, 32])

    # bad files: one line naming the file and what is wrong, exit status 2
    for text, problem in (("lr: [1\n", "not valid YAML at line 2"), ("- 1\n- 2\n", "expected a mapping"),
                          ("epoch: 3\n", "unknown option(s) epoch"), ("epochs: ten\n", "option epochs must be")):
        (tmp_path / "bad.yaml").write_text(text)
        assert cli.main(["train", "--config", "bad.yaml", "--print-config"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("multiad: error: bad.yaml: ") and problem in err and err.count("\n") == 1, err


def test_train_help_groups_and_run_alias(tmp_path, monkeypatch, capsys):
    text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    heads = ["configuration file:", "data options:", "model options:", "training options:", "output:"]
    at = [text.index("\n" + h) for h in heads]
    assert at == sorted(at)
    for option, head in (("--image-size", 1), ("--backbone", 2), ("--memory-bank", 2), ("--epochs", 3),
                         ("--resume", 3), ("--run-dir", 4), ("--print-config", 0)):
        where = text.index("\n  " + option)
        assert at[head] < where < (at[head + 1] if head + 1 < len(at) else len(text)), option
    args = cli.build_parser().parse_args(["train", "data", "--run", "runs/x"])
    assert args.run_dir == "runs/x" == cli.build_parser().parse_args(["train", "data", "--run-dir", "runs/x"]).run_dir
    # the dataset may come from --config, so both are checked after the file is read: one line each
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train"]) == 2
    assert capsys.readouterr().err == ("multiad: error: no dataset folder given: pass DATASET_DIR, or a --config "
                                       "file with dataset_dir\n")
    assert cli.main(["train", "data"]) == 2
    assert capsys.readouterr().err == "multiad: error: no run folder given: pass --run-dir FOLDER (or --run FOLDER)\n"
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def work(tiny_texture_run, tmp_path_factory) -> Path:
    """A working folder with ``data/tex`` and ``runs/tex`` trained there by ``multiad train data/tex --run-dir
    runs/tex`` (the defaults' memory bank and segmentation head included; a copy of the suite's shared run)."""
    return copy_work(tiny_texture_run, tmp_path_factory.mktemp("export") / "work")


def _model(run_dir: Path):
    from monai_multiad.run_folder import load_model

    return load_model(run_dir, "cpu")[0]


def _reference(model, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        amap, score = model(x)
    return x, amap, score


def test_export_torchscript_journey(work):
    proc = run(work, "export", "--run", "runs/tex", "--format", "torchscript", "--out", "exported/model.ts")
    assert "wrote exported/model.ts (torchscript)" in proc.stdout and "largest difference" in proc.stdout
    assert sorted(p.name for p in (work / "exported").iterdir()) == ["model.ts"]  # no temporary file left
    model = _model(work / "runs" / "tex")
    assert model.memory_bank is not None and model.segmentation_head is not None  # the defaults' maps, exported
    ts = torch.jit.load(str(work / "exported" / "model.ts"))
    for batch in (1, 4):
        x, amap, score = _reference(model, batch)
        with torch.no_grad():
            got_map, got_score = ts(x)
        assert got_map.shape == (batch, 1, 64, 64) and got_score.shape == (batch,)
        assert float((got_map - amap).abs().max()) < 1e-4 and float((got_score - score).abs().max()) < 1e-4


def test_export_bad_input_is_one_line(work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    assert cli.main(["export", "--run", "runs/none", "--out", "x.ts"]) == 2
    assert capsys.readouterr().err == "multiad: error: runs/none: no trained model here (expected a run folder " \
                                      "written by 'multiad train')\n"
    assert cli.main(["export", "--run", "runs/tex", "--out", "runs"]) == 2
    assert capsys.readouterr().err == "multiad: error: runs: is a folder: --out names the file to write\n"
    assert not (work / "x.ts").exists()


def test_export_onnx_journey(work):
    pytest.importorskip("onnx", reason="ONNX export needs the optional package onnx: pip install "
                        "'monai-multiad[onnx]'")
    ort = pytest.importorskip("onnxruntime", reason="checking the ONNX file needs the optional package "
                              "onnxruntime: pip install 'monai-multiad[onnx]'")
    # the defaults' model, memory bank included: its search is one block in an exported graph, so the file
    # runs at any batch size (the check runs it at another than the traced one)
    proc = run(work, "export", "--run", "runs/tex", "--out", "exported/tex.onnx")  # format from the name
    assert "wrote exported/tex.onnx (onnx)" in proc.stdout
    model = _model(work / "runs" / "tex")
    assert model.memory_bank is not None
    session = ort.InferenceSession(str(work / "exported" / "tex.onnx"), providers=["CPUExecutionProvider"])
    x, amap, score = _reference(model, 3)
    got_map, got_score = session.run(None, {"image": x.numpy()})
    assert abs(got_map - amap.numpy()).max() < 1e-4 and abs(got_score - score.numpy()).max() < 1e-4


def test_export_refuses_a_mismatch_and_a_missing_extra(work, monkeypatch, capsys):
    """The parity check compares the exported graph with the model it was exported from: another model is
    refused; the CLI then writes nothing and exits 1. A missing ONNX package is named with its extra."""
    from monai_multiad.export import ExportMismatchError, check_export, export_torchscript

    model = _model(work / "runs" / "tex")
    path = export_torchscript(model, work / "alone.ts", image_size=64)
    assert check_export(model, path, "torchscript", image_size=64) < 1e-4
    other = _model(work / "runs" / "tex")
    with torch.no_grad():
        other.fusion.scale.mul_(2.0)  # another model: its maps are twice as large
    with pytest.raises(ExportMismatchError, match="differs from the model's"):
        check_export(other, path, "torchscript", image_size=64)

    import monai_multiad.export as export

    def mismatch(*args, **kwargs):
        raise ExportMismatchError("the exported anomaly map differs from the model's by up to 1")

    monkeypatch.chdir(work)
    monkeypatch.setattr(export, "check_export", mismatch)
    assert cli.main(["export", "--run", "runs/tex", "--out", "refused/model.ts"]) == 1
    err = capsys.readouterr().err
    assert err == "multiad: error: refused/model.ts: the exported anomaly map differs from the model's by up to 1; " \
                  "nothing was written\n"
    assert list((work / "refused").iterdir()) == []  # the temporary file is gone too

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert cli.main(["export", "--run", "runs/tex", "--out", "refused/model.onnx"]) == 2
    assert capsys.readouterr().err == ("multiad: error: --format onnx needs the package(s) onnxruntime: "
                                       "pip install 'monai-multiad[onnx]'\n")


# ----------------------------------------------------------------------------- the wheel
@pytest.mark.slow
def test_wheel_carries_the_bundles_and_licence(tmp_path):
    """``pip wheel`` of the checkout (no build isolation: the setuptools installed here) holds every package,
    the bundles' configs, docs, LICENSE files and MONAI's metadata schema, and the licence."""
    import setuptools

    if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (77, 0):
        pytest.skip(f"building the wheel needs setuptools>=77 (an SPDX license), found {setuptools.__version__}")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600, env=ENV,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "license" not in proc.stderr.lower(), proc.stderr  # no deprecation warning about the licence
    (wheel,) = tmp_path.glob("monai_multiad-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    version = monai_multiad.__version__
    tracked = _tracked("bundles")
    assert {f"bundles/{name}/{rel}" for name in NAMES for rel in ("configs/metadata.json", "configs/train.json",
            "configs/logging.conf", "docs/README.md", "LICENSE")} <= set(map(str, tracked))
    for path in tracked:  # every file of bundles/: configs, docs, LICENSE, the schema
        assert f"monai_multiad/{path}" in names, path
    assert {"monai_multiad/bundles/__init__.py", "monai_multiad/bundles/__main__.py",
            "monai_multiad/bundles/schema/meta_schema_20240725.json", "monai_multiad/__main__.py",
            f"monai_multiad-{version}.dist-info/licenses/LICENSE"} <= names
    for package in _pyproject()["tool"]["setuptools"]["packages"]:  # code, or the bundles' data folders
        folder = package.replace(".", "/") + "/"
        assert folder + "__init__.py" in names or any(n.startswith(folder) for n in names), package
    assert not any(n.startswith(("tests/", "bundles/", "benchmarks/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(f"monai_multiad-{version}.dist-info/METADATA").decode()
    assert f"Version: {version}\n" in metadata and "License-Expression: Apache-2.0\n" in metadata
    assert "Project-URL: Paper, https://arxiv.org/abs/2602.05426" in metadata


@pytest.mark.slow
def test_installed_package_runs_its_bundle_and_exports(tmp_path):
    """A user's journey without the checkout: the package installed from its wheel (not editable), then,
    from another folder, ``python -m monai.bundle run`` of the installed industrial bundle trains on a tiny
    folder, and ``multiad export`` writes a TorchScript file whose output equals the trained model's."""
    import setuptools

    if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (77, 0):
        pytest.skip(f"building the wheel needs setuptools>=77 (an SPDX license), found {setuptools.__version__}")
    build, site, user = tmp_path / "build", tmp_path / "site", tmp_path / "user"
    user.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(build), str(ROOT)], capture_output=True, text=True, timeout=600, env=ENV,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = build.glob("monai_multiad-*.whl")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {**ENV, "PYTHONPATH": str(site)}  # the installed copy comes first: the checkout is not used

    def python(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, *args], cwd=user, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, f"{args}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        return done

    assert python("-c", "import monai_multiad; print(monai_multiad.__file__)").stdout.startswith(str(site))
    root = Path(python("-m", "monai_multiad", "bundle", "path", "industrial").stdout.strip())
    assert root == site / "monai_multiad" / "bundles" / "multiad_industrial"
    assert (root / "configs" / "train.json").is_file()
    write_textures(user / "bottle")
    python("-m", "monai.bundle", "run", "--config_file", str(root / "configs" / "train.json"), "--bundle_root", "mine",
           "--dataset_dir", "bottle", "--image_size", "64", "--epochs", "1", "--batch_size", "8", "--backbone",
           "resnet18", "--pretrained", "none", "--device", "cpu")
    assert (user / "mine" / "models" / "model.pt").is_file() and not list(root.rglob("model.pt"))  # nothing installed
    python("-m", "monai_multiad", "export", "--run", "mine/models", "--out", "model.ts")
    model = _model(user / "mine" / "models")
    scripted = torch.jit.load(str(user / "model.ts"))
    x, amap, score = _reference(model, 2)
    got_map, got_score = scripted(x)
    assert float((got_map - amap).abs().max()) < 1e-4 and float((got_score - score).abs().max()) < 1e-4
