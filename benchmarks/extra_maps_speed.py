"""What the optional maps cost at inference: a Multi-AD eval forward (stage maps, fusion, score) with
and without the memory bank's k-NN map and the segmentation head's map.

Each variant is the same EfficientNet-Lite0 teacher and student (random weights: speed does not
depend on their values; the bank is filled with random entries of its full size), in eval mode
with BatchNorm folded as inference loads it, timed interleaved call by call so that a change of
load weighs on all alike; the table gives the median of ``--repeats`` calls and the ratio to the
variant without extra maps. Usage: ``python benchmarks/extra_maps_speed.py --help``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def build(variant: str, bank: int, in_channels: int) -> torch.nn.Module:
    from monai_multiad.networks import MultiAD

    torch.manual_seed(0)
    net = MultiAD("efficientnet_lite0", in_channels=in_channels, pretrained=False, discriminator=False,
                  memory_bank=bank if "bank" in variant else 0, segmentation_head="head" in variant)
    if net.memory_bank is not None:
        net.memory_bank.bank.normal_()
        net.memory_bank.bank_sq.copy_(net.memory_bank.bank.pow(2).sum(1))
    return net.eval().fold_batchnorm_()


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--in-channels", type=int, default=1, choices=(1, 3))
    p.add_argument("--bank", type=int, default=4096, help="memory bank entries")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ["plain", "bank", "head", "bank+head"]
    nets = {v: build(v, args.bank, args.in_channels) for v in variants}
    x = torch.rand(args.batch_size, args.in_channels, args.image_size, args.image_size)
    times: dict[str, list[float]] = {v: [] for v in variants}
    with torch.no_grad():
        for v in variants:  # warm-up
            nets[v](x)
        for _ in range(args.repeats):
            for v in variants:
                t0 = time.perf_counter()
                nets[v](x)
                times[v].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    rows = [{"variant": v, "ms_per_batch": round(1000 * statistics.median(times[v]), 1),
             "ratio": round(statistics.median(times[v]) / base, 3)} for v in variants]
    print(f"batch {args.batch_size}, {args.image_size} px, {args.in_channels} channel(s), bank {args.bank}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("| variant | ms per batch (median) | ratio to plain |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['ms_per_batch']} | {r['ratio']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
