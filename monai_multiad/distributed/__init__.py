"""Several processes with ``ignite.distributed``: data-parallel training
(:func:`monai_multiad.workflow.train`: DistributedDataParallel student and discriminator, sharded
training batches) and cohort screening (:func:`monai_multiad.cohort.screen_paths`: the scans sharded).

Two ways to start either, with the same options as ``multiad train`` / ``multiad screen``:

* spawned from one process: ``multiad train DATASET --run-dir RUN --nproc N`` or
  :func:`train_distributed` (``python -m monai_multiad.distributed DATASET --run-dir RUN --nproc N``);
  ``multiad screen SCANS --run RUN --out OUT --nproc N`` or :func:`screen_distributed`;
* under torchrun (also several nodes)::

      torchrun --nproc_per_node=N -m monai_multiad.distributed DATASET --run-dir RUN [multiad train options]
      torchrun --nproc_per_node=N -m monai_multiad.distributed screen SCANS --run RUN --out OUT [options]

  each process then joins the group torchrun describes in its environment (``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``...) through ``idist.Parallel(backend=...)`` (:func:`torchrun_group`).

This module is the process-group machinery; the command lines are the CLI's:
``python -m monai_multiad.distributed`` (``__main__.py``) runs :func:`monai_multiad.cli.distributed_main`,
which parses them with ``multiad``'s own parser and tells torchrun's processes from a spawning one.

The backend is ``nccl`` when CUDA has a GPU per process, else ``gloo`` (CPU). ``cfg.batch_size``
is the global batch: ``idist.auto_dataloader`` gives each of the N processes ``batch_size // N``.
Rank 0 writes the run folder and its summary is the one returned / printed. Screening: each rank
screens every N-th scan left to do, on its own GPU with nccl; rank 0 writes the one report (on several
nodes ``--out`` must be on a file system they all see).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import ignite.distributed as idist
import torch

from monai_multiad.allocator import keep_freed_memory
from monai_multiad.config import RunConfig
from monai_multiad.errors import MultiADInputError, OutputWriteError
from monai_multiad.outputs import folder_lock

__all__ = ["default_backend", "train_distributed", "screen_distributed", "torchrun_group", "rank_options"]

logger = logging.getLogger("monai_multiad")


def default_backend(nproc: int, device: str = "auto") -> str:
    """``"nccl"`` when CUDA has at least ``nproc`` GPUs (and ``device`` is not ``"cpu"``), else ``"gloo"``."""
    if (
        device != "cpu"
        and torch.cuda.is_available()
        and torch.cuda.device_count() >= nproc
        and "nccl" in idist.available_backends()
    ):
        return "nccl"
    return "gloo"


def _free_port() -> int:
    """A TCP port free now on this host, for the spawned group's rendezvous (not the fixed 2222)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO


def _quiet_launcher(verbose: bool) -> None:
    """Without ``-v``, ``idist.Parallel``'s own INFO lines (group set up, spawn parameters) are not shown: a
    filter on its logger, which ``ignite.utils.setup_logger`` resets to INFO on every start."""
    launcher = logging.getLogger("ignite.distributed.launcher.Parallel")
    if not verbose and not any(isinstance(f, _DropInfo) for f in launcher.filters):
        launcher.addFilter(_DropInfo())


def _setup_rank(verbose: bool = False) -> None:
    """Per-process logging (rank 0 logs the epochs), CPU threads shared among local processes, and freed CPU
    memory kept for the next batch as in the process that spawned this one (:mod:`monai_multiad.allocator`)."""
    keep_freed_memory()
    rank0 = idist.get_rank() == 0
    logging.basicConfig(level=logging.INFO if verbose and rank0 else logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO if rank0 else logging.WARNING)
    if idist.backend() == "gloo" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(idist.get_nproc_per_node(), 1)))


def _worker(
    local_rank: int, cfg: dict, run_dir: str, resume: str | None, summary_file: str, error_file: str, verbose: bool
) -> None:
    """One spawned process: train, then rank 0 writes its summary where the parent reads it."""
    from monai_multiad.workflow import train

    _setup_rank(verbose)
    with _reported(error_file):
        summary = train(RunConfig.from_dict(cfg), run_dir, resume=resume)
    if idist.get_rank() == 0:
        Path(summary_file).write_text(json.dumps(summary))


@contextmanager
def _reported(error_file: str):
    """A rank's input error (or unwritable output) is written where the parent reads it, then raised."""
    try:
        yield
    except (MultiADInputError, OutputWriteError) as e:
        kind = "output" if isinstance(e, OutputWriteError) else "input"
        Path(error_file).write_text(json.dumps({"kind": kind, "message": e.strerror if kind == "output" else str(e),
                                                "errno": getattr(e, "errno", None)}))
        raise


def _spawn(worker, nproc: int, backend: str | None, device: str, args: tuple, error_file: Path, what: str,
           verbose: bool = False) -> None:
    """Run ``worker(local_rank, *args)`` in ``nproc`` processes of one ``backend`` group; a rank's input
    error comes back as the :class:`MultiADInputError` (or :class:`OutputWriteError`) it raised."""
    backend = backend or default_backend(nproc, device)
    if backend not in idist.available_backends():
        raise MultiADInputError(f"backend {backend!r} is not available here: {', '.join(idist.available_backends())}")
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise MultiADInputError(f"{nproc} processes with nccl need {nproc} GPUs, found {torch.cuda.device_count()}")
    _quiet_launcher(verbose)
    try:
        with idist.Parallel(backend=backend, nproc_per_node=nproc, master_port=_free_port()) as parallel:
            parallel.run(worker, *args)
    except Exception as e:
        if error_file.is_file():
            error = json.loads(error_file.read_text())
            if error["kind"] == "output":
                raise OutputWriteError(error["errno"], error["message"]) from None
            raise MultiADInputError(error["message"]) from None
        raise RuntimeError(f"distributed {what} failed ({type(e).__name__}): {e}") from e


def train_distributed(
    cfg: RunConfig,
    run_dir: str | Path,
    nproc: int,
    resume: str | Path | None = None,
    backend: str | None = None,
    verbose: bool = False,
) -> dict:
    """Train with ``nproc`` spawned processes (``idist.Parallel(backend, nproc_per_node=nproc)``).

    Args:
        cfg: the run's options (``batch_size`` is the global batch).
        run_dir: the run folder, written by rank 0 as :func:`~monai_multiad.workflow.train` does.
        nproc: processes on this machine (one per GPU with nccl); 1 trains in this process.
        resume: a run folder or checkpoint to continue from (every rank loads it).
        backend: ``"gloo"`` or ``"nccl"``; ``None``: :func:`default_backend`.
        verbose: rank 0 logs at INFO level (as ``multiad -v``); epochs are logged either way.

    Returns:
        Rank 0's training summary (what ``metrics.json`` holds under ``"training"``).

    Raises:
        MultiADInputError: a rank's input error (dataset, options), re-raised here with its message.
    """
    if nproc < 1:
        raise MultiADInputError(f"nproc must be at least 1, got {nproc}")
    if nproc == 1 and backend is None:
        from monai_multiad.workflow import train

        return train(cfg, run_dir, resume=resume)
    with tempfile.TemporaryDirectory(prefix="multiad_ddp_") as tmp:
        summary_file, error_file = Path(tmp) / "summary.json", Path(tmp) / "error.json"
        args = (cfg.to_dict(), str(run_dir), None if resume is None else str(resume), str(summary_file),
                str(error_file), verbose)
        _spawn(_worker, nproc, backend, cfg.device, args, error_file, "training", verbose)
        if not summary_file.is_file():
            raise RuntimeError("distributed training ended without rank 0's summary")
        return json.loads(summary_file.read_text())


def rank_options(options: dict) -> dict:
    """Screening options (:func:`~monai_multiad.cohort.screen_paths`'s) for this rank: with nccl, its own GPU (unless a device was named)."""
    if idist.backend() == "nccl" and options.get("device", "auto") in ("auto", "cuda", None):
        return {**options, "device": str(idist.device())}
    return options


def _screen_worker(local_rank: int, run: str, scans: list[str], out_dir: str, options: dict, rows_file: str,
                   error_file: str, verbose: bool) -> None:
    """One spawned process: screen this rank's share; rank 0 writes the rows where the parent reads them."""
    from monai_multiad.cohort import screen_paths

    _setup_rank(verbose)
    with _reported(error_file):
        rows = screen_paths(run, scans, out_dir, **rank_options(options))
    if idist.get_rank() == 0:
        Path(rows_file).write_text(json.dumps(rows))


def screen_distributed(run: str | Path, scans: list[str | Path], out_dir: str | Path, nproc: int,
                       backend: str | None = None, verbose: bool = False, **options) -> list[dict]:
    """Screen ``scans`` with ``nproc`` spawned processes (``idist.Parallel(backend, nproc_per_node=nproc)``),
    each taking every ``nproc``-th scan left to do; rank 0 writes ``report.csv``/``report.json``/``report.html``
    as one process would (:func:`monai_multiad.cohort.screen_paths`, which gets ``options``: device,
    modality, window, series_uid, batch_size, top_k, resume, progress...). ``nproc`` 1 screens in this
    process. Returns the report's rows."""
    from monai_multiad.cohort import screen_paths

    if nproc < 1:
        raise MultiADInputError(f"nproc must be at least 1, got {nproc}")
    if nproc == 1 and backend is None:
        return screen_paths(run, scans, out_dir, **options)
    with tempfile.TemporaryDirectory(prefix="multiad_screen_") as tmp:
        rows_file, error_file = Path(tmp) / "rows.json", Path(tmp) / "error.json"
        args = (str(run), [str(s) for s in scans], str(out_dir), options, str(rows_file), str(error_file), verbose)
        _spawn(_screen_worker, nproc, backend, options.get("device") or "auto", args, error_file, "screening",
               verbose)
        if not rows_file.is_file():
            raise RuntimeError("distributed screening ended without rank 0's report")
        return json.loads(rows_file.read_text())


@contextmanager
def torchrun_group(folder: Path, command: str, device: str, verbose: bool = False):
    """Under torchrun: join the group its environment describes (``RANK``, ``WORLD_SIZE``...), rank 0
    holding ``folder`` for the group (the other ranks do not write there); yields ``(rank, world_size)``."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    lock = folder_lock(folder, f"{command} (torchrun)") if os.environ["RANK"] == "0" else nullcontext()
    _quiet_launcher(verbose)
    with lock, idist.Parallel(backend=default_backend(local_world, device)):
        _setup_rank(verbose)
        yield idist.get_rank(), idist.get_world_size()
