"""The run folder's ``log.csv`` (and TensorBoard scalars): :class:`EpochLog`, one row per epoch."""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path

import ignite.distributed as idist

from monai_multiad.outputs import atomic_path

__all__ = ["EpochLog", "previous_log_rows"]

logger = logging.getLogger("monai_multiad")


class EpochLog:
    """Ignite handler: one row per epoch (mean of each training loss, validation loss, seconds) in
    ``<run_dir>/log.csv`` and, when ``tensorboard`` is installed, as scalars in ``<run_dir>/tensorboard/``
    (MONAI's ``TensorBoardStatsHandler``, writing the row). Rank 0 writes; every rank keeps the rows
    (``best_val_loss`` of the summary).

    ``attach(trainer, validator)``: losses summed over the trainer's iterations, a row written when
    the epoch completes, with ``validator.state.metrics["val_loss"]``: attach it after the handler
    that runs the validation, so that the epoch's best checkpoint is written before its row."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.run_dir, self.tensorboard = Path(run_dir).absolute(), tensorboard
        self.rows: list[dict] = []
        self.sums: dict[str, tuple[float, int]] = {}  # loss -> (sum, iterations it was computed in)
        self.validator, self.tensorboard_stats, self.started = None, None, time.perf_counter()

    def attach(self, trainer, validator) -> None:
        from ignite.engine import Events
        from monai.utils import optional_import

        self.validator = validator
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self)
        if self.tensorboard and idist.get_rank() == 0 and optional_import("torch.utils.tensorboard")[1]:
            from monai.handlers import TensorBoardStatsHandler

            self.tensorboard_stats = TensorBoardStatsHandler(log_dir=str(self.run_dir / "tensorboard"),
                                                             iteration_log=False, epoch_event_writer=self._scalars)
            self.tensorboard_stats.attach(trainer)  # after the row is made

    def resume(self, log_file: Path, epochs: int) -> None:
        """Go on from a resumed run's ``log.csv``: its rows up to ``epochs`` (:func:`previous_log_rows`)."""
        self.rows = previous_log_rows(log_file, epochs)

    def _epoch_started(self, engine) -> None:
        self.sums, self.started = {}, time.perf_counter()

    def _iteration(self, engine) -> None:
        for k, v in engine.state.output.items():
            total, n = self.sums.get(k, (0.0, 0))
            if not math.isnan(v):  # a loss not computed this iteration (the discriminator's, d_update_every > 1)
                total, n = total + v, n + 1
            self.sums[k] = (total, n)

    def __call__(self, trainer) -> None:
        epoch = trainer.state.epoch
        row = {"epoch": epoch, **{k: total / n if n else float("nan") for k, (total, n) in self.sums.items()}}
        row.update(val_loss=self.validator.state.metrics["val_loss"],
                   seconds=round(time.perf_counter() - self.started, 2))
        self.rows.append(row)
        self.sums = {}
        if idist.get_rank() != 0:
            return
        with atomic_path(self.run_dir / "log.csv") as tmp, Path(tmp).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(self.rows)
        logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))

    def _scalars(self, trainer, writer) -> None:
        """``TensorBoardStatsHandler``'s epoch writer: the epoch's row, one scalar per column."""
        row = self.rows[-1]
        for k, v in row.items():
            if k != "epoch":
                writer.add_scalar(k, v, row["epoch"])
        writer.flush()

    def close(self) -> None:
        if self.tensorboard_stats is not None:
            self.tensorboard_stats.close()
            self.tensorboard_stats = None


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
