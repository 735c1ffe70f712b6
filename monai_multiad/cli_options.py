"""The ``multiad`` command line's commands and options (:func:`build_parser`); what each command does is
in :mod:`monai_multiad.cli`. The options of ``train`` are generated from
:class:`~monai_multiad.config.RunConfig`, grouped by :func:`~monai_multiad.config.field_sections`."""

from __future__ import annotations

import argparse

from monai_multiad import __version__
from monai_multiad.config import RunConfig, field_sections
from monai_multiad.inferers.settings import DEFAULT_TOP_K

__all__ = ["LAYOUT_HELP", "build_parser"]


LAYOUT_HELP = """dataset layouts (--layout; auto finds the first that fits):
  mvtec    DIR/train/good/*.png             normal training images
           DIR/test/good/, DIR/test/<defect>/   test images (normal, anomalous)
           DIR/ground_truth/<defect>/<name>_mask.png   optional masks
  bmad     DIR/train/good[/img]/, DIR/{valid,test}/{good,Ungood}/img/,
           masks in DIR/{valid,test}/Ungood/label/ with the image's file name
  folder   plain folders, as anomalib's Folder:
           DIR/good/                 normal images; without normal_test/, every
                                     fifth (by name) is kept for testing
           DIR/<defect>/             anomalous test images, one folder per kind
           DIR/normal_test/          optional normal test images
           DIR/mask/<defect>/        optional masks: <name>.png or <name>_mask.png
  volumes  NIfTI files or DICOM series folders (DIR/<case>.nii.gz or
           DIR/<case>/<image>.nii.gz, labels *mask*/*seg*), optional splits.json
Images: PNG, JPEG, TIFF, BMP; gray or RGB; 8 or 16 bit. A mask of another size than
its image is resized with it when the aspect ratio is the same, else it is an error."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multiad",
        description="Multi-AD unsupervised anomaly detection (MONAI): train on normal images, "
        "then score images, slices and volumes.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch and more")
    parser.add_argument("--version", action="version", version=f"multiad {__version__}",
                        help="print the version of monai-multiad and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train on the normal images of a dataset and write a run folder",
                       description="Train Multi-AD on the normal training images of DATASET_DIR, fit the fusion "
                       "statistics on held-out normals, and write the run folder.",
                       epilog=LAYOUT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset_dir", nargs="?", help="dataset root, in one of the layouts below (default: the "
                   "--config file's dataset_dir)")
    g = p.add_argument_group("configuration file")
    g.add_argument("--config", help="a configuration to start from: JSON (a run's config.json) or YAML (.yaml, "
                   ".yml), any of the options below by their names with underscores; command-line options override it")
    g.add_argument("--print-config", action="store_true", help="print the full configuration (every option, with "
                   "the --config file's and the command line's values over the defaults) and exit without training; "
                   "--config reads it back")
    g.add_argument("--print-format", choices=("yaml", "json"), default="yaml",
                   help="format of --print-config (default: yaml)")
    sections = field_sections()
    for section, names in sections.items():
        group = p.add_argument_group(f"{section} options")
        RunConfig.add_arguments(group, skip=("dataset_dir", *(n for s, ns in sections.items() if s != section
                                                              for n in ns)))
        if section == "training":
            group.add_argument("--resume", help="continue from a run folder's last checkpoint (or a checkpoint file)")
            group.add_argument("--nproc", type=int, default=1, help="processes for data-parallel training (one per "
                               "GPU; gloo on CPU) via ignite.distributed")
    g = p.add_argument_group("output")
    g.add_argument("--run-dir", "--run", dest="run_dir", help="output run folder (config.json, model.pt, "
                   "checkpoints/, log.csv); required unless --print-config")

    p = sub.add_parser("evaluate", help="compute image/pixel AUROC, AUPRO and F1-max on a test split",
                       description="Evaluate a trained run on the labelled test split; writes metrics.json, "
                       "scores.csv and contact_sheet.png, and prints a table. Pixel AUROC and AUPRO need "
                       "ground-truth masks: where the anomalous images have none (labels only), they are "
                       "skipped, with the reason in the table and metrics.json.")
    p.add_argument("--run", required=True, help="run folder written by 'multiad train'")
    p.add_argument("--dataset-dir", help="dataset root (default: the one trained on)")
    p.add_argument("--layout", choices=RunConfig.__dataclass_fields__["layout"].metadata["choices"],
                   help="layout of --dataset-dir (default: the run's; see 'multiad train --help')")
    p.add_argument("--out", help="output folder (default: the run folder)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]' (default: auto)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: the run's)")

    p = sub.add_parser("predict", help="score 2D images: per-image score, overlay PNGs, predictions.json",
                       description="Score images (files or folders) with a trained run.")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--run", required=True, help="run folder written by 'multiad train'")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]' (default: auto)")

    p = sub.add_parser("screen", help="screen NIfTI/DICOM volumes slice by slice",
                       description="Screen scans (NIfTI files or DICOM series folders) with a run trained "
                       "on slices: a 3D anomaly map per scan as NIfTI in the scan's geometry, per-slice scores, "
                       "a montage PNG, and report.csv/report.json/report.html. Resumable: a scan already screened "
                       "into --out with the same model and settings (its result.json) is kept, so a job that was "
                       "killed goes on where it stopped; --nproc N shards the scans over N processes.")
    p.add_argument("scans", nargs="+", help="NIfTI files, DICOM series folders, folders of cases (<case>.nii.gz, "
                   "<case>/<image>.nii.gz, <case>/<DICOM series>; label volumes left out) or list files (.txt, "
                   ".lst, .list: one path a line, relative to the list's folder, # comments)")
    p.add_argument("--run", "--run-folder", dest="run", required=True, help="run folder written by 'multiad train' "
                   "(under torchrun write --run-folder: torchrun takes --run for its own --run-path)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]' (default: auto)")
    p.add_argument("--modality", choices=("mri", "ct", "minmax"), help="intensity normalisation (default: the run's)")
    p.add_argument("--window", help="CT window: a preset name or 'level,width' in HU (default: the run's)")
    p.add_argument("--series", help="SeriesInstanceUID to read when a folder holds several series (folders are "
                   "then read as one series each, not as folders of cases)")
    p.add_argument("--batch-size", type=int, default=32, help="slices per batch (bounds memory; default: 32)")
    p.add_argument("--top-k", type=int, help="scan score = mean of the top-k slice scores (default: the one the "
                   f"run was calibrated with, else {DEFAULT_TOP_K})")
    p.add_argument("--rescreen", action="store_true", help="screen every scan again, also those already screened "
                   "into --out with this model and these settings (default: keep them, say so, screen the rest)")
    p.add_argument("--nproc", type=int, default=1, help="processes sharing the scans (one per GPU; gloo on CPU) via "
                   "ignite.distributed; rank 0 writes the report (default: 1)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes reading the next scans while one is "
                   "screened, with a thread writing the outputs meanwhile (per --nproc process; default: 0, all in "
                   "turn)")
    p.add_argument("--map-format", choices=("nii.gz", "nii"), default="nii.gz", help="anomaly map file: gzip NIfTI "
                   "at the fastest level, read by every viewer, or uncompressed NIfTI, larger and quicker to write "
                   "(default: nii.gz)")

    p = sub.add_parser("calibrate", help="set the run's thresholds at a false-positive rate, on normal scans or images",
                       description="Score inputs known to be normal with a trained run and set its decision "
                       "thresholds at the false-positive rate --fpr: for volumes (NIfTI files, DICOM series folders, "
                       "folders of NIfTI files) the scan threshold and the slice threshold, for 2D images (files, "
                       "folders) the image threshold. Rule: of n normal scores, the threshold is the k-th smallest, "
                       "k = ceil((n+1)(1-fpr)), and a score above it is flagged; this needs n >= (1-fpr)/fpr normals "
                       "(19 scans for FPR 0.05), fewer is an error. With it comes a 95 % bootstrap interval (2000 "
                       "resamples, seed 0; slices resampled by scan) of the FPR the rule achieves. Writes "
                       "calibration.json in the run folder (model.pt is not touched); 'screen' and 'predict' then "
                       "flag with these thresholds and say so. Writes nothing when it fails.")
    p.add_argument("normals", nargs="+", metavar="NORMAL_INPUTS",
                   help="scans (NIfTI files, DICOM series folders, folders of NIfTI files) or 2D images (files or "
                   "folders) known to be normal, not used in training")
    p.add_argument("--run", required=True, help="run folder written by 'multiad train'")
    p.add_argument("--fpr", type=float, default=0.05, help="false-positive rate wanted on normals (default: 0.05)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]' (default: auto)")
    p.add_argument("--modality", choices=("mri", "ct", "minmax"), help="intensity normalisation (default: the run's)")
    p.add_argument("--window", help="CT window: a preset name or 'level,width' in HU (default: the run's)")
    p.add_argument("--batch-size", type=int, default=32, help="slices per batch (bounds memory; default: 32)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="scan score = mean of the top-k slice scores; "
                   f"'screen' uses the same (default: {DEFAULT_TOP_K})")

    p = sub.add_parser("export", help="export a trained run to TorchScript or ONNX, checked against the model",
                       description="Write a trained run's network as one TorchScript or ONNX file: input (B, C, "
                       "S, S) float32 in [0, 1] at the run's image size S and channels C, outputs the anomaly map "
                       "(B, 1, S, S) and the score (B,), the fusion statistics and threshold baked in, any batch "
                       "size B. Before the file is put in place, the exported graph is run on a test batch and its "
                       "map and score compared with the model's; a mismatch writes nothing and exits 1. ONNX needs "
                       "pip install 'monai-multiad[onnx]'.")
    p.add_argument("--run", required=True, help="run folder written by 'multiad train' (or its model.pt)")
    p.add_argument("--out", required=True, help="the file to write (e.g. model.ts, model.onnx)")
    p.add_argument("--format", choices=("torchscript", "onnx"), help="default: onnx for an --out ending in .onnx, "
                   "else torchscript")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, at least 13 (default: 17)")

    p = sub.add_parser("bundle", help="the MONAI bundles installed with the package: list them, print one's folder",
                       description="The MONAI bundles that come with monai-multiad (installed with it, also by a "
                       "plain 'pip install'). 'multiad bundle path brain_mri' prints the bundle's folder, for "
                       "python -m monai.bundle run --config_file \"$(multiad bundle path brain_mri)/configs/train.json\" "
                       "--bundle_root OUTPUT_FOLDER ...")
    bundle_sub = p.add_subparsers(dest="bundle_action", required=True, metavar="ACTION")
    bundle_sub.add_parser("list", help="each bundle: name, version, folder")
    q = bundle_sub.add_parser("path", help="print a bundle's folder")
    q.add_argument("name", metavar="NAME", help="brain_mri or industrial (or multiad_brain_mri, multiad_industrial)")

    p = sub.add_parser("demo", help="a short demo on generated data: train, evaluate, predict, screen",
                       description="Generate a small textured dataset with planted defects (and a phantom "
                       "volume), train briefly, evaluate, predict and screen. Needs no download.")
    p.add_argument("--out", default="multiad_demo", help="demo folder (default: ./multiad_demo)")
    p.add_argument("--steps", type=int, default=60, help="training iterations (default: 60)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]' (default: auto)")
    return parser
