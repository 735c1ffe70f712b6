"""Building and running a Multi-AD experiment from a :class:`~monai_multiad.config.RunConfig`.

The one place where a training run is assembled. ``multiad train`` calls :func:`train`; the
bundles' ``train.json`` instantiates the same objects from JSON, each a ``_target_`` entry there:
the network, datasets and loaders (:mod:`monai_multiad.data.datasets`), optimisers and trainer
(:func:`build_network`, :func:`build_optimizer`, :func:`build_discriminator_optimizer`,
:func:`build_trainer`), the validation evaluator with its key metric and MONAI's ``ValidationHandler``
and ``EarlyStopHandler`` (:mod:`monai_multiad.engines.evaluator`), the run folder's handlers
(:class:`~monai_multiad.handlers.EpochLog`, :func:`~monai_multiad.handlers.best_checkpointer`,
:func:`~monai_multiad.handlers.last_checkpointer`), and calls the same steps:
:func:`attach_run_handlers`, :func:`resume_or_start`, :func:`run_training`, :func:`finish_run`.
So a CLI run and a bundle run write the same run folder.

What a run folder holds, how the model file is written and read, and how a run is resumed
into its folder: :mod:`monai_multiad.run_folder`.
"""

from __future__ import annotations

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
from ignite.handlers import Checkpoint
from monai.handlers import ValidationHandler
from monai.utils import set_determinism
from torch.utils.data import DataLoader, Dataset

from monai_multiad.config import RunConfig
from monai_multiad.data.datasets import build_datasets, build_loader, fixed_normals_loader
from monai_multiad.data.images import detect_layout
from monai_multiad.engines.batchnorm import set_batchnorm_momentum
from monai_multiad.engines.evaluator import (
    DistillationEvaluator,
    distillation_loss_metric,
    fit_fusion,
    fit_memory_bank,
)
from monai_multiad.engines.teacher_cache import TeacherFeatureCache
from monai_multiad.engines.trainer import MultiADTrainer
from monai_multiad.errors import MultiADInputError
from monai_multiad.outputs import write_json
from monai_multiad.transforms.anomaly import SyntheticAnomaly
from monai_multiad.transforms.volume import FG_THRESHOLD
from monai_multiad.networks import MultiAD
from monai_multiad.handlers import BatchNormRecalibration, EarlyStop, EpochLog, best_checkpointer, last_checkpointer
from monai_multiad.run_folder import (  # noqa: F401 - load_model, save_model: also importable from here
    adopt_checkpoints,
    clear_checkpoints,
    load_model,
    load_training_checkpoint,
    on_device,
    resolve_device,
    save_model,
    start_run_folder,
)

__all__ = [
    "resolve_device",
    "build_network",
    "build_optimizer",
    "build_discriminator_optimizer",
    "build_trainer",
    "attach_run_handlers",
    "resume_or_start",
    "run_training",
    "finish_run",
    "build_anomaly",
    "train_segmentation_head",
    "train",
    "load_model",
    "save_model",
]

logger = logging.getLogger("monai_multiad")


def build_network(cfg: RunConfig) -> MultiAD:
    """The network of ``cfg``, with the student's BatchNorm momentum and initialisation set."""
    network = MultiAD(**cfg.model_kwargs())
    if cfg.student_init == "teacher":  # same layout: copy the backbone, keep the student's own SE blocks
        network.student.net.load_state_dict(network.teacher.net.state_dict())
    set_batchnorm_momentum(network.student, cfg.bn_momentum)
    return network


#: the synthetic anomalies ``synthetic_anomalies=auto`` draws from: scans get lesion-like intensity
#: changes and patches of other slices inside the body, 2D images Perlin textures
AUTO_ANOMALIES = {"volumes": ["hyper", "hypo", "patch"], "images": ["texture"]}


def resolve_options(cfg: RunConfig) -> RunConfig:
    """Settle the options whose default depends on the data: ``foreground="auto"`` is on for
    volume folders and off for 2D images; ``synthetic_anomalies=auto`` is hyper, hypo and patch for
    volume folders, texture for 2D images. The run folder records the settled values."""
    if cfg.foreground != "auto" and "auto" not in cfg.synthetic_anomalies:
        return cfg
    layout = cfg.layout if cfg.layout != "auto" else detect_layout(Path(cfg.dataset_dir))
    kind = "volumes" if layout == "volumes" else "images"
    changes = {}
    if cfg.foreground == "auto":
        changes["foreground"] = "on" if kind == "volumes" else "off"
    if "auto" in cfg.synthetic_anomalies:
        changes["synthetic_anomalies"] = list(AUTO_ANOMALIES[kind])
    return dataclasses.replace(cfg, **changes)



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


def build_discriminator_optimizer(cfg: RunConfig, network: MultiAD) -> torch.optim.Optimizer | None:
    """Adam for the discriminator's parameters (``None`` without a discriminator)."""
    if network.discriminator is None:
        return None
    return torch.optim.Adam(network.discriminator.parameters(), lr=cfg.d_lr, betas=(0.5, 0.999))


def build_trainer(cfg: RunConfig, network: MultiAD, loader, device: torch.device,
                  optimizer: torch.optim.Optimizer | None = None, d_optimizer: torch.optim.Optimizer | None = None,
                  handlers: list | None = None, lr_scheduler="auto") -> MultiADTrainer:
    """The :class:`MultiADTrainer` of ``cfg``. The optimisers (built by :func:`build_optimizer` and
    :func:`build_discriminator_optimizer` when not given) are the bundles' ``train#optimizer`` and
    ``train#d_optimizer``; ``lr_scheduler`` is the bundles' ``train#lr_scheduler`` (stepped every
    iteration; ``None``: constant), by default :func:`build_scheduler`'s; ``handlers`` (the
    validation's ``ValidationHandler`` first) are attached as the trainer is built."""
    optimizer = optimizer if optimizer is not None else build_optimizer(cfg, network)
    if d_optimizer is None:
        d_optimizer = build_discriminator_optimizer(cfg, network)
    if isinstance(lr_scheduler, str) and lr_scheduler == "auto":
        lr_scheduler = build_scheduler(cfg, optimizer, len(loader))
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
        lr_scheduler=lr_scheduler,
        seed=cfg.seed,
        d_label_smoothing=cfg.d_label_smoothing,
        d_instance_noise=cfg.d_instance_noise,
        d_update_every=cfg.d_update_every,
        denoise_fraction=cfg.denoise_fraction,
        anomaly=build_anomaly(cfg),
        anomaly_foreground=anomaly_foreground(cfg),
        teacher_cache=TeacherFeatureCache(cfg.teacher_cache_mb << 20) if cfg.teacher_cache_mb > 0 else None,
        train_handlers=handlers,
    )


def attach_run_handlers(
    trainer: MultiADTrainer,
    evaluator: DistillationEvaluator,
    log: EpochLog,
    best: Checkpoint,
    last: Checkpoint,
    early_stopping: EarlyStop | None = None,
    max_steps: int = 0,
    progress: bool = False,
) -> None:
    """Wire a training run's handlers, as ``multiad train`` and the bundles' ``train.json`` both do.
    After each training epoch the trainer's ``ValidationHandler`` (one of its ``train_handlers``,
    :func:`build_trainer`) runs ``evaluator``, a
    :class:`~monai_multiad.engines.evaluator.DistillationEvaluator` (every rank, on every held-out
    normal; its ``val_loss`` metric is reduced across ranks, so early stopping and "best" agree);
    ``early_stopping`` counts and ``best`` saves on that key metric (rank 0); then ``log`` writes the
    epoch's row and ``last`` saves (rank 0). ``max_steps`` > 0 ends training after
    that many iterations; ``progress`` shows a bar on a terminal.

    A non-finite training loss ends the run with a ``FloatingPointError`` from the trainer's step
    (``MultiADTrainer._backward_step``), before any handler could see it."""
    rank0 = idist.get_rank() == 0
    log.attach(trainer, evaluator)  # the epoch's row once it is validated and its best checkpoint written
    if rank0:  # a SIGTERM while a checkpoint is written takes effect once it is written whole
        evaluator.add_event_handler(Events.COMPLETED, _uninterrupted(best))
        trainer.add_event_handler(Events.EPOCH_COMPLETED, _uninterrupted(last))  # after validation: this epoch's best
    if early_stopping is not None:
        early_stopping.attach(evaluator)
    if max_steps > 0:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=max_steps), lambda e: e.terminate())
    if progress and rank0 and sys.stderr.isatty():
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=lambda o: {"loss": o["loss"]})


def resume_or_start(resume: str | Path | None, last: Checkpoint, best: Checkpoint, log: EpochLog,
                    cfg: RunConfig) -> Path | None:
    """Before training: with ``resume`` (a checkpoint file or a run folder, whose newest
    ``last_checkpoint_*.pt`` is taken), load the trainer, networks, optimisers, the best-checkpoint
    record and the early-stopping count that ``last`` saves, go on with the resumed run's
    ``log.csv`` rows, and keep only the resumed and best checkpoints in this run's folder
    (:func:`~monai_multiad.run_folder.adopt_checkpoints`); without, remove an earlier run's
    checkpoints from the folder. Returns the checkpoint resumed from, or ``None``."""
    ckpt_dir = Path(last.save_handler.dirname)
    rank0 = idist.get_rank() == 0
    if not resume:
        if rank0:
            clear_checkpoints(ckpt_dir)
        return None
    run_state_keys = ("best_checkpointer", "early_stopping")
    to_save = {k: v for k, v in last.to_save.items() if k not in run_state_keys}
    run_state = {k: v for k, v in last.to_save.items() if k in run_state_keys}
    source = load_training_checkpoint(Path(resume), to_save, run_state, cfg)
    log.resume(source.parent.parent / "log.csv", to_save["trainer"].state.epoch)
    if rank0:
        adopt_checkpoints(source, ckpt_dir, last, best)
    return source


#: SIGTERM while a checkpoint is written: how many such handlers run now, and whether one came meanwhile
_deferral = {"depth": 0, "pending": False}


def _uninterrupted(handler):
    """``handler`` (a checkpoint) run with SIGTERM held back until it returns, so that the file is
    written whole and recorded (a signal arriving mid-write would also break torch's write, EINTR)."""
    def run(engine) -> None:
        _deferral["depth"] += 1
        try:
            handler(engine)
        finally:
            _deferral["depth"] -= 1
        if _deferral["pending"] and _deferral["depth"] == 0:
            _deferral["pending"] = False
            raise KeyboardInterrupt
    return run


def _sigterm(signum, frame) -> None:
    if _deferral["depth"]:
        _deferral["pending"] = True
    else:
        raise KeyboardInterrupt


def run_training(trainer: MultiADTrainer) -> bool:
    """Run the trainer; Ctrl-C or SIGTERM (a scheduler's time limit) ends training early, after
    which the run is finished from the best completed epoch (:func:`finish_run`). Records
    ``trainer.state.interrupted`` and ``trainer.state.train_seconds``; returns whether it was interrupted."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _sigterm)
        signal.siginterrupt(signal.SIGTERM, False)  # system calls under way resume rather than fail
    _deferral.update(depth=0, pending=False)
    t0 = time.perf_counter()
    interrupted = False
    try:
        trainer.run()
    except KeyboardInterrupt:
        logger.warning("training interrupted at epoch %d: finishing the run with the best completed epoch",
                       trainer.state.epoch)
        interrupted = True
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    trainer.state.interrupted, trainer.state.train_seconds = interrupted, time.perf_counter() - t0
    return interrupted


def build_anomaly(cfg: RunConfig) -> SyntheticAnomaly:
    """The synthetic anomalies of ``cfg`` (``synthetic_anomalies``, settled by :func:`resolve_options`)."""
    return SyntheticAnomaly([m for m in cfg.synthetic_anomalies if m != "auto"] or ["texture"], seed=cfg.seed)


def fusion_weighting(cfg: RunConfig) -> dict:
    """:func:`fit_fusion`'s weighting arguments for ``cfg``: ``fusion_weights`` and the synthetic anomalies
    (with the foreground limit of scans) that the ``"synthetic"`` weights are measured on."""
    return {"weights": cfg.fusion_weights, "anomaly": build_anomaly(cfg), "foreground_threshold": anomaly_foreground(cfg)}


def anomaly_foreground(cfg: RunConfig) -> float | None:
    """Where the synthetic anomalies of ``cfg`` may go: above the foreground threshold with the foreground
    mask on (scans), anywhere otherwise (``None``)."""
    return FG_THRESHOLD if cfg.foreground == "on" else None


def train_segmentation_head(cfg: RunConfig, network: MultiAD, train_ds: Dataset, device: torch.device,
                            fraction: float = 0.5, steps: int | None = None) -> float | None:
    """Train ``network``'s segmentation head (when it has one) for ``steps`` iterations (default
    ``cfg.segmentation_head_steps``) on ``train_ds``'s normal images, half of them with synthetic
    anomalies (Adam, lr 1e-3). Returns the mean loss of the last 20 iterations (``None`` without a head)."""
    steps = cfg.segmentation_head_steps if steps is None else int(steps)
    if network.segmentation_head is None or steps <= 0:
        return None
    from monai_multiad.engines.head_trainer import SegmentationHeadTrainer

    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                        generator=torch.Generator().manual_seed(cfg.seed), drop_last=len(train_ds) > cfg.batch_size)
    optimizer = torch.optim.Adam(network.segmentation_head.parameters(), lr=1e-3)
    trainer = SegmentationHeadTrainer(device, steps, loader, network, optimizer,
                                      build_anomaly(cfg), fraction, anomaly_foreground(cfg))
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["segmentation"]))
    trainer.run()
    network.eval()
    return round(sum(losses[-20:]) / len(losses[-20:]), 4)


def finish_run(cfg: RunConfig, trainer: MultiADTrainer, val_loader, run_dir: str | Path, best: Checkpoint,
               log: EpochLog, recalibration: BatchNormRecalibration, train_images: int) -> dict:
    """End a training run (after :func:`run_training`): load the best epoch's weights by validation
    loss (``best``; without one, re-estimate the BatchNorm statistics of the last), fit the fusion
    on the held-out normals of ``val_loader``, write ``model.pt`` and ``metrics.json`` (rank 0).
    Returns the summary, ``metrics.json``'s ``"training"``."""
    interrupted = bool(getattr(trainer.state, "interrupted", False))
    log.close()
    if interrupted and best.last_checkpoint is None:
        raise KeyboardInterrupt  # nothing completed: there is no model to finish with
    network, device = trainer.network, trainer.state.device
    if best.last_checkpoint is not None:  # the best epoch by validation loss, not the last one
        # Checkpoint.last_checkpoint already holds the DiskSaver folder: do not join it again
        Checkpoint.load_objects(best.to_save, torch.load(Path(best.last_checkpoint), map_location=device,
                                                         weights_only=True))
    else:
        recalibration()
    # the segmentation head and the memory bank (when the model has them) from the normal training
    # images, before the fusion that standardises their maps; the head never trains for more
    # iterations than the student did (a short run stays short)
    head_steps = 0 if network.segmentation_head is None else min(cfg.segmentation_head_steps,
                                                                 max(1, trainer.state.iteration))
    head_loss = train_segmentation_head(cfg, network, trainer.data_loader.dataset, device, steps=head_steps)
    bank = fit_memory_bank(network, recalibration.loader, device, seed=cfg.seed)
    fusion_stats = fit_fusion(network, val_loader, device, cfg.threshold_quantile, normalization=cfg.map_normalization,
                              **fusion_weighting(cfg))
    summary = {
        "epochs": trainer.state.epoch,
        "iterations": trainer.state.iteration,
        "best_val_loss": min((r["val_loss"] for r in log.rows), default=None),
        "best_checkpoint": Path(best.last_checkpoint).name if best.last_checkpoint is not None else None,
        "train_seconds": round(float(getattr(trainer.state, "train_seconds", 0.0)), 1),
        "interrupted": interrupted,
        "train_images": int(train_images),
        "val_images": len(val_loader.dataset),
        "device": _device_name(device),
        "fusion": fusion_stats,
        "memory_bank": bank,
        "segmentation_head_loss": head_loss,
        "segmentation_head_iterations": head_steps,
        "teacher_cache": _cache_summary(trainer.teacher_cache),
    }
    if idist.get_rank() == 0:
        run_dir = Path(run_dir)
        save_model(run_dir / "model.pt", network, cfg, fusion_stats)
        write_json(run_dir / "metrics.json", {"training": summary})
    return summary


def train(cfg: RunConfig, run_dir: str | Path, resume: str | Path | None = None, progress: bool = True) -> dict:
    """Train on the normal images of ``cfg.dataset_dir``, fit the fusion on the held-out normals,
    and write the run folder. Returns the training summary written to ``metrics.json``.

    The bundles' ``train.json`` builds the same objects, by the same builders, in the same order
    (each a ``_target_`` entry there): keep the two in step."""
    set_determinism(seed=cfg.seed)
    cfg = resolve_options(cfg)
    device = resolve_device(cfg.device)
    train_ds, val_ds = build_datasets(cfg, "train")
    if len(train_ds) == 0:
        raise MultiADInputError(f"{cfg.dataset_dir}: no normal training images")
    network = on_device(build_network(cfg), cfg, device)
    loader = build_loader(train_ds, cfg, shuffle=True)
    normals = fixed_normals_loader(train_ds, cfg)
    if cfg.feature_norm:
        fit_feature_statistics(network, normals)
    recalibration = BatchNormRecalibration(network, normals, cfg.bn_recalibrate, device)
    # every rank validates and fits the fusion on all held-out normals (not a DistributedSampler shard)
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    evaluator = DistillationEvaluator(device, val_loader, network, {"val_loss": distillation_loss_metric()},
                                      val_handlers=[recalibration])
    trainer = build_trainer(cfg, network, loader, device, handlers=[ValidationHandler(1, evaluator)])
    run_dir = start_run_folder(run_dir, cfg)

    early_stopping = None
    if cfg.early_stop_patience > 0:
        early_stopping = EarlyStop(cfg.early_stop_patience, Checkpoint.get_default_score_fn("val_loss", -1.0),
                                   trainer, min_delta=1e-4)
    best = best_checkpointer(trainer, run_dir)
    last = last_checkpointer(trainer, run_dir, best, early_stopping)
    log = EpochLog(run_dir)
    attach_run_handlers(trainer, evaluator, log, best, last, early_stopping, cfg.max_steps, progress)
    resume_or_start(resume, last, best, log, cfg)
    run_training(trainer)
    return finish_run(cfg, trainer, val_loader, run_dir, best, log, recalibration, len(train_ds))


def _cache_summary(cache: TeacherFeatureCache | None) -> dict | None:
    """What the teacher's feature cache did in the run (``metrics.json``): images held, hits, misses, MiB."""
    if cache is None:
        return None
    return {"images": len(cache), "hits": cache.hits, "misses": cache.misses, "mib": round(cache.nbytes / 2**20, 1)}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
