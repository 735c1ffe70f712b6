"""A run folder: what ``multiad train`` and the bundles' ``train.json`` write and every other command reads.

``config.json`` (the options used: :func:`start_run_folder`), ``model.pt`` (network weights + fusion
statistics + config: :func:`save_model` / :func:`load_model`), ``checkpoints/`` (written by the Ignite
handlers of :mod:`monai_multiad.handlers.checkpoint_saver`), ``log.csv`` and ``tensorboard/``
(:class:`~monai_multiad.handlers.EpochLog`) and ``metrics.json``. The device and memory layout a run's
networks use (:func:`resolve_device`, :func:`on_device`) are chosen here too. Inference, screening,
calibration and export import this module, not the training one; resuming a run into the same folder
(:func:`load_training_checkpoint`, :func:`adopt_checkpoints`) lives here too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.handlers import Checkpoint

from monai_multiad.config import MODEL_KEYS, RunConfig
from monai_multiad.errors import MultiADInputError, WeightsError
from monai_multiad.outputs import atomic_path
from monai_multiad.networks import MultiAD

__all__ = [
    "adopt_checkpoints",
    "check_compatible",
    "clear_checkpoints",
    "last_checkpoint_in",
    "load_model",
    "load_training_checkpoint",
    "on_device",
    "read_training_checkpoint",
    "resolve_device",
    "save_model",
    "start_run_folder",
]

logger = logging.getLogger("monai_multiad")


def save_model(path: str | Path, network: MultiAD, cfg: RunConfig, fusion_stats: dict | None = None) -> None:
    """Write the trained network, its fusion statistics and its config (atomically)."""
    if getattr(network, "batchnorm_folded", False):
        raise ValueError("a network whose BatchNorm layers were folded for inference cannot be saved: "
                         "save the network as trained")
    config = cfg.to_dict()
    # the options recorded describe the network saved: its optional maps are the ones it has
    bank = getattr(network, "memory_bank", None)
    config["memory_bank"] = int(bank.bank.shape[0]) if bank is not None else 0
    if getattr(network, "segmentation_head", None) is None:
        config["segmentation_head_steps"] = 0
    payload = {"config": config, "state_dict": network.state_dict(), "fusion": fusion_stats or {}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"``: the rank's CUDA device when there is one, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return idist.device() if idist.get_world_size() > 1 else torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MultiADInputError(f"device {name!r} was asked for but CUDA is not available: use --device cpu or auto")
    return device


def on_device(network: MultiAD, cfg: RunConfig, device: torch.device | str) -> MultiAD:
    """``network`` on ``device`` in the run's memory layout (``cfg.memory_format``; ``"auto"`` is
    channels-last on the CPU, where oneDNN's convolutions run faster in it, and contiguous elsewhere).
    Training, validation, inference and screening all run the networks placed by this function."""
    device = torch.device(device)
    network = network.to(device)
    layout = cfg.memory_format if cfg.memory_format != "auto" else (
        "channels_last" if device.type == "cpu" else "contiguous")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return network.to(memory_format=fmt)


def load_model(path: str | Path, device: torch.device | str = "cpu",
               fold_batchnorm: bool = False) -> tuple[MultiAD, RunConfig, dict]:
    """Load ``model.pt`` (or a run folder holding one) -> (network in eval mode, config, fusion stats).

    ``fold_batchnorm=True`` folds the networks' BatchNorm layers into their convolutions
    (:meth:`MultiAD.fold_batchnorm_`): the same maps to float rounding, the Lite0 networks
    about 1.2x faster on one CPU thread at batch 1 and 32 (``docs/results.md``),
    for inference only (the network can then be neither trained nor saved). Evaluation, prediction,
    screening and calibration load it so; export and state-dict files keep the network as trained."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise MultiADInputError(f"{path}: no trained model here (expected a run folder written by 'multiad train')")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        cfg = RunConfig.from_dict(payload["config"], path)
        state = payload["state_dict"]
    except (KeyError, TypeError) as e:
        raise WeightsError(f"{path}: not a monai-multiad model file (missing {e})") from e
    except MultiADInputError:  # WeightsError included: already names the file
        raise
    except Exception as e:
        raise WeightsError(f"{path}: cannot read the model file ({type(e).__name__}: {e})") from e
    network = MultiAD(**{**cfg.model_kwargs(), "pretrained": False})
    from monai_multiad.networks.weights import load_complete

    load_complete(network, state, path)
    if fold_batchnorm:
        network.fold_batchnorm_()
    return on_device(network, cfg, device).eval(), cfg, payload.get("fusion", {})


def check_compatible(checkpoint_cfg: dict[str, Any], cfg: RunConfig, source: str | Path) -> None:
    """A checkpoint from another backbone or shape is an error naming the differing options."""
    diff = [
        f"{k}={checkpoint_cfg.get(k)!r} (this run: {getattr(cfg, k)!r})"
        for k in MODEL_KEYS
        if k in checkpoint_cfg and checkpoint_cfg[k] != getattr(cfg, k)
    ]
    if diff:
        raise WeightsError(f"{source}: checkpoint was made with {', '.join(diff)}")



def start_run_folder(run_dir: str | Path, cfg: RunConfig) -> Path:
    """Create the run folder and write its ``config.json`` (rank 0 only under ``ignite.distributed``).
    Returns the folder, absolute (Ignite's checkpoint paths include it)."""
    from monai_multiad.outputs import write_json

    run_dir = Path(run_dir).absolute()
    if idist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", cfg.to_dict())
    return run_dir




def _checkpoint_number(path: Path) -> int:
    """``last_checkpoint_675.pt`` -> 675 (the iteration), ``best_checkpoint_3_...`` -> 3 (the epoch)."""
    try:
        return int(path.stem.split("_")[2].split("=")[0])
    except (IndexError, ValueError):
        return -1


def last_checkpoint_in(run_dir: Path) -> Path | None:
    """The newest ``last_checkpoint_<iteration>.pt`` of a run folder (by number, not by name:
    ``_675`` is after ``_90``), or ``None``."""
    found = [*(run_dir / "checkpoints").glob("last_checkpoint_*.pt"), *run_dir.glob("last_checkpoint_*.pt")]
    return max(found, key=_checkpoint_number) if found else None


def read_training_checkpoint(path: str | Path, cfg: RunConfig, objects: dict[str, Any]) -> dict:
    """The state saved in the training checkpoint ``path``, checked before anything is loaded: it
    exists and reads, it is a dict holding every one of ``objects`` (trainer, student, optimizer
    [, lr_scheduler, discriminator, d_optimizer]) and its run's ``config.json`` (when beside it)
    describes the same network as ``cfg``. Problems are one-line :class:`MultiADInputError` /
    :class:`WeightsError` messages naming the file. Used by the CLI's resume and the bundles'."""
    path = Path(path)
    if not path.is_file():
        raise MultiADInputError(f"{path}: checkpoint to resume from not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise WeightsError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: not a training checkpoint (expected a dict of objects)")
    config_file = path.parent.parent / "config.json"
    if config_file.is_file():
        check_compatible(RunConfig.load(config_file).to_dict(), cfg, path)
    missing = [k for k in objects if k not in state]
    if missing:
        raise WeightsError(f"{path}: checkpoint lacks {', '.join(missing)} (made by another configuration, "
                           "e.g. with or without the discriminator?)")
    return state


def load_training_checkpoint(path: Path, to_save: dict, run_state: dict, cfg: RunConfig) -> Path:
    """Load the checkpoint ``path`` (or a run folder's newest) into ``to_save`` and, when it holds
    them, into ``run_state`` (the best-so-far record and the early-stopping count). Returns the file."""
    if path.is_dir():
        found = last_checkpoint_in(path)
        if found is None:
            raise MultiADInputError(f"{path}: no last_checkpoint_*.pt to resume from")
        path = found
    state = read_training_checkpoint(path, cfg, to_save)
    try:
        Checkpoint.load_objects(to_save, state)
        Checkpoint.load_objects({k: v for k, v in run_state.items() if k in state}, state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise WeightsError(f"{path}: checkpoint does not fit this network: {str(e).splitlines()[0]}") from e
    trainer = to_save["trainer"]
    if "lr_scheduler" not in to_save:  # a constant rate: this run's --lr, not the one saved with the optimizer
        for group in to_save["optimizer"].param_groups:
            if group["lr"] != cfg.lr:
                logger.warning("resuming with learning rate %g (the checkpoint's was %g)", cfg.lr, group["lr"])
                group["lr"] = cfg.lr
    if trainer.state.epoch >= cfg.epochs:
        raise MultiADInputError(f"{path}: the checkpoint has {trainer.state.epoch} epoch(s) done, not fewer than "
                                f"--epochs {cfg.epochs}: raise --epochs to train on")
    # the saved state ends at its own max_epochs; go on to this run's
    trainer.state.max_epochs = cfg.epochs
    return path



def adopt_checkpoints(source: Path, ckpt_dir: Path, last: Checkpoint, best: Checkpoint) -> None:
    """After a resume: the run folder's checkpoints are the resumed checkpoint and the best one
    recorded in it (copied here when resuming from another folder); other ``last_*``/``best_*``
    files (later epochs being trained again, or an earlier run's) are removed."""
    import shutil

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    keep = set()
    if source.parent.resolve() == ckpt_dir.resolve():
        _set_saved(last, [(_checkpoint_number(source), source.name)])
        keep.add(source.name)
    saved = []
    for priority, name in _saved(best):
        origin = source.parent / name
        if not origin.is_file():
            logger.warning("%s: the best checkpoint recorded in %s is missing; the best epoch is chosen among the "
                           "epochs trained from now on", origin, source.name)
            continue
        if origin.resolve() != (ckpt_dir / name).resolve():
            with atomic_path(ckpt_dir / name) as tmp:
                shutil.copyfile(origin, tmp)
        saved.append((priority, name))
        keep.add(name)
    _set_saved(best, saved)
    clear_checkpoints(ckpt_dir, keep)


def _saved(handler: Checkpoint) -> list[tuple]:
    """The (priority, file name) pairs an Ignite ``Checkpoint`` keeps (its state dict's one entry)."""
    return [tuple(item) for item in next(iter(handler.state_dict().values()))]


def _set_saved(handler: Checkpoint, items: list[tuple]) -> None:
    key = next(iter(handler.state_dict()))
    handler.load_state_dict({key: items})


def clear_checkpoints(ckpt_dir: Path, keep: set[str] = frozenset()) -> None:
    """Remove ``last_*``/``best_*`` checkpoints of ``ckpt_dir`` except ``keep``: a run folder holds
    one run's checkpoints, so that ``--resume`` and the best epoch can only mean this run's."""
    stale = [p for p in [*ckpt_dir.glob("last_checkpoint_*.pt"), *ckpt_dir.glob("best_checkpoint_*.pt")]
             if p.name not in keep]
    if stale:
        logger.warning("%s: replacing %d checkpoint(s) of an earlier run in this folder", ckpt_dir, len(stale))
    for p in stale:
        p.unlink(missing_ok=True)
