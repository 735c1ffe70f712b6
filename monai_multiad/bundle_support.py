"""The few pieces the MONAI bundles in ``bundles/`` need beyond the shared builders.

The bundles' configs build their objects with :mod:`monai_multiad.workflow` (``build_network``,
``build_datasets``, ``build_loader``, ``build_trainer``), the engines, :func:`~monai_multiad.inference.evaluate`,
:func:`~monai_multiad.inference.predict` and :func:`~monai_multiad.screening.screen_paths`, from a
:class:`~monai_multiad.config.RunConfig` made by :func:`run_config`. What is here:

* :func:`run_config`: ``RunConfig`` from a config's ``run_config`` entry, with the CLI's type checks,
  so ``--run_config#epochs ten`` is a one-line error instead of a ``TypeError`` deep inside;
* :class:`AnomalyMapNetwork` / :func:`anomaly_map_network`: the bundles' ``network_def``, a
  :class:`~monai_multiad.networks.MultiAD` whose eval ``forward`` returns the anomaly map alone (what
  ``verify_net_in_out`` and ``ckpt_export`` handle; the image score is the map's maximum) and whose
  ``load_state_dict`` names what does not fit;
* :func:`install_error_hook`: ``python -m monai.bundle run`` ends bad input with one line;
* :func:`check_command_line`, :func:`require_dataset_dir`, :func:`check_resume`,
  :func:`~monai_multiad.io.check_output_dir`: early checks of the command line, the dataset folder,
  a checkpoint to resume from and an output folder, each a one-line error;
* :func:`image_inputs`, :func:`volume_scans`: what inference reads from a folder;
* :func:`training_objects`: what a training checkpoint holds (as ``workflow.train`` saves it);
* :func:`prepare_run_dir`: the run folder and its ``config.json``;
* :func:`finish_training`: after the trainer: best weights back, fusion fitted, ``model.pt`` written,
  as :func:`monai_multiad.workflow.train` ends.

This module sits at the top floor, beside the CLI: it may import from anything below it.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from monai_multiad.config import MODEL_KEYS, RunConfig
from monai_multiad.errors import MultiADInputError, WeightsError
from monai_multiad.io import check_output_dir
from monai_multiad.networks import MultiAD

__all__ = [
    "AnomalyMapNetwork",
    "anomaly_map_network",
    "check_command_line",
    "check_output_dir",
    "check_resume",
    "finish_training",
    "image_inputs",
    "install_error_hook",
    "prepare_run_dir",
    "require_dataset_dir",
    "run_config",
    "training_objects",
    "volume_scans",
]

logger = logging.getLogger("monai_multiad")

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def run_config(**options: Any) -> RunConfig:
    """A :class:`RunConfig` from bundle options (``RunConfig``'s field names; the rest default).

    Checked as the CLI checks its options (:meth:`RunConfig.from_dict`): an unknown name or a value of
    the wrong type is a :class:`MultiADInputError` naming the option. The strings ``true``/``false``
    (what a shell passes for ``--run_config#student_se false``) are taken for booleans.
    """
    bools = {f.name for f in fields(RunConfig) if isinstance(f.default, bool)}
    clean = dict(options)
    for name in bools & set(clean):
        value = clean[name]
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            clean[name] = value.strip().lower() in _TRUE
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


class AnomalyMapNetwork(MultiAD):
    """:class:`MultiAD` whose eval ``forward`` returns the anomaly map ``(B, 1, H, W)`` only.

    The same modules and state-dict keys as ``MultiAD``, so a ``model.pt``'s ``"state_dict"`` or the
    file :func:`monai_multiad.export.save_state_dict` writes loads into it unchanged. The image score
    is ``map.amax(dim=(1, 2, 3))``. In training mode it returns the features as ``MultiAD`` does.
    """

    def forward(self, x: torch.Tensor):
        out = super().forward(x)
        return out if self.training else out[0]

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


def training_objects(trainer) -> dict[str, Any]:
    """What a training checkpoint holds, as :func:`monai_multiad.workflow.train` saves it
    (:meth:`~monai_multiad.engines.trainer.MultiADTrainer.checkpoint_objects`)."""
    return trainer.checkpoint_objects()


def _find_input_error(exc: BaseException | None) -> MultiADInputError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MultiADInputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install_error_hook(prog: str = "multiad bundle") -> None:
    """Make an uncaught :class:`MultiADInputError` (also one MONAI wrapped in its own errors) end the
    process with one line ``<prog>: error: <message>`` on stderr instead of a traceback; any other
    error keeps its traceback. For command-line runs (``python -m monai.bundle run``)."""
    previous = sys.excepthook
    if getattr(previous, "_multiad", False):
        return

    def hook(exc_type, exc, tb):
        found = _find_input_error(exc)
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


def check_command_line(argv: list[str] | None = None, allowed: tuple[str, ...] = ("dataset_dir", "device")) -> None:
    """Refuse a run option given at the top level of a bundle command line (``--epochs 10``), which
    MONAI would add as an unused config entry and so silently ignore: run options are
    ``--run_config#<name>``. ``argv`` defaults to ``sys.argv``."""
    argv = sys.argv[1:] if argv is None else argv
    names = {f.name for f in fields(RunConfig)} - set(allowed)
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        name, _, value = arg[2:].partition("=")
        if name in names:
            value = value or (argv[i + 1] if i + 1 < len(argv) else "VALUE")
            raise MultiADInputError(f"--{name} is not a bundle option: run options are set under run_config, "
                                    f"e.g. --run_config#{name} {value}")


def check_resume(path: str | Path, cfg: RunConfig, objects: dict[str, Any]) -> Path:
    """Check a training checkpoint before ``CheckpointLoader`` loads it: it exists, holds every
    object (trainer, student, optimizer[, discriminator, d_optimizer]), was made by the same network
    (its run's ``config.json`` and every tensor's shape) and is not past ``cfg.epochs``.
    Problems are one-line :class:`MultiADInputError` / :class:`WeightsError` messages."""
    from monai_multiad.networks.weights import load_complete
    from monai_multiad.run_folder import read_training_checkpoint

    path = Path(path)
    if not path.is_file():
        raise MultiADInputError(f"{path}: checkpoint to resume from not found (set --resume)")
    state = read_training_checkpoint(path, cfg, objects)
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            load_complete(obj, state[name], f"{path} [{name}]")
    trainer = state.get("trainer") or {}
    if trainer.get("epoch_length"):
        done = int(trainer.get("iteration", 0)) // int(trainer["epoch_length"])
        if done >= cfg.epochs:
            raise MultiADInputError(f"{path}: checkpoint has {done} epoch(s) done, not fewer than epochs={cfg.epochs}: "
                                    "raise --run_config#epochs to go on")
    return path


def restore_best_tracking(saver, best_file: str | Path) -> bool:
    """On ``--resume``: give the best-model ``CheckpointSaver`` the record of the best validation
    loss so far (saved in ``best_model.pt`` with ``key_metric_save_state``), so that the resumed
    epochs replace the best model only when they beat it. ``saver`` is ``None`` on ranks that do
    not save. Returns whether a record was restored."""
    best_file = Path(best_file)
    if saver is None or not best_file.is_file():
        return False
    try:
        state = torch.load(best_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise WeightsError(f"{best_file}: cannot read the best checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "checkpointer" not in state:
        logger.warning("%s holds no record of its validation loss: the resumed epochs choose the best model "
                       "among themselves", best_file)
        return False
    saver.load_state_dict(state["checkpointer"])
    return True


def prepare_run_dir(run_dir: str | Path, cfg: RunConfig, resume: str | Path | None = None) -> Path:
    """Create the run folder and write ``config.json`` (rank 0 only under ``ignite.distributed``).
    A new run (no ``resume``) removes a ``checkpoints/best_model.pt`` left by an earlier run in the
    same folder, which :func:`finish_training` would otherwise restore."""
    import ignite.distributed as idist

    from monai_multiad.io import write_json

    run_dir = check_output_dir(run_dir, "run folder", inputs=(cfg.dataset_dir,))
    if idist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", cfg.to_dict())
        if not resume:
            (run_dir / "checkpoints" / "best_model.pt").unlink(missing_ok=True)
    return run_dir


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


def finish_training(
    cfg: RunConfig,
    trainer,
    val_loader,
    run_dir: str | Path,
    best_checkpoint: str | Path | None = None,
    train_dataset=None,
    rank0: bool = True,
) -> dict[str, Any]:
    """End a bundle training run as :func:`monai_multiad.workflow.train` ends: load the best weights
    by validation loss (``best_checkpoint``, when it was written), fit the fusion statistics on the
    validation normals, write ``model.pt`` and ``metrics.json`` (rank 0). Returns the summary."""
    from ignite.handlers import Checkpoint

    from monai_multiad.engines.evaluator import fit_fusion
    from monai_multiad.io import write_json
    from monai_multiad.run_folder import save_model

    network, device = trainer.network, trainer.state.device
    best = Path(best_checkpoint) if best_checkpoint else None
    if best is not None and best.is_file():
        objects = {k: v for k, v in training_objects(trainer).items() if k in ("student", "discriminator")}
        state = torch.load(best, map_location=device, weights_only=True)
        state.pop("checkpointer", None)  # the saver's record of the best loss (key_metric_save_state)
        Checkpoint.load_objects(objects, state)
    fusion = fit_fusion(network, val_loader, device, cfg.threshold_quantile, normalization=cfg.map_normalization)
    summary = {
        "epochs": trainer.state.epoch,
        "iterations": trainer.state.iteration,
        "best_checkpoint": str(best) if best is not None and best.is_file() else None,
        "train_images": len(train_dataset) if train_dataset is not None else None,
        "val_images": len(val_loader.dataset) if hasattr(val_loader, "dataset") else None,
        "device": str(device),
        "fusion": fusion,
    }
    if rank0:
        run_dir = Path(run_dir)
        save_model(run_dir / "model.pt", network, cfg, fusion)
        write_json(run_dir / "metrics.json", {"training": summary})
        logger.info("trained %d epoch(s), %d iterations; wrote %s", summary["epochs"], summary["iterations"],
                    run_dir / "model.pt")
    return summary
