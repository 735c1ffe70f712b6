"""The run folder's checkpoints: :class:`CheckpointSaver` (Ignite's atomic ``DiskSaver`` that keeps the
previous checkpoint until the new one is written) and the two Ignite ``Checkpoint`` handlers a run attaches,
:func:`best_checkpointer` (the epoch with the lowest validation loss) and :func:`last_checkpointer` (everything
``--resume`` needs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ignite.handlers import Checkpoint, DiskSaver

from monai_multiad.outputs import write_error

__all__ = ["BEST_OBJECTS", "CheckpointSaver", "best_checkpointer", "last_checkpointer"]


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


#: what the best checkpoint holds, of a trainer's ``checkpoint_objects()``
BEST_OBJECTS = ("student", "discriminator")


def best_checkpointer(trainer, run_dir: str | Path) -> Checkpoint:
    """The Ignite ``Checkpoint`` keeping the student (and discriminator) of the epoch with the lowest
    validation loss as ``<run_dir>/checkpoints/best_checkpoint_<epoch>_neg_val_loss=<score>.pt``.
    Attach it to the validation evaluator's ``COMPLETED`` (its key metric, ``state.metrics["val_loss"]``);
    ``trainer`` is the :class:`~monai_multiad.engines.trainer.MultiADTrainer` (the epoch in the name)."""
    objects = {k: v for k, v in trainer.checkpoint_objects().items() if k in BEST_OBJECTS}
    return Checkpoint(
        objects,
        CheckpointSaver(Path(run_dir).absolute() / "checkpoints"),
        filename_prefix="best",
        # one name whatever the objects (Ignite names a lone object's file after its key)
        filename_pattern="{filename_prefix}_checkpoint_{global_step}_{score_name}={score}.{ext}",
        score_function=Checkpoint.get_default_score_fn("val_loss", -1.0),  # the evaluator's key metric, lower better
        score_name="neg_val_loss",
        n_saved=1,
        global_step_transform=lambda *_: trainer.state.epoch,
    )


def last_checkpointer(trainer, run_dir: str | Path, best: Checkpoint | None = None,
                      early_stopping: Any = None) -> Checkpoint:
    """The Ignite ``Checkpoint`` writing ``<run_dir>/checkpoints/last_checkpoint_<iteration>.pt`` (the
    newest only) with everything a resume needs: the trainer's ``checkpoint_objects()`` and also
    ``best``'s record of the best checkpoint and ``early_stopping``'s count (when given), so that a
    resumed run compares its epochs with those before the interruption. Attach it to the trainer's
    ``EPOCH_COMPLETED``, after validation."""
    run_state = {"best_checkpointer": best, "early_stopping": early_stopping}
    objects = {**trainer.checkpoint_objects(), **{k: v for k, v in run_state.items() if v is not None}}
    return Checkpoint(objects, CheckpointSaver(Path(run_dir).absolute() / "checkpoints"), filename_prefix="last",
                      n_saved=1)
