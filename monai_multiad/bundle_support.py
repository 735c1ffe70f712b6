"""The few pieces the MONAI bundles in ``bundles/`` need beyond the shared builders.

The bundles' ``train.json`` builds a training run with the objects and steps ``multiad train`` uses
(:mod:`monai_multiad.workflow`, :mod:`monai_multiad.run_folder`, the engines), and the other configs call
:func:`~monai_multiad.inference.evaluate`, :func:`~monai_multiad.inference.predict` and
:func:`~monai_multiad.cohort.screen_paths`, from a :class:`~monai_multiad.config.RunConfig` made by
:func:`run_config` of the configs' top-level keys (one per ``RunConfig`` field). What is here:

* :func:`run_config`: ``RunConfig`` from a config's ``run_config`` entry, with the CLI's type checks,
  so ``--epochs ten`` is a one-line error instead of a ``TypeError`` deep inside;
* :class:`AnomalyMapNetwork` / :func:`anomaly_map_network`: the bundles' ``network_def``, a
  :class:`~monai_multiad.networks.MultiAD` whose eval ``forward`` returns the anomaly map alone (what
  ``verify_net_in_out`` and ``ckpt_export`` handle; the image score is the map's maximum) and whose
  ``load_state_dict`` names what does not fit;
* :func:`install_error_hook`: ``python -m monai.bundle run`` ends bad input with one line;
* :func:`check_command_line`, :func:`require_dataset_dir`, :func:`~monai_multiad.outputs.check_output_dir`:
  early checks of the command line (an option no config names), the dataset folder and an output
  folder, each a one-line error;
* :func:`image_inputs`, :func:`volume_scans`: what inference reads from a folder; :func:`flag`: a
  yes/no option as a shell passes it (``--rescreen true``);
* :func:`prepare_run_dir`: the run folder checked, created, and its ``config.json``;
* :func:`~monai_multiad.allocator.keep_freed_memory`: freed CPU memory kept for the next batch, as
  ``multiad`` keeps it (each config's first ``initialize`` step);
* for the configs MONAI's tools drive (``inference.json``, ``evaluate.json``: a ``dataset``, an ``inferer``,
  an ``evaluator`` run by ``"$@evaluator.run()"``): :class:`ImageMetad` and :func:`without_empty_meta` in
  their ``preprocessing``, :class:`AtomicNibabelWriter` (``SaveImaged``'s writer: a map file appears whole
  or not at all), :func:`build_trainer` (``train#trainer`` with its ``max_epochs``) and
  :func:`write_state_dict` (the plain state dict ``ckpt_export`` loads); their inferers are in
  :mod:`monai_multiad.inferers` (``VolumeSliceInferer``, ``ImageAnomalyInferer`` with ``restore_map``), the
  scores' handler in :mod:`monai_multiad.handlers` (``ScoreWriter``).

This module sits at the top floor, beside the CLI: it may import from anything below it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from monai_multiad.allocator import keep_freed_memory
from monai_multiad.config import FALSE_WORDS, MODEL_KEYS, TRUE_WORDS, RunConfig
from monai_multiad.errors import MultiADInputError, WeightsError, find_input_error
from monai_multiad.outputs import check_output_dir
from monai_multiad.networks import MultiAD

__all__ = [
    "AnomalyMapNetwork",
    "AtomicNibabelWriter",
    "ImageMetad",
    "build_trainer",
    "write_state_dict",
    "anomaly_map_network",
    "check_command_line",
    "check_output_dir",
    "flag",
    "image_inputs",
    "install_error_hook",
    "keep_freed_memory",
    "prepare_run_dir",
    "require_dataset_dir",
    "run_config",
    "volume_scans",
    "without_empty_meta",
]

def run_config(**options: Any) -> RunConfig:
    """A :class:`RunConfig` from bundle options (``RunConfig``'s field names; the rest default).

    Checked as the CLI checks its options (:meth:`RunConfig.from_dict`): an unknown name or a value of
    the wrong type is a :class:`MultiADInputError` naming the option. The strings ``true``/``false``
    (what a shell passes for ``--student_se false``) are taken for booleans.
    """
    bools = {f.name for f in fields(RunConfig) if isinstance(f.default, bool)}
    clean = dict(options)
    for name in bools & set(clean):
        if isinstance(clean[name], str) and clean[name].strip().lower() in TRUE_WORDS + FALSE_WORDS:
            clean[name] = flag(clean[name], name)
    if isinstance(clean.get("discriminator_channels"), tuple):
        clean["discriminator_channels"] = list(clean["discriminator_channels"])
    if isinstance(clean.get("dataset_dir"), str) and clean["dataset_dir"].strip():
        # resolved here, at the edge: the run's config.json names the data from any working folder
        clean["dataset_dir"] = os.path.abspath(clean["dataset_dir"])  # absolute, ".." folded
    cfg = RunConfig.from_dict(clean, "bundle option run_config")
    if cfg.layout != "auto" or (cfg.dataset_dir and Path(cfg.dataset_dir).is_dir()):
        from monai_multiad.workflow import resolve_options

        cfg = resolve_options(cfg)  # e.g. foreground "auto" -> on for volumes, as `multiad train` records it
    return cfg


def flag(value: Any, option: str) -> bool:
    """A bundle option's boolean: ``True``/``False``, or the strings a shell passes (``true``/``false``,
    ``yes``/``no``, ``on``/``off``, ``1``/``0``, any case); anything else is a :class:`MultiADInputError`."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in TRUE_WORDS + FALSE_WORDS:
        raise MultiADInputError(f"--{option} {value!r}: expected true or false")
    return text in TRUE_WORDS


class AnomalyMapNetwork(MultiAD):
    """:class:`MultiAD` whose eval ``forward`` returns the anomaly map ``(B, 1, H, W)`` only.

    The same modules and state-dict keys as ``MultiAD``, so a ``model.pt``'s ``"state_dict"`` or the
    file :func:`monai_multiad.export.save_state_dict` writes loads into it unchanged. The image score
    is ``map.amax(dim=(1, 2, 3))``. In training mode it returns the features as ``MultiAD`` does.
    """

    def forward(self, x: torch.Tensor):
        if not torch.jit.is_scripting():
            out = MultiAD.forward(self, x)
            return out if self.training else out[0]
        t, s = self.eval_features(x)  # scripted (ckpt_export's default): the same map, inference only
        return self.fused_map(t, s, x)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Strict loading checks every key and shape first and names what does not fit in one line
        (:class:`~monai_multiad.errors.WeightsError`), with the options this network was built with."""
        if strict and not getattr(self, "_checking", False):
            from monai_multiad.networks.weights import load_complete

            self._checking = True
            try:
                load_complete(self, state_dict, "checkpoint")  # checks, then loads through this method
            except WeightsError as e:
                raise WeightsError(
                    f"{e} -- network_def was built with {self.describe()}; pass the trained run's model options "
                    f"from its config.json as --run_config#<name> <value> ({', '.join(MODEL_KEYS)})"
                ) from None
            finally:
                self._checking = False
            return torch.nn.modules.module._IncompatibleKeys([], [])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def describe(self) -> str:
        disc = self.discriminator is not None
        return f"backbone={self.backbone}, in_channels={self.in_channels}, discriminator={disc}"


def anomaly_map_network(cfg: RunConfig, check_inputs: bool = False) -> AnomalyMapNetwork:
    """``network_def`` of the bundles: the network ``cfg`` describes (as ``workflow.build_network``
    builds it), without teacher weights (they come with the checkpoint) and, by default, without
    input checks (``ckpt_export`` traces it)."""
    return AnomalyMapNetwork(**{**cfg.model_kwargs(), "pretrained": False, "check_inputs": check_inputs})


def install_error_hook(prog: str = "multiad bundle") -> None:
    """Make an uncaught :class:`MultiADInputError` (also one MONAI wrapped in its own errors) end the
    process with one line ``<prog>: error: <message>`` on stderr instead of a traceback; any other
    error keeps its traceback. For command-line runs (``python -m monai.bundle run``)."""
    previous = sys.excepthook
    if getattr(previous, "_multiad", False):
        return

    def hook(exc_type, exc, tb):
        found = find_input_error(exc)
        if found is None:
            previous(exc_type, exc, tb)
        else:
            print(f"{prog}: error: {found}", file=sys.stderr)

    hook._multiad = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def require_dataset_dir(path: str | Path, option: str = "--dataset_dir") -> Path:
    """The dataset folder, or a :class:`MultiADInputError` saying which option to set."""
    if path is None or str(path).strip() == "":
        raise MultiADInputError(f"no dataset folder given: pass {option} /path/to/data")
    p = Path(path)
    if not p.is_dir():
        raise MultiADInputError(f"{p}: dataset folder not found (set {option})")
    return p


def prepare_run_dir(run_dir: str | Path, cfg: RunConfig) -> Path:
    """The run folder, checked as ``multiad train`` checks ``--run-dir`` (not a file, not inside the
    dataset), created with its ``config.json`` (rank 0 only under ``ignite.distributed``)."""
    from monai_multiad.run_folder import start_run_folder

    return start_run_folder(check_output_dir(run_dir, "run folder", inputs=(cfg.dataset_dir,)), cfg)


#: what ``python -m monai.bundle run`` itself takes besides the configs' keys
_RUN_ARGUMENTS = ("config_file", "meta_file", "logging_file", "args_file", "run_id", "init_id", "final_id",
                  "tracking", "workflow_type", "workflow_name", "properties_path")


def _config_files(argv: list[str]) -> list[Path]:
    """The files of ``--config_file`` (one path, comma-separated paths or a Python list) in ``argv``."""
    import ast

    value = None
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
    if not value:
        return []
    if value.strip().startswith("["):
        try:
            return [Path(str(v)) for v in ast.literal_eval(value)]
        except (ValueError, SyntaxError):
            return []
    return [Path(v) for v in value.split(",")]


def check_command_line(argv: list[str] | None = None) -> None:
    """Refuse an option of a bundle command line that names no key of its configs (``--epoch 10`` for
    ``--epochs 10``, or an option of ``multiad train`` spelled with dashes), which MONAI would add as an
    unused entry and so ignore silently. Every :class:`RunConfig` field is a top-level key of
    ``train.json``; ``--run_config#<name>`` and other ``#`` paths are checked by their first part.
    ``argv`` defaults to ``sys.argv``; the configs are those of its ``--config_file``."""
    import difflib
    import json

    argv = sys.argv[1:] if argv is None else argv
    keys = {f.name for f in fields(RunConfig)} | set(_RUN_ARGUMENTS)
    for path in _config_files(argv):
        try:
            keys |= set(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return  # MONAI reports a config it cannot read
    for arg in argv:
        if not arg.startswith("--"):
            continue
        name = arg[2:].partition("=")[0]
        top = name.split("#")[0]
        if top and top not in keys:
            close = difflib.get_close_matches(top.replace("-", "_"), sorted(keys), n=1)
            hint = f": did you mean --{close[0]}?" if close else ""
            raise MultiADInputError(f"--{name} is not an option of this bundle{hint}")


def image_inputs(folder: str | Path) -> list[str]:
    """Images to predict on: ``folder`` when it holds images, else its sub-folders that do (an MVTec
    ``test/`` folder: ``good/``, ``<defect>/``; a plain-folder dataset: ``good/``, ``<defect>/``); for
    an MVTec AD or BMAD dataset root, those of its ``test/`` folder. A :class:`MultiADInputError`
    when there are none."""
    from monai_multiad.data.images import list_images

    folder = require_dataset_dir(folder, "--input_dir")
    if (folder / "test").is_dir() and not list_images(folder, required=False):
        folder = folder / "test"
    if list_images(folder, required=False):
        return [str(folder)]
    subs = [str(d) for d in sorted(folder.iterdir()) if d.is_dir() and list_images(d, required=False)]
    if not subs:
        raise MultiADInputError(f"{folder}: no images here nor in its sub-folders (set --input_dir)")
    return subs


def volume_scans(folder: str | Path) -> list[str]:
    """Scans to screen in a volume folder (the training layout, see :mod:`monai_multiad.data.volumes`:
    ``<case>/<image>.nii.gz``, ``<case>.nii.gz``, DICOM series folders): the ``"test"`` cases of its
    ``splits.json`` when it lists some, else every case."""
    import json

    from monai_multiad.data.volumes import find_cases

    folder = require_dataset_dir(folder, "--input_dir")
    cases = find_cases(folder)
    if not cases:
        raise MultiADInputError(f"{folder}: no NIfTI volumes or DICOM series here (set --input_dir)")
    try:
        test = json.loads((folder / "splits.json").read_text()).get("test") or []
    except (OSError, ValueError, AttributeError):
        test = []
    chosen = [c for c in cases if c.name in set(test)] or cases
    return [str(c.image) for c in chosen]


# ----------------------------------------------------------------------------- graphs MONAI's tools drive
def build_trainer(cfg: RunConfig, network, loader, device, optimizer=None, d_optimizer=None, handlers=None,
                  lr_scheduler="auto", max_epochs: int | None = None):
    """``train#trainer``: :func:`monai_multiad.workflow.build_trainer`, with ``max_epochs`` shown in the config
    (MONAI's training property ``train#trainer#max_epochs``; the bundles set it to ``--epochs``)."""
    from monai_multiad.workflow import build_trainer as build

    trainer = build(cfg, network, loader, device, optimizer=optimizer, d_optimizer=d_optimizer, handlers=handlers,
                    lr_scheduler=lr_scheduler)
    if max_epochs is not None:
        if int(max_epochs) < 1:
            raise MultiADInputError(f"train#trainer#max_epochs must be at least 1, got {max_epochs}")
        trainer.state.max_epochs = int(max_epochs)
    return trainer


def write_state_dict(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Write the plain state dict of the run's network (``<run_dir>/model_state.pt`` by default, atomically):
    what MONAI's ``ckpt_export`` and ``CheckpointLoader`` load into ``network_def`` without ``--key_in_ckpt``.
    The run's ``model.pt`` (network, config and fusion statistics) is left as it is."""
    from monai_multiad.outputs import atomic_path
    from monai_multiad.run_folder import load_model

    network = load_model(run_dir, "cpu")[0]
    path = Path(path) if path else Path(run_dir) / "model_state.pt"
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, tmp)
    return path


def without_empty_meta(x):
    """``x`` (a ``MetaTensor``) with the ``meta`` entries that are ``None`` left out (a NIfTI file has no
    ``modality``), which a ``DataLoader`` could not collate into a batch."""
    meta = getattr(x, "meta", None)
    if meta is not None:
        for key in [k for k, v in meta.items() if v is None]:
            del meta[key]
    return x


class ImageMetad:
    """Dictionary transform after :class:`~monai_multiad.data.images.LoadAnomalyImaged`: the image becomes a
    ``MetaTensor`` whose ``meta`` names its file (``filename_or_obj``, what ``SaveImaged`` names its output
    after) and holds its ``original_size``, so both travel with it through an engine to ``postprocessing``."""

    def __init__(self, keys: str = "image", path_key: str = "path", size_key: str = "original_size") -> None:
        self.key, self.path_key, self.size_key = keys, path_key, size_key

    def __call__(self, data: dict) -> dict:
        from monai.data import MetaTensor

        d = dict(data)
        meta = {"filename_or_obj": str(d[self.path_key]), "original_channel_dim": "no_channel"}
        if self.size_key in d:
            meta["original_size"] = [int(v) for v in torch.as_tensor(d[self.size_key]).tolist()]
        d[self.key] = MetaTensor(torch.as_tensor(d[self.key]), meta=meta)
        return d



class AtomicNibabelWriter:
    """``SaveImaged``'s ``writer`` for NIfTI maps: MONAI's ``NibabelWriter``, writing to a temporary name
    beside the file and renaming it into place (:func:`~monai_multiad.outputs.atomic_path`): a map file is
    there whole or not at all, as every output of this project."""

    def __new__(cls, *args: Any, **kwargs: Any):
        from monai.data import NibabelWriter

        from monai_multiad.outputs import atomic_path

        class _Atomic(NibabelWriter):
            def write(self, filename, verbose: bool = False, **obj_kwargs):
                with atomic_path(filename) as tmp:
                    return super().write(str(tmp), verbose=verbose, **obj_kwargs)

        return _Atomic(*args, **kwargs)


