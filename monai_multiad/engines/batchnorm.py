"""Re-estimating a network's BatchNorm running statistics on normal images.

A randomly initialised student trained for a few hundred iterations has running BatchNorm
statistics far from its batch statistics (MONAI's ``EfficientNet`` uses momentum 0.01), so in
eval mode (validation, model selection, fusion fitting, test maps) it is another network than
the one trained. Re-estimating the statistics with the weights fixed (as SWA's ``update_bn``
does) removes that gap at the cost of one forward pass over a few hundred images.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["set_batchnorm_momentum", "recalibrate_batchnorm"]


def set_batchnorm_momentum(module: nn.Module, momentum: float) -> int:
    """Set the running-statistics momentum of every BatchNorm in ``module``; returns how many."""
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    for m in layers:
        m.momentum = momentum
    return len(layers)


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, batches: Iterable[torch.Tensor], max_images: int) -> int:
    """Recompute the running mean/var of ``module``'s BatchNorm layers as the plain average over
    ``batches`` (tensors the module takes), up to ``max_images``; weights are not touched.
    The module is left in the train/eval mode it was in. Returns the number of images used."""
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    if not layers or max_images <= 0:
        return 0
    was_training = module.training
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    module.train()
    seen = 0
    try:
        for x in batches:
            x = x[: max_images - seen]
            if x.shape[0] < 2 and seen > 0:  # a batch of one gives no batch statistics worth having
                break
            module(x)
            seen += x.shape[0]
            if seen >= max_images:
                break
    finally:
        for m, mom in zip(layers, momenta):
            m.momentum = mom
        module.train(was_training)
    return seen


