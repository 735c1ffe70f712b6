"""The datasets and loaders of a run, from its :class:`~monai_multiad.config.RunConfig`: what training,
evaluation and the bundles read images and slices through (:func:`build_datasets`, :func:`build_loader`,
:func:`fixed_normals_loader`, and :class:`EpochShuffleSampler`, the shuffle a resumed run repeats)."""

from __future__ import annotations

from pathlib import Path

import ignite.distributed as idist
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from monai_multiad.config import RunConfig
from monai_multiad.data.images import detect_layout
from monai_multiad.errors import MultiADInputError

__all__ = ["EpochShuffleSampler", "build_datasets", "build_loader", "fixed_normals_loader"]


def build_datasets(cfg: RunConfig, split: str = "train", volume_preprocessing=None,
                   image_loader=None) -> Dataset | tuple[Dataset, Dataset]:
    """``split="train"``: (train, validation) datasets of normal images; ``"test"``: the test set.

    The layout (``cfg.layout``, or detected) picks the kind. Image layouts (MVTec AD, BMAD, plain
    folders): :mod:`monai_multiad.data.images`, each sample through ``image_loader`` (the industrial
    bundle's ``preprocessing``; default :class:`~monai_multiad.data.images.LoadAnomalyImaged` of
    ``cfg``). Volume folders: :mod:`monai_multiad.data.volumes` (normal slices for training), each
    case through ``volume_preprocessing`` (the brain bundle's ``preprocessing``, a MONAI ``Compose``;
    default :func:`~monai_multiad.data.volumes.volume_preprocessing` of ``cfg``). The one of the other
    kind is not used, so a bundle given a folder of the other kind still reads it, at ``cfg``'s options.
    """
    root = Path(cfg.dataset_dir)
    layout = cfg.layout
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "volumes":
        from monai_multiad.data.volumes import volume_slice_datasets

        return volume_slice_datasets(cfg, split, volume_preprocessing)
    from monai_multiad.data.images import AnomalyImageDataset, samples_for, split_normals

    size, ch = cfg.image_size, cfg.in_channels
    if split == "train":
        train, val = split_normals(samples_for(root, "train", layout), fraction=cfg.val_fraction, seed=cfg.seed)
        if not val:
            raise MultiADInputError(f"{root}: too few normal training images to hold out a validation set")
        return (AnomalyImageDataset(train, size, ch, cache=True, loader=image_loader),
                AnomalyImageDataset(val, size, ch, cache=True, loader=image_loader))
    return AnomalyImageDataset(samples_for(root, split, layout), size, ch, loader=image_loader)


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


def fixed_normals_loader(train_ds: Dataset, cfg: RunConfig) -> DataLoader:
    """The normal training images in one fixed random order (by ``cfg.seed``): what the teacher's
    feature statistics and the student's BatchNorm re-estimation are computed on. Random, so the
    first few hundred images span the data set (a volume folder lists its slices case by case);
    fixed, so a resumed run computes the same."""
    order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return DataLoader(Subset(train_ds, order), batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
