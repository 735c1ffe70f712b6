"""Ignite handlers, one a file, as ``monai.handlers`` keeps them: what a training run or an evaluation
attaches to its engines (the run folder's checkpoints and log, BatchNorm re-estimation, early stopping, the
per-image score rows of an evaluation, the scores an inference config writes)."""

from monai_multiad.handlers.batchnorm_recalibration import BatchNormRecalibration
from monai_multiad.handlers.checkpoint_saver import BEST_OBJECTS, CheckpointSaver, best_checkpointer, last_checkpointer
from monai_multiad.handlers.early_stop import EarlyStop
from monai_multiad.handlers.epoch_log import EpochLog, previous_log_rows
from monai_multiad.handlers.score_rows import ScoreRows
from monai_multiad.handlers.score_writer import ScoreWriter

__all__ = ["BEST_OBJECTS", "BatchNormRecalibration", "CheckpointSaver", "EarlyStop", "EpochLog", "ScoreRows",
           "ScoreWriter", "best_checkpointer", "last_checkpointer", "previous_log_rows"]
