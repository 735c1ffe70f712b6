"""A run folder: what ``multiad train`` writes and every other command reads.

``config.json`` (the options used), ``model.pt`` (network weights + fusion statistics + config:
:func:`save_model` / :func:`load_model`), ``checkpoints/`` (``last_checkpoint_<iteration>.pt``
for ``--resume`` and ``best_checkpoint_<epoch>_neg_val_loss=<score>.pt``, written by
:class:`CheckpointSaver`), ``log.csv`` and ``metrics.json``. Inference, screening, calibration
and export import this module, not the training one; resuming a run into the same folder
(:func:`load_training_checkpoint`, :func:`previous_log_rows`, :func:`adopt_checkpoints`) lives
here too.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import torch
from ignite.handlers import Checkpoint, DiskSaver

from monai_multiad.config import MODEL_KEYS, RunConfig
from monai_multiad.errors import MultiADInputError, WeightsError
from monai_multiad.io import atomic_path, write_error
from monai_multiad.networks import MultiAD

__all__ = [
    "CheckpointSaver",
    "adopt_checkpoints",
    "check_compatible",
    "clear_checkpoints",
    "last_checkpoint_in",
    "load_model",
    "load_training_checkpoint",
    "read_training_checkpoint",
    "previous_log_rows",
    "save_model",
]

logger = logging.getLogger("monai_multiad")


def save_model(path: str | Path, network: MultiAD, cfg: RunConfig, fusion_stats: dict | None = None) -> None:
    """Write the trained network, its fusion statistics and its config (atomically)."""
    payload = {"config": cfg.to_dict(), "state_dict": network.state_dict(), "fusion": fusion_stats or {}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[MultiAD, RunConfig, dict]:
    """Load ``model.pt`` (or a run folder holding one) -> (network in eval mode, config, fusion stats)."""
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
    return network.to(device).eval(), cfg, payload.get("fusion", {})


def check_compatible(checkpoint_cfg: dict[str, Any], cfg: RunConfig, source: str | Path) -> None:
    """A checkpoint from another backbone or shape is an error naming the differing options."""
    diff = [
        f"{k}={checkpoint_cfg.get(k)!r} (this run: {getattr(cfg, k)!r})"
        for k in MODEL_KEYS
        if k in checkpoint_cfg and checkpoint_cfg[k] != getattr(cfg, k)
    ]
    if diff:
        raise WeightsError(f"{source}: checkpoint was made with {', '.join(diff)}")


class CheckpointSaver(DiskSaver):
    """Ignite's atomic ``DiskSaver`` with two changes for a run a user must be able to resume:
    a checkpoint that a newer one replaces is removed only once the newer one is written (so a
    failed write, e.g. a full disk, leaves the previous checkpoint in place), and a failed write
    is an :class:`~monai_multiad.errors.OutputWriteError` naming the file, with no partial file left."""

    def __init__(self, dirname: str | Path) -> None:
        super().__init__(dirname, atomic=True, require_empty=False)
        self._replaced: list[str] = []

    def remove(self, filename: str) -> None:
        self._replaced.append(filename)

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        folder = Path(self.dirname)
        before = set(folder.iterdir()) if folder.is_dir() else set()
        try:
            super().__call__(checkpoint, filename, metadata)
        except Exception as e:
            for leftover in set(folder.iterdir()) - before if folder.is_dir() else ():
                leftover.unlink(missing_ok=True)  # Ignite's temporary file, when closing it failed too
            raise write_error(folder / filename, e) from e
        replaced, self._replaced = self._replaced, []
        for name in replaced:
            if name != filename:
                super().remove(name)


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


def previous_log_rows(log_file: Path, epochs: int) -> list[dict]:
    """The rows of the resumed run's ``log.csv`` up to its checkpoint's epoch (later rows belong to
    epochs that are trained again), so the log goes on instead of starting empty."""
    if not log_file.is_file():
        return []
    rows = []
    with log_file.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                values = {k: float(v) for k, v in row.items() if v not in (None, "")}
            except ValueError:
                continue
            values["epoch"] = int(values.get("epoch", 0))
            if 0 < values["epoch"] <= epochs:
                rows.append(values)
    return rows


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
