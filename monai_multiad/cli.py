"""``multiad``: train, evaluate, predict, screen, calibrate, export and a demo, on the command line;
``multiad bundle`` finds the MONAI bundles installed with the package; ``multiad --version``.

The commands and options are in :mod:`monai_multiad.cli_options`. Options of ``train`` are generated
from :class:`~monai_multiad.config.RunConfig`, the same
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

from monai_multiad.allocator import keep_freed_memory
from monai_multiad.cli_options import build_parser
from monai_multiad.config import RunConfig
from monai_multiad.errors import MultiADInputError, OutputWriteError
from monai_multiad.outputs import atomic_path, check_output_dir, display_path as _shown, folder_lock

__all__ = ["main", "build_parser", "distributed_main"]



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
