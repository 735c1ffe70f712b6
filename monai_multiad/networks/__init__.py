"""Pure ``nn.Module``s of Multi-AD: no training loop, no file I/O (weights files excepted)."""

from monai_multiad.networks.backbones import (
    BACKBONES,
    EfficientNetLite0Features,
    EfficientNetLite1Features,
    EfficientNetLite2Features,
    EfficientNetLiteFeatures,
    FeatureExtractor,
    ResNet18Features,
    SEResNet50Features,
    build_feature_extractor,
)
from monai_multiad.networks.discriminator import FeatureDiscriminator
from monai_multiad.networks.fusion import AnomalyMapFusion, stage_anomaly_maps
from monai_multiad.networks.multiad import MultiAD

__all__ = [
    "BACKBONES",
    "AnomalyMapFusion",
    "EfficientNetLite0Features",
    "EfficientNetLite1Features",
    "EfficientNetLite2Features",
    "EfficientNetLiteFeatures",
    "FeatureDiscriminator",
    "FeatureExtractor",
    "MultiAD",
    "ResNet18Features",
    "SEResNet50Features",
    "build_feature_extractor",
    "stage_anomaly_maps",
]
