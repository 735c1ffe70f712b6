"""``multiad``: train, evaluate, predict, screen, calibrate, export and a demo, on the command line;
``multiad bundle`` finds the MONAI bundles installed with the package; ``multiad --version``.

Options of ``train`` are generated from :class:`~monai_multiad.config.RunConfig`, the same
description the bundles use, so both build the same objects from the same defaults; ``--config`` reads
a JSON or YAML file of them and ``--print-config`` writes every one (YAML, or JSON) for it to read back.
Bad input ends with one line ``multiad: error: <file>: <problem>`` and exit status 2; an output
that cannot be written (a full disk) with one such line and status 1. An output folder is held
by one command at a time (a lock file naming the process). ``train`` stopped by Ctrl-C or SIGTERM
after an epoch finishes the run from its best epoch and exits 0 (``"interrupted": true`` in
``metrics.json``); stopped before any epoch completed, it exits 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from monai_multiad import __version__
from monai_multiad.allocator import keep_freed_memory
from monai_multiad.config import RunConfig, field_sections
from monai_multiad.errors import MultiADInputError, OutputWriteError
from monai_multiad.inferers.settings import DEFAULT_TOP_K
from monai_multiad.outputs import atomic_path, check_output_dir, display_path as _shown, folder_lock

__all__ = ["main", "build_parser", "distributed_main"]


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


def _absolute(path: str | Path | None) -> Path | None:
    return None if path is None else Path(path).absolute()


def train_inputs(args: argparse.Namespace) -> tuple[RunConfig, Path, Path | None]:
    """``multiad train``'s arguments, checked and resolved once, before any work: (config with the
    dataset's absolute path, usable absolute run folder, absolute checkpoint to resume or None).
    Also used by ``python -m monai_multiad.distributed`` (:func:`distributed_main`)."""
    cfg = run_config(args)
    if not cfg.dataset_dir:
        raise MultiADInputError("no dataset folder given: pass DATASET_DIR, or a --config file with dataset_dir")
    if not args.run_dir:
        raise MultiADInputError("no run folder given: pass --run-dir FOLDER (or --run FOLDER)")
    run_dir = check_output_dir(args.run_dir, "run folder (--run-dir)", inputs=(cfg.dataset_dir,))
    cfg.dataset_dir = os.path.abspath(cfg.dataset_dir)  # config.json names the data from anywhere (no "..")
    if args.resume is not None and not Path(args.resume).exists():
        raise MultiADInputError(f"{args.resume}: run folder or checkpoint to resume from not found")
    return cfg, run_dir, _absolute(args.resume)


def run_config(args: argparse.Namespace) -> RunConfig:
    """``multiad train``'s configuration: the ``--config`` file (JSON or YAML) or the defaults, with the
    options given on the command line over it."""
    return RunConfig.from_arguments(args, RunConfig.load(args.config) if args.config else None)


def _print_config(args: argparse.Namespace) -> int:
    sys.stdout.write(run_config(args).dumps(args.print_format))
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.print_config:
        return _print_config(args)
    cfg, run_dir, resume = train_inputs(args)
    from monai_multiad.workflow import train

    with folder_lock(run_dir, "multiad train"):
        if args.nproc > 1:
            from monai_multiad.distributed import train_distributed

            summary = train_distributed(cfg, run_dir, args.nproc, resume=resume)
        else:
            summary = train(cfg, run_dir, resume=resume)
    print(f"trained {summary['epochs']} epoch(s), {summary['iterations']} iterations in "
          f"{summary['train_seconds']} s on {summary['device']}; run folder: {args.run_dir}")
    if summary.get("interrupted"):
        print(f"multiad: training was interrupted in epoch {summary['epochs']}; the run was finished from its best "
              f"completed epoch (model.pt is usable); '--resume {args.run_dir}' trains on", file=sys.stderr)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    out = check_output_dir(args.out, "output folder (--out)", inputs=(args.dataset_dir,)) if args.out else None
    from monai_multiad.inference import evaluate, format_table

    with folder_lock(out or _absolute(args.run), "multiad evaluate"):
        metrics = evaluate(_absolute(args.run), _absolute(args.dataset_dir), out, args.device, args.batch_size,
                           layout=args.layout)
    print(format_table(metrics))
    return 0


def _predict(args: argparse.Namespace) -> int:
    out = check_output_dir(args.out, "output folder (--out)", inputs=tuple(args.inputs))
    from monai_multiad.inference import predict

    with folder_lock(out, "multiad predict"):
        results = predict(_absolute(args.run), [_absolute(p) for p in args.inputs], out, args.device)
    scored = [r for r in results if "error" not in r]
    if scored:
        from monai_multiad.inferers import Threshold

        print(Threshold(scored[0]["threshold"], "", scored[0]["threshold_source"]))
    for r in results:
        if "error" in r:
            print(f"{_shown(r['path'])}: ERROR {r['error']}")
        else:
            print(f"{_shown(r['path'])}: score {r['score']:.4f}{'  ANOMALOUS' if r['anomalous'] else ''}")
    print(f"wrote {Path(args.out) / 'predictions.json'}")
    return 1 if any("error" in r for r in results) else 0


def screen_inputs(args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """``multiad screen``'s output folder (checked, absolute) and scans (absolute; folders of cases and
    list files expanded: :func:`monai_multiad.cohort.expand_scans`), before any work. Also used by
    ``python -m monai_multiad.distributed screen`` (:func:`distributed_main`)."""
    out = check_output_dir(args.out, "output folder (--out)", inputs=tuple(args.scans))
    if args.nproc < 1 or args.workers < 0:
        raise MultiADInputError(f"--nproc must be at least 1 and --workers at least 0, got {args.nproc} and "
                                f"{args.workers}")
    run = _absolute(args.run)
    if not (run.is_file() or (run / "model.pt").is_file()):  # said here, before any process starts
        raise MultiADInputError(f"{args.run}: no trained model here (expected a run folder written by 'multiad train')")
    from monai_multiad.cohort import expand_scans

    scans = expand_scans([_absolute(p) for p in args.scans], series_uid=args.series)
    if not scans:
        raise MultiADInputError(f"{' '.join(args.scans)}: no scans to screen (empty list file)")
    return out, scans


def screen_options(args: argparse.Namespace) -> dict:
    """``multiad screen``'s options as :func:`monai_multiad.cohort.screen_paths` takes them (and ``run``)."""
    return {"run": _absolute(args.run), "device": args.device, "modality": args.modality, "window": args.window,
            "series_uid": args.series, "batch_size": args.batch_size, "top_k": args.top_k,
            "resume": not args.rescreen, "workers": args.workers, "map_format": args.map_format}


def report_screening(args: argparse.Namespace, report: list[dict]) -> int:
    """Print the thresholds used and a line per scan; the exit status: 1 when a scan failed."""
    failed = [r for r in report if r.get("status") != "ok"]
    if report:
        from monai_multiad.inferers import Threshold

        first = report[0]
        print(Threshold(first.get("threshold"), "", first.get("threshold_source", "")))
        if first.get("slice_threshold_source") != first.get("threshold_source") or \
                first.get("slice_threshold") != first.get("threshold"):
            print("slice " + str(Threshold(first.get("slice_threshold"), "", first.get("slice_threshold_source", ""))))
    for r in report:
        line = f"score {r['scan_score']:.4f}" if r.get("status") == "ok" else f"FAILED {r.get('error')}"
        print(f"{_shown(r['scan'])}: {line}")
    print(f"wrote {Path(args.out) / 'report.csv'} and {Path(args.out) / 'report.html'}")
    return 1 if failed else 0


def _screen(args: argparse.Namespace) -> int:
    out, scans = screen_inputs(args)
    options = screen_options(args)
    run = options.pop("run")
    with folder_lock(out, "multiad screen"):
        if args.nproc > 1:
            from monai_multiad.distributed import screen_distributed

            report = screen_distributed(run, scans, out, args.nproc, verbose=args.verbose, **options)
        else:
            from monai_multiad.cohort import screen_paths

            report = screen_paths(run, scans, out, **options)
    return report_screening(args, report)


def _calibrate(args: argparse.Namespace) -> int:
    run = _absolute(args.run)
    if not (run / "model.pt").is_file():
        raise MultiADInputError(f"{args.run}: no trained model here (expected a run folder written by 'multiad train')")
    from monai_multiad.calibration import calibrate, write_calibration

    with folder_lock(run, "multiad calibrate"):  # one line and nothing written on any error before the end
        record = calibrate(run, [_absolute(p) for p in args.normals], args.fpr, device=args.device,
                           top_k=args.top_k, modality=args.modality, window=args.window,
                           batch_size=args.batch_size, progress=True)
        path = write_calibration(run, record)
    fpr = record["fpr"]
    for level, unit in (("scan", "scans"), ("slice", "slices"), ("image", "images")):
        part = record.get(level)
        if part:
            lo, hi = part["interval"]
            of = f" of {part['groups']} scans" if part.get("groups") else ""
            print(f"{level} threshold {part['threshold']:.4g}: FPR {fpr:g} on {part['n']} normal {unit}{of} "
                  f"(calibration set: {part['calibration_fpr']:.3g} above it; bootstrap 95% interval of the FPR "
                  f"[{lo:.3g}, {hi:.3g}])")
    print(f"wrote {_shown(path)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    run, out = _absolute(args.run), _absolute(args.out)
    if not (run.is_file() or (run / "model.pt").is_file()):
        raise MultiADInputError(f"{args.run}: no trained model here (expected a run folder written by 'multiad train')")
    if out.is_dir():
        raise MultiADInputError(f"{args.out}: is a folder: --out names the file to write")
    check_output_dir(out.parent, "folder of --out", inputs=(run if run.is_dir() else run.parent,))
    fmt = args.format or ("onnx" if out.suffix.lower() == ".onnx" else "torchscript")
    if fmt == "onnx":
        import importlib.util

        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise MultiADInputError(f"--format onnx needs the package(s) {', '.join(missing)}: "
                                    "pip install 'monai-multiad[onnx]'")
        if args.opset < 13:
            raise MultiADInputError(f"--opset must be at least 13, got {args.opset}")
    from monai_multiad.export import ExportMismatchError, check_export, export_onnx, export_torchscript
    from monai_multiad.run_folder import load_model

    model, cfg, _ = load_model(run, "cpu")
    size = cfg.image_size
    try:
        with atomic_path(out) as tmp:  # put in place only once written and checked
            if fmt == "onnx":
                export_onnx(model, tmp, image_size=size, opset=args.opset)
            else:
                export_torchscript(model, tmp, image_size=size)
            diff = check_export(model, tmp, fmt, image_size=size)
    except ExportMismatchError as e:
        print(f"multiad: error: {args.out}: {e}; nothing was written", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({fmt}): image (B, {model.in_channels}, {size}, {size}) float32 in [0, 1] -> "
          f"anomaly_map (B, 1, {size}, {size}), score (B,); largest difference from the model on a test batch: "
          f"{diff:.2g}")
    return 0


def _bundle(args: argparse.Namespace) -> int:
    try:
        from monai_multiad import bundles
    except ImportError as e:
        raise MultiADInputError("the MONAI bundles are not installed with this copy of monai-multiad: install the "
                                "package (pip install . at the repository root)") from e
    if args.bundle_action == "path":
        try:
            print(bundles.bundle_path(args.name))
        except ValueError as e:
            raise MultiADInputError(str(e)) from None
        return 0
    print("\n".join(bundles.listing()))
    return 0


def _demo(args: argparse.Namespace) -> int:
    out = check_output_dir(args.out, "demo folder (--out)")
    from monai_multiad.demo import run_demo

    run_demo(out, steps=args.steps, device=args.device)
    return 0


COMMANDS = {"train": _train, "evaluate": _evaluate, "predict": _predict, "screen": _screen, "calibrate": _calibrate,
            "export": _export, "bundle": _bundle, "demo": _demo}


def error_exit(e: MultiADInputError | OutputWriteError) -> int:
    """Print an error a user can act on as one line ``multiad: error: ...`` and return the exit
    status: 2 for bad input, 1 for an output that could not be written."""
    if isinstance(e, OutputWriteError):
        print(f"multiad: error: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"multiad: error: {e}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # CPU batches of 32 1.8x faster: no page faults for each pass's tensors (see the module)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command in ("train", "demo", "screen"):  # screen: the note on scans kept from an earlier run
        logging.getLogger("monai_multiad").setLevel(logging.INFO)
    if not args.verbose:  # Ignite logs an engine's exception before raising it: the one line below says it
        logging.getLogger("ignite").setLevel(logging.CRITICAL)
    try:
        return COMMANDS[args.command](args)
    except (MultiADInputError, OutputWriteError) as e:
        return error_exit(e)
    except KeyboardInterrupt:
        print("multiad: interrupted; the last completed epoch's checkpoint is usable with --resume", file=sys.stderr)
        return 130


def launched_by_torchrun() -> bool:
    """Whether this process is one of torchrun's: its environment describes the group to join."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def _torchrun_group(args: argparse.Namespace, folder: Path, command: str, device: str):
    if args.nproc > 1:
        raise MultiADInputError("--nproc spawns processes itself: under torchrun use --nproc_per_node")
    from monai_multiad.distributed import torchrun_group

    return torchrun_group(folder, command, device, args.verbose)


def _distributed_train(args: argparse.Namespace) -> int:
    if args.print_config:
        return _print_config(args)
    cfg, run_dir, resume = train_inputs(args)  # checked and resolved once, before any process starts
    from monai_multiad.distributed import train_distributed

    if launched_by_torchrun():
        with _torchrun_group(args, run_dir, "multiad train", cfg.device) as (rank, processes):
            from monai_multiad.workflow import train

            summary = train(cfg, run_dir, resume=resume)
    else:
        with folder_lock(run_dir, "multiad train"):
            summary = train_distributed(cfg, run_dir, max(args.nproc, 1), resume=resume, verbose=args.verbose)
        rank, processes = 0, max(args.nproc, 1)
    if rank == 0:
        print(f"trained {summary['epochs']} epoch(s), {summary['iterations']} iterations in "
              f"{summary['train_seconds']} s on {summary['device']}, {processes} process(es); "
              f"run folder: {args.run_dir}")
    return 0


def _distributed_screen(args: argparse.Namespace) -> int:
    """Under torchrun this process screens its share (rank 0 holds the output folder and writes the
    report); otherwise as ``multiad screen --nproc N``."""
    if not launched_by_torchrun():
        return _screen(args)
    from monai_multiad.cohort import screen_paths
    from monai_multiad.distributed import rank_options

    out, scans = screen_inputs(args)  # checked and resolved once per process, before any screening
    with _torchrun_group(args, out, "multiad screen", args.device) as (rank, _):
        options = rank_options(screen_options(args))
        report = screen_paths(options.pop("run"), scans, out, **options)
    failed = sum(r.get("status") != "ok" for r in report)
    if rank == 0:
        report_screening(args, report)
        if failed:  # exit status 0 all the same: torchrun takes any other for a crash and prints a traceback
            print(f"multiad: {failed} of {len(report)} scans failed (FAILED above, and in the report)", file=sys.stderr)
    return 0


def distributed_main(argv: list[str] | None = None) -> int:
    """``python -m monai_multiad.distributed`` takes ``multiad train``'s arguments, or ``screen`` and
    ``multiad screen``'s (this CLI's own parser, so they cannot drift). Under torchrun each process joins
    the group from the environment; otherwise ``--nproc N`` spawns N processes like ``multiad train
    --nproc N`` (``multiad screen --nproc N``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = [a for a in argv if a in ("-v", "--verbose")]  # `multiad -v train ...`'s flag, accepted anywhere
    rest = [a for a in argv if a not in verbose]
    command = "screen" if rest[:1] == ["screen"] else "train"
    parser = build_parser()
    parser.prog = "python -m monai_multiad.distributed"
    args = parser.parse_args([*verbose[:1], command, *rest[1:]] if command == "screen" else
                             [*verbose[:1], "train", *rest])
    keep_freed_memory()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if command == "screen":
        logging.getLogger("monai_multiad").setLevel(logging.INFO)  # the resume note, as `multiad screen` shows it
    try:
        return _distributed_screen(args) if command == "screen" else _distributed_train(args)
    except (MultiADInputError, OutputWriteError) as e:
        return error_exit(e)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
