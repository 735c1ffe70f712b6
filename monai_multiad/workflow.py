"""Building and running a Multi-AD experiment from a :class:`~monai_multiad.config.RunConfig`.

The one place where datasets, the network, the engines and their handlers are put together:
the CLI calls :func:`train`, and the bundles' configs reach the same builders
(:func:`build_network`, :func:`build_datasets`, :func:`build_trainer`).

What a run folder holds, how the model file is written and read, and how a run is resumed
into its folder: :mod:`monai_multiad.run_folder`.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint, EarlyStopping, TerminateOnNan
from monai.utils import set_determinism
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from monai_multiad.config import RunConfig
from monai_multiad.engines.batchnorm import BatchNormRecalibration, set_batchnorm_momentum
from monai_multiad.engines.evaluator import fit_fusion, validation_loss
from monai_multiad.engines.trainer import MultiADTrainer
from monai_multiad.errors import MultiADInputError
from monai_multiad.io import write_json
from monai_multiad.networks import MultiAD
from monai_multiad.run_folder import (  # noqa: F401 - load_model, save_model: also importable from here
    CheckpointSaver,
    adopt_checkpoints,
    clear_checkpoints,
    load_model,
    load_training_checkpoint,
    previous_log_rows,
    save_model,
)

__all__ = [
    "resolve_device",
    "build_network",
    "build_datasets",
    "build_loader",
    "build_trainer",
    "train",
    "load_model",
    "save_model",
]

logger = logging.getLogger("monai_multiad")


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


def build_network(cfg: RunConfig) -> MultiAD:
    """The network of ``cfg``, with the student's BatchNorm momentum and initialisation set."""
    network = MultiAD(**cfg.model_kwargs())
    if cfg.student_init == "teacher":  # same layout: copy the backbone, keep the student's own SE blocks
        network.student.net.load_state_dict(network.teacher.net.state_dict())
    set_batchnorm_momentum(network.student, cfg.bn_momentum)
    return network


def resolve_options(cfg: RunConfig) -> RunConfig:
    """Settle the options whose default depends on the data: ``foreground="auto"`` is on for
    volume folders and off for 2D images. The run folder records the settled value."""
    if cfg.foreground != "auto":
        return cfg
    layout = cfg.layout if cfg.layout != "auto" else _detect_layout(Path(cfg.dataset_dir))
    return dataclasses.replace(cfg, foreground="on" if layout == "volumes" else "off")


def build_datasets(cfg: RunConfig, split: str = "train") -> Dataset | tuple[Dataset, Dataset]:
    """``split="train"``: (train, validation) datasets of normal images; ``"test"``: the test set.

    Image layouts (MVTec AD, BMAD) come from :mod:`monai_multiad.data.images`; volume folders
    from :mod:`monai_multiad.data.volumes` (normal slices for training).
    """
    root = Path(cfg.dataset_dir)
    layout = cfg.layout
    if layout == "auto":
        layout = _detect_layout(root)
    if layout == "volumes":
        from monai_multiad.data.volumes import volume_slice_datasets

        return volume_slice_datasets(cfg, split)
    from monai_multiad.data.images import AnomalyImageDataset, samples_for, split_normals

    size, ch = cfg.image_size, cfg.in_channels
    if split == "train":
        train, val = split_normals(samples_for(root, "train", layout), fraction=cfg.val_fraction, seed=cfg.seed)
        if not val:
            raise MultiADInputError(f"{root}: too few normal training images to hold out a validation set")
        return AnomalyImageDataset(train, size, ch, cache=True), AnomalyImageDataset(val, size, ch, cache=True)
    return AnomalyImageDataset(samples_for(root, split, layout), size, ch)


def _detect_layout(root: Path) -> str:
    from monai_multiad.data.images import detect_layout

    if not root.is_dir():
        raise MultiADInputError(f"{root}: dataset folder not found")
    if (root / "splits.json").is_file():
        return "volumes"
    if any(p.name.lower().endswith((".nii", ".nii.gz")) for p in [*root.glob("*"), *root.glob("*/*")]):
        return "volumes"
    return detect_layout(root)


class EpochShuffleSampler(Sampler[int]):
    """Indices ``0..n-1`` in an order that depends only on ``seed`` and the epoch (``set_epoch``,
    as ``DistributedSampler``; the trainer calls it when an epoch starts). The order is drawn when
    iteration begins, from a generator of its own, so a run resumed at epoch N sees the batches
    the uninterrupted run saw (``RandomSampler`` draws from the loader's generator, whose state
    depends on how many epochs this process has run)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(self.n, generator=g).tolist()


def build_loader(dataset: Dataset, cfg: RunConfig, shuffle: bool) -> DataLoader:
    """A loader that shards across ranks under ``ignite.distributed`` (``idist.auto_dataloader``);
    in one process, shuffled by :class:`EpochShuffleSampler`."""
    kwargs = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, drop_last=False)
    if idist.get_world_size() > 1:
        return idist.auto_dataloader(dataset, shuffle=shuffle, **kwargs)
    g = torch.Generator().manual_seed(cfg.seed)  # worker seeds
    sampler = EpochShuffleSampler(len(dataset), cfg.seed) if shuffle else None
    return DataLoader(dataset, sampler=sampler, generator=g, pin_memory=torch.cuda.is_available(), **kwargs)


def build_optimizer(cfg: RunConfig, network: MultiAD) -> torch.optim.Optimizer:
    params = network.student.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-iteration schedule: ``None`` (constant) or 5 % linear warm-up then cosine decay to 0
    over the run's iterations (``max_steps`` when set, else ``epochs`` x batches per epoch)."""
    if cfg.lr_schedule == "constant":
        return None
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * max(steps_per_epoch, 1)
    warmup = max(1, int(0.05 * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fixed_normals_loader(train_ds: Dataset, cfg: RunConfig) -> DataLoader:
    """The normal training images in one fixed random order (by ``cfg.seed``): what the teacher's
    feature statistics and the student's BatchNorm re-estimation are computed on. Random, so the
    first few hundred images span the data set (a volume folder lists its slices case by case);
    fixed, so a resumed run computes the same."""
    order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return DataLoader(Subset(train_ds, order), batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)


def fit_feature_statistics(network: MultiAD, loader, max_images: int = 512) -> None:
    """Teacher channel statistics of the first ``max_images`` normal images (``feature_norm``)."""
    device = next(network.parameters()).device

    def batches():
        seen = 0
        for batch in loader:
            if seen >= max_images:
                return
            images = batch["image"][: max_images - seen]
            seen += images.shape[0]
            yield images.to(device)

    network.set_feature_statistics(batches())


def build_trainer(cfg: RunConfig, network: MultiAD, loader, device: torch.device) -> MultiADTrainer:
    optimizer = build_optimizer(cfg, network)
    d_optimizer = None
    if network.discriminator is not None:
        d_optimizer = torch.optim.Adam(network.discriminator.parameters(), lr=cfg.d_lr, betas=(0.5, 0.999))
    return MultiADTrainer(
        device=device,
        max_epochs=cfg.epochs,
        train_data_loader=loader,
        network=network,
        optimizer=optimizer,
        d_optimizer=d_optimizer,
        adversarial_weight=cfg.adversarial_weight,
        amp=cfg.amp,
        hard_mining=cfg.hard_mining,
        stage_weights=cfg.loss_stage_weights,
        augment_flips=cfg.augment_flips,
        lr_scheduler=build_scheduler(cfg, optimizer, len(loader)),
        seed=cfg.seed,
    )


class _EpochLog:
    """Per-epoch mean losses and validation loss -> ``log.csv`` (and TensorBoard when installed)."""

    def __init__(self, path: Path, tensorboard_dir: Path | None) -> None:
        self.path, self.sums, self.rows = path, {}, []
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                pass

    def iteration(self, engine) -> None:
        for k, v in engine.state.output.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.sums["_n"] = self.sums.get("_n", 0) + 1

    def epoch(self, engine, val_loss: float, seconds: float) -> None:
        n = max(self.sums.pop("_n", 1), 1)
        row = {"epoch": engine.state.epoch, **{k: v / n for k, v in self.sums.items()}}
        row.update(val_loss=val_loss, seconds=round(seconds, 2))
        self.rows.append(row)
        self.sums = {}
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(self.rows)
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch":
                    self.writer.add_scalar(k, v, engine.state.epoch)
        logger.info("epoch %d: %s", engine.state.epoch, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))


def train(cfg: RunConfig, run_dir: str | Path, resume: str | Path | None = None, progress: bool = True) -> dict:
    """Train on the normal images of ``cfg.dataset_dir``, fit the fusion on the held-out normals,
    and write the run folder. Returns the training summary written to ``metrics.json``."""
    run_dir = Path(run_dir).absolute()  # Ignite's checkpoint paths include this folder: one absolute root
    rank0 = idist.get_rank() == 0
    set_determinism(seed=cfg.seed)
    cfg = resolve_options(cfg)
    device = resolve_device(cfg.device)
    train_ds, val_ds = build_datasets(cfg, "train")
    if len(train_ds) == 0:
        raise MultiADInputError(f"{cfg.dataset_dir}: no normal training images")
    network = build_network(cfg).to(device)
    loader = build_loader(train_ds, cfg, shuffle=True)
    normals = fixed_normals_loader(train_ds, cfg)
    if cfg.feature_norm:
        fit_feature_statistics(network, normals)
    recalibrate = BatchNormRecalibration(network, normals, cfg.bn_recalibrate, device)

    # every rank validates and fits the fusion on all held-out normals (not a DistributedSampler shard)
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    trainer = build_trainer(cfg, network, loader, device)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", cfg.to_dict())

    to_save = trainer.checkpoint_objects()
    ckpt_dir = run_dir / "checkpoints"
    val_engine = validation_loss(network, device)
    if idist.get_world_size() > 1:  # one val loss on all ranks: early stopping and "best" agree
        val_engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(
            val_loss=float(idist.broadcast(e.state.metrics["val_loss"], src=0))))
    best_objects = {k: v for k, v in to_save.items() if k in ("student", "discriminator")}
    best = Checkpoint(
        best_objects,
        CheckpointSaver(ckpt_dir),
        filename_prefix="best",
        # one name whatever the objects (Ignite names a lone object's file after its key)
        filename_pattern="{filename_prefix}_checkpoint_{global_step}_{score_name}={score}.{ext}",
        score_function=lambda e: -e.state.metrics["val_loss"],
        score_name="neg_val_loss",
        n_saved=1,
        global_step_transform=lambda *_: trainer.state.epoch,
    )
    early_stopping = None
    if cfg.early_stop_patience > 0:
        early_stopping = EarlyStopping(cfg.early_stop_patience, lambda e: -e.state.metrics["val_loss"], trainer,
                                       min_delta=1e-4)
    # the last checkpoint also holds which file is the best so far and the early-stopping count,
    # so that a resumed run compares its epochs with those before the interruption
    run_state = {"best_checkpointer": best, **({"early_stopping": early_stopping} if early_stopping else {})}
    last = Checkpoint({**to_save, **run_state}, CheckpointSaver(ckpt_dir), filename_prefix="last", n_saved=1)
    log = _EpochLog(run_dir / "log.csv", run_dir / "tensorboard" if rank0 else None)
    epoch_start = [time.perf_counter()]
    trainer.add_event_handler(Events.ITERATION_COMPLETED, TerminateOnNan(output_transform=lambda o: o["loss"]))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, log.iteration)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epoch_start.__setitem__(0, time.perf_counter()))

    @trainer.on(Events.EPOCH_COMPLETED)
    def _validate(engine) -> None:
        val_engine.run(val_loader)
        if rank0:
            log.epoch(engine, val_engine.state.metrics["val_loss"], time.perf_counter() - epoch_start[0])

    recalibrate.attach(val_engine)  # eval mode must see the student that was trained (BatchNorm statistics)
    if rank0:
        val_engine.add_event_handler(Events.COMPLETED, best)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, last)
    if early_stopping is not None:
        val_engine.add_event_handler(Events.COMPLETED, early_stopping)
    if cfg.max_steps > 0:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=cfg.max_steps), lambda e: e.terminate())
    if progress and rank0 and sys.stderr.isatty():
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=lambda o: {"loss": o["loss"]})
    if resume is not None:
        source = load_training_checkpoint(Path(resume), to_save, run_state, cfg)
        if rank0:
            log.rows = previous_log_rows(source.parent.parent / "log.csv", trainer.state.epoch)
            adopt_checkpoints(source, ckpt_dir, last, best)
    elif rank0:
        clear_checkpoints(ckpt_dir)

    t0 = time.perf_counter()
    interrupted = _run_interruptibly(trainer)
    train_seconds = time.perf_counter() - t0
    if interrupted and best.last_checkpoint is None:
        raise KeyboardInterrupt  # nothing completed: there is no model to finish with
    if best.last_checkpoint is not None:  # the best epoch by validation loss, not the last one
        # Checkpoint.last_checkpoint already holds the DiskSaver folder: do not join it again
        Checkpoint.load_objects(best_objects, torch.load(Path(best.last_checkpoint), map_location=device,
                                                         weights_only=True))
    else:
        recalibrate()
    fusion_stats = fit_fusion(network, val_loader, device, cfg.threshold_quantile, normalization=cfg.map_normalization)
    summary = {
        "epochs": trainer.state.epoch,
        "iterations": trainer.state.iteration,
        "best_val_loss": min((r["val_loss"] for r in log.rows), default=None),
        "train_seconds": round(train_seconds, 1),
        "interrupted": interrupted,
        "train_images": len(train_ds),
        "val_images": len(val_ds),
        "device": _device_name(device),
        "fusion": fusion_stats,
    }
    if rank0:
        save_model(run_dir / "model.pt", network, cfg, fusion_stats)
        write_json(run_dir / "metrics.json", {"training": summary})
    return summary


def _run_interruptibly(trainer: MultiADTrainer) -> bool:
    """Run the trainer; Ctrl-C or SIGTERM (a scheduler's time limit) ends training early, after
    which the run is finished from the best completed epoch. Returns whether it was interrupted."""
    def _sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        trainer.run()
        return False
    except KeyboardInterrupt:
        logger.warning("training interrupted at epoch %d: finishing the run with the best completed epoch",
                       trainer.state.epoch)
        return True
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
