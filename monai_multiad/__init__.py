"""monai-multiad: Multi-AD unsupervised anomaly detection for MONAI."""

__version__ = "0.1.0"
