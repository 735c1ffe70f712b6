"""How long writing the synthetic MVTec-layout dataset takes (``write_mvtec_dataset``).

The tests and the demo generate their data with
:func:`monai_multiad.data.synthetic_images.write_mvtec_dataset`; at its defaults (40 training, 10 good
and 10 defective test images of 64 px, RGB, 8-bit PNG) it was written to take well under a second. A
wall-clock limit does not belong in a test (a busy CI machine fails it for no fault of the code), so it
is measured here: ``--warmup`` untimed runs, then the median, minimum and maximum of ``--repeats``, each
into a new temporary folder, with the load average at start and end (on a busy machine the times mean
little). ``--budget-s`` (default 1.0) is the figure to compare with: ``within_budget`` says whether the
median is under it, and the exit status is 1 when it is not.

    python benchmarks/synthetic_data.py --out runs/bench/synthetic_data.json
    python benchmarks/synthetic_data.py --size 256 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--n-test-good", type=int, default=10)
    p.add_argument("--n-test-defect", type=int, default=10)
    p.add_argument("--size", type=int, default=64, help="image side in px")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--sixteen-bit", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=1.0, help="median seconds expected at most (default 1.0)")
    p.add_argument("--out", help="JSON report (default: printed only)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from monai_multiad.data.synthetic_images import write_mvtec_dataset

    args = parse_args(argv)
    options = {"n_train": args.n_train, "n_test_good": args.n_test_good, "n_test_defect": args.n_test_defect,
               "size": args.size, "channels": args.channels, "sixteen_bit": args.sixteen_bit}
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    times = []
    with tempfile.TemporaryDirectory(prefix="multiad_bench_data_") as tmp:
        for i in range(args.warmup + max(args.repeats, 1)):
            t0 = time.perf_counter()
            write_mvtec_dataset(Path(tmp) / f"run{i}", **options)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    images = args.n_train + args.n_test_good + 2 * args.n_test_defect  # defects come with a mask each
    median = statistics.median(times)
    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "load_average_at_start": load_start,
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "repeats": len(times), "warmup": args.warmup,
        },
        "options": options,
        "files_per_run": images,
        "median_s": median, "min_s": min(times), "max_s": max(times),
        "files_per_s": images / median if median > 0 else None,
        "budget_s": args.budget_s, "within_budget": median <= args.budget_s,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["within_budget"] else 1)
