"""The Multi-AD trainer: a MONAI ``Trainer`` (an Ignite engine) whose iteration takes the
student's distillation + adversarial step and then the discriminator's step, with two optimizers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Events
from monai.engines import Trainer

from monai_multiad.losses import AdversarialLoss, DiscriminatorLoss, DistillationLoss
from monai_multiad.engines.teacher_cache import TeacherFeatureCache
from monai_multiad.networks import MultiAD
from monai_multiad.transforms.anomaly import SyntheticAnomaly, corrupt_batch

__all__ = ["MultiADTrainer", "prepare_image_batch"]


def prepare_image_batch(batchdata: Any, device: torch.device, non_blocking: bool = False, **kwargs):
    """Take the ``"image"`` of a dict batch (or the first item of a sequence) onto ``device``."""
    images = batchdata["image"] if isinstance(batchdata, dict) else batchdata[0]
    return torch.as_tensor(images).to(device, non_blocking=non_blocking, **kwargs), None


def random_flips(images: torch.Tensor) -> torch.Tensor:
    """Each image of a (B, C, H, W) batch flipped left-right and, independently, up-down with p = 0.5."""
    b = images.shape[0]
    lr = torch.rand(b, device=images.device) < 0.5
    ud = torch.rand(b, device=images.device) < 0.5
    images = torch.where(lr.view(b, 1, 1, 1), images.flip(-1), images)
    return torch.where(ud.view(b, 1, 1, 1), images.flip(-2), images)


class MultiADTrainer(Trainer):
    """Knowledge distillation with an adversarial discriminator on normal images.

    Per batch: (1) the student minimises ``sum_k w_k (1 - cos(F_Tk, F_Sk))`` plus
    ``adversarial_weight`` times the BCE that makes the discriminator call its stage-4 features
    real; (2) the discriminator minimises BCE(teacher = real, student = fake). With
    ``adversarial_weight == 0`` or no discriminator, step (2) is skipped.

    Under ``ignite.distributed`` with several processes, the student and discriminator are
    wrapped in ``DistributedDataParallel`` (``idist.auto_model``) so gradients are averaged
    across ranks; the teacher is frozen and needs no wrapping.

    Args:
        device: where to train.
        max_epochs: epochs.
        train_data_loader: batches of dicts with ``"image"`` (B, C, H, W) in [0, 1].
        network: the :class:`MultiAD` model.
        optimizer: optimizer of the student's parameters.
        d_optimizer: optimizer of the discriminator's parameters (``None`` without discriminator).
        adversarial_weight: weight of the student's adversarial term.
        stage_weights: weights of the per-stage distillation losses.
        amp: mixed precision (used on CUDA only).
        hard_mining: distil only the hardest positions (see :func:`monai_multiad.losses.distillation_losses`).
        lr_scheduler: stepped after every student update (per iteration), when given.
        augment_flips: flip each training image left-right and up-down at random (teacher and
            student see the same flipped image); for textures and parts with no preferred orientation.
        seed: when given, every epoch starts by seeding torch's random generator and the loader's
            generator from ``(seed, epoch)`` and calling its sampler's ``set_epoch``: an epoch's
            batches, flips and dropout depend only on the seed and the epoch number, so a run resumed
            from epoch N's checkpoint repeats what the uninterrupted run did from there (``None``: the
            generators run on).
        d_label_smoothing, d_instance_noise: the discriminator's balancing levers (see
            :class:`monai_multiad.losses.DiscriminatorLoss`).
        d_update_every: the discriminator is updated on every this-many-th iteration only.
        denoise_fraction: share of each batch's images the student sees with a synthetic anomaly
            (``anomaly``) while the teacher sees the clean image: the student learns to output the
            teacher's features of the normal image (a denoising student, as DeSTSeg), so it does not
            learn to imitate anomalies. 0 = off.
        anomaly: the :class:`~monai_multiad.transforms.anomaly.SyntheticAnomaly` that corrupts them.
        anomaly_foreground: keep the anomalies where the image is brighter than this (scans); ``None`` = anywhere.
        teacher_cache: a :class:`~monai_multiad.engines.teacher_cache.TeacherFeatureCache` that keeps the
            teacher's features of each training image (named by the batch's ``"path"``): filled when the run
            starts, in the data set's order (so a resumed run reads the same features as the uninterrupted
            one), and read in every epoch; not used with ``augment_flips`` (the teacher's input changes) or
            for batches without ``"path"``.
        other arguments: as ``monai.engines.Trainer``.

    The engine's output per iteration is a dict of floats: ``loss`` (the student's total),
    ``distillation``, ``adversarial``, ``discriminator`` (NaN on the iterations ``d_update_every``
    skips; ``log.csv``'s epoch mean leaves those out).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader,
        network: MultiAD,
        optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer | None = None,
        adversarial_weight: float = 0.1,
        stage_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = prepare_image_batch,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        hard_mining: float = 0.0,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        augment_flips: bool = False,
        seed: int | None = None,
        d_label_smoothing: float = 0.0,
        d_instance_noise: float = 0.0,
        d_update_every: int = 1,
        denoise_fraction: float = 0.0,
        anomaly: SyntheticAnomaly | None = None,
        anomaly_foreground: float | None = None,
        teacher_cache: TeacherFeatureCache | None = None,
    ) -> None:
        device = torch.device(device)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            amp=amp and device.type == "cuda",
            decollate=False,
        )
        self.network = network.to(device)
        self.optimizer = optimizer
        self.d_optimizer = d_optimizer
        self.adversarial_weight = float(adversarial_weight)
        self.use_discriminator = network.discriminator is not None and d_optimizer is not None and adversarial_weight > 0
        self.lr_scheduler = lr_scheduler
        self.augment_flips = bool(augment_flips)
        self.distillation_loss = DistillationLoss(stage_weights, hard_mining=hard_mining)
        self.adversarial_loss = AdversarialLoss(instance_noise=d_instance_noise)
        self.discriminator_loss = DiscriminatorLoss(label_smoothing=d_label_smoothing, instance_noise=d_instance_noise)
        self.d_update_every = int(d_update_every)
        self.denoise_fraction = float(denoise_fraction)
        self.anomaly = anomaly if anomaly is not None else SyntheticAnomaly(seed=seed if seed is not None else 0)
        self.anomaly_seed = int(seed if seed is not None else 0)
        self.anomaly_foreground = anomaly_foreground
        self.teacher_cache = None if self.augment_flips else teacher_cache
        distributed = idist.get_world_size() > 1
        self.student = idist.auto_model(network.student, sync_bn=False) if distributed else network.student
        self.discriminator = network.discriminator
        if distributed and self.use_discriminator:
            self.discriminator = idist.auto_model(network.discriminator, sync_bn=False)
        self.seed = seed
        if seed is not None:
            self.add_event_handler(Events.EPOCH_STARTED, self._seed_epoch)
        if self.teacher_cache is not None:
            self.add_event_handler(Events.STARTED, self._fill_teacher_cache)

    def _fill_teacher_cache(self, engine: MultiADTrainer) -> None:
        # the data set in its own order and the loader's batch size, the same in a run and in its resumption
        dataset = getattr(engine.data_loader, "dataset", None)
        if dataset is None or len(engine.teacher_cache):
            return
        loader = torch.utils.data.DataLoader(dataset, batch_size=getattr(engine.data_loader, "batch_size", None) or 16,
                                             shuffle=False, num_workers=0)
        net = engine.network
        for batchdata in loader:
            if not isinstance(batchdata, dict) or "path" not in batchdata:
                return
            images, _ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
            held = len(engine.teacher_cache)
            with engine._autocast():
                engine.teacher_cache.features(batchdata["path"], images, net.teacher_features)
            if len(engine.teacher_cache) == held:  # the budget is spent: the rest are computed as they come
                return

    def _seed_epoch(self, engine: MultiADTrainer) -> None:
        # the batches' order: a sampler with set_epoch (EpochShuffleSampler; MONAI sets a
        # DistributedSampler's itself) orders by epoch; the loader's generator seeds its workers
        epoch_seed = (int(self.seed) * 1_000_003 + engine.state.epoch) % (2**63)
        torch.manual_seed(epoch_seed)
        loader = engine.data_loader
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(engine.state.epoch)
        generator = getattr(loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(epoch_seed)

    def checkpoint_objects(self) -> dict[str, Any]:
        """What a training checkpoint holds (for resume): this engine, the student, its optimizer,
        the learning-rate schedule when there is one, and the discriminator + its optimizer when
        there is one. The CLI's and the bundles' runs both save exactly this."""
        objects: dict[str, Any] = {"trainer": self, "student": self.network.student, "optimizer": self.optimizer}
        if self.lr_scheduler is not None:
            objects["lr_scheduler"] = self.lr_scheduler
        if self.network.discriminator is not None and self.d_optimizer is not None:
            objects.update(discriminator=self.network.discriminator, d_optimizer=self.d_optimizer)
        return objects

    def _autocast(self):
        return torch.autocast("cuda", enabled=self.amp) if self.state.device.type == "cuda" else nullcontext()

    def _iteration(self, engine: MultiADTrainer, batchdata: Any) -> dict[str, float]:
        images, _ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        if engine.augment_flips:
            images = random_flips(images)
        net = engine.network
        net.train()
        d_net = engine.discriminator
        corrupted = None
        if engine.denoise_fraction > 0:
            # the anomalies drawn follow from the seed and the iteration alone, so a resumed run
            # corrupts the same images in the same way as an uninterrupted one
            engine.anomaly.generator.manual_seed(engine.anomaly_seed * 1_000_003 + engine.state.iteration)
            corrupted, _ = corrupt_batch(images, engine.anomaly, engine.denoise_fraction, engine.anomaly_foreground)
        keys = batchdata.get("path") if isinstance(batchdata, dict) and engine.teacher_cache is not None else None
        with engine._autocast():
            teacher = None if keys is None else engine.teacher_cache.features(keys, images, net.teacher_features)
            teacher, student = net.features(images, student=engine.student, student_input=corrupted,
                                            teacher_features=teacher)
            distill = engine.distillation_loss(teacher, student)
            adversarial = torch.zeros((), device=images.device)
            if engine.use_discriminator:
                # gradients of this term train the student only: the bare discriminator is
                # called with its parameters frozen (and outside its DDP wrapper)
                net.discriminator.requires_grad_(False)
                adversarial = engine.adversarial_loss(net.discriminator, student[-1])
                net.discriminator.requires_grad_(True)
            loss = distill + engine.adversarial_weight * adversarial
        engine.optimizer.zero_grad(set_to_none=True)
        engine._backward_step(loss, engine.optimizer)
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.step()

        d_loss = torch.zeros(())
        if engine.use_discriminator:
            if engine.state.iteration % engine.d_update_every == 0:
                with engine._autocast():
                    d_loss = engine.discriminator_loss(d_net, teacher[-1], student[-1])
                engine.d_optimizer.zero_grad(set_to_none=True)
                engine._backward_step(d_loss, engine.d_optimizer)
            else:  # no update this iteration: NaN, which the epoch's mean in log.csv leaves out
                d_loss = torch.full((), float("nan"))
        return {
            "loss": float(loss.detach()),
            "distillation": float(distill.detach()),
            "adversarial": float(adversarial.detach()),
            "discriminator": float(d_loss.detach()),
        }

    def _backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {float(loss)} at iteration {self.state.iteration}: "
                "lower the learning rate or check the input intensities"
            )
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()

