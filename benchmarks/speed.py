"""Speed benchmark of Multi-AD: inference pipeline vs bare networks, training, memory, volumes.

Per backbone, batch size and device, at ``--image-size`` (256) px:

* ``pipeline``: uint8 H x W x C numpy images -> float [0, 1] tensor on the device, resized with
  antialiasing -> ``MultiAD`` eval forward (stage maps -> fused map -> score) -> numpy on the CPU;
* ``bare``: ``model.teacher(xn)`` + ``model.student(xn)`` on an already normalised on-device batch;
* ``overhead``: pipeline time / bare time (what the pipeline adds to the networks' own compute);
* ``train``: one ``MultiADTrainer`` iteration (distillation + adversarial loss, two optimizer steps);
* memory: CUDA ``max_memory_allocated``; CPU: peak RSS (``/proc/self/statm`` sampled every 2 ms)
  above the RSS just before the first pass, each configuration in a fresh process (``--isolate``);
* ``volume``: ``monai_multiad.screening.screen_path`` end to end on a NIfTI phantom of
  size x size x ``--volume-slices`` vs the bare networks on the same number of slices.

Timings: ``--warmup`` untimed runs, then the median of ``--repeats`` (CUDA synchronised).
Efficientnet-Lite0 uses its real ImageNet weights (offline); the others random weights: speed
does not depend on the weights' values. Usage: ``python benchmarks/speed.py --help``.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

WEIGHTS_NOTE = "efficientnet_lite0: real ImageNet weights; others: random weights (speed does not depend on weight values)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak memory of a block in MiB above the level at its start (CUDA allocator, or CPU RSS)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mb, self._stop = device, 0.0, threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        elif os.path.exists("/proc/self/statm"):
            self.base = self.top = _rss_mb()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        else:  # no /proc: the process high-water mark (KiB on Linux), a lower bound of the peak
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.top = max(self.top, _rss_mb())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        elif hasattr(self, "thread"):
            self._stop.set()
            self.thread.join()
            self.peak_mb = max(self.top, _rss_mb()) - self.base
        else:
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.base


def memory_method(device: str) -> str:
    if device.startswith("cuda"):
        return "torch.cuda.max_memory_allocated above the allocation before the block (model weights excluded)"
    return ("peak RSS above the RSS before the block: /proc/self/statm sampled every 2 ms, first pass of a fresh "
            "process (with --isolate); reused allocator memory is not counted again")


def preprocess(images: list[np.ndarray], size: int, device: torch.device) -> torch.Tensor:
    """uint8 (H, W, C) images -> float (B, C, size, size) in [0, 1] on ``device`` (antialiased resize)."""
    x = torch.from_numpy(np.stack(images)).to(device, non_blocking=True)  # uint8 crosses the bus: 4x less
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp_(0.0, 1.0)


def build_model(backbone: str, device: torch.device):
    from monai_multiad.networks import MultiAD

    return MultiAD(backbone, in_channels=3, pretrained=backbone == "efficientnet_lite0").to(device).eval()


def bench_images(job: dict) -> dict:
    from monai_multiad.engines.trainer import MultiADTrainer

    device, b, size = torch.device(job["device"]), job["batch_size"], job["image_size"]
    amp = bool(job["amp"]) and device.type == "cuda"
    torch.manual_seed(0)
    model = build_model(job["backbone"], device)
    rng = np.random.default_rng(0)
    src = job["source_size"]
    images = [rng.integers(0, 256, (src, src, 3), dtype=np.uint8) for _ in range(b)]

    @torch.no_grad()
    def pipeline():
        with torch.autocast(device.type, enabled=amp):
            amap, score = model(preprocess(images, size, device))
        return amap.float().cpu().numpy(), score.float().cpu().numpy()

    xn = model.normalize(preprocess(images, size, device))

    @torch.no_grad()
    def bare():
        with torch.autocast(device.type, enabled=amp):
            return model.teacher(xn), model.student(xn)

    with PeakMemory(device) as mem_inf:
        pipeline()
    t_pipe = timed(pipeline, device, job["warmup"], job["repeats"])
    t_bare = timed(bare, device, job["warmup"], job["repeats"])

    x = torch.rand(b, 3, size, size)
    steps = job["warmup"] + max(job["repeats"], 1) + 1
    opt = torch.optim.Adam(model.student.parameters(), lr=1e-3, weight_decay=1e-5)
    d_opt = torch.optim.Adam(model.discriminator.parameters(), lr=1e-4, betas=(0.5, 0.999))
    trainer = MultiADTrainer(device, 1, [{"image": x}] * steps, model, opt, d_opt, adversarial_weight=0.1,
                             epoch_length=steps, amp=amp)
    step_times: list[float] = []
    mem_train = PeakMemory(device)
    from ignite.engine import Events

    @trainer.on(Events.ITERATION_STARTED)
    def _start(engine):
        _sync(device)
        if engine.state.iteration == 1:
            mem_train.__enter__()
        engine.state.t0 = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _end(engine):
        _sync(device)
        step_times.append(time.perf_counter() - engine.state.t0)
        if engine.state.iteration == 1:
            mem_train.__exit__()

    trainer.run()
    t_train = statistics.median(step_times[1 + job["warmup"]:])  # the first (memory) step is untimed
    return {
        "backbone": job["backbone"], "batch_size": b, "device": job["device"], "amp": amp,
        "weights": "imagenet" if job["backbone"] == "efficientnet_lite0" else "random",
        "pipeline_ms": 1000 * t_pipe, "pipeline_images_per_s": b / t_pipe,
        "bare_ms": 1000 * t_bare, "bare_images_per_s": b / t_bare,
        "overhead_ratio": t_pipe / t_bare,
        "train_ms_per_step": 1000 * t_train, "train_images_per_s": b / t_train,
        "inference_peak_mb": mem_inf.peak_mb, "train_peak_mb": mem_train.peak_mb,
    }


def bench_volume(job: dict) -> dict:
    row = {"backbone": job["backbone"], "device": job["device"], "slices": job["volume_slices"]}
    try:
        from monai_multiad import screening
    except ImportError as e:
        return {**row, "status": f"skipped: screening not available ({e})"}
    from monai_multiad.data.synthetic_volumes import make_phantom_volume, write_nifti

    device, size, n = torch.device(job["device"]), job["image_size"], job["volume_slices"]
    model = build_model(job["backbone"], device)
    work = Path(tempfile.mkdtemp(prefix="multiad_speed_"))
    image, _ = make_phantom_volume((size, size, n), lesion=True, seed=0)
    path = write_nifti(work / "phantom.nii.gz", np.round(image).astype(np.int16))
    kwargs = {"device": job["device"], "batch_size": job["volume_batch_size"], "image_size": size,
              "modality": "mri", "progress": False}
    accepted = {*inspect.signature(screening.screen_path).parameters,  # pass only the options it names
                *inspect.signature(getattr(screening, "screen_volume", screening.screen_path)).parameters}
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    runs, reports = iter(range(10**6)), []
    warmup, repeats = min(job["warmup"], 1), min(max(job["repeats"], 1), 3)
    try:
        e2e = timed(lambda: reports.append(screening.screen_path(model, path, work / f"out{next(runs)}", **kwargs)),
                    device, warmup, repeats)
    except Exception as e:  # a screening error is a result of this benchmark, not its end
        return {**row, "status": f"failed: {type(e).__name__}: {e}"}
    screened = int(reports[-1].get("screened_slices", n)) if isinstance(reports[-1], dict) else n
    xn = torch.rand(min(job["volume_batch_size"], max(screened, 1)), 3, size, size, device=device)

    @torch.no_grad()
    def bare():  # fp32, as screening runs a bare network
        for start in range(0, screened, xn.shape[0]):
            x = xn[: min(xn.shape[0], screened - start)]
            model.teacher(x), model.student(x)

    t_bare = timed(bare, device, warmup, repeats)
    files = sorted(str(p.relative_to(work / "out0")) for p in (work / "out0").rglob("*") if p.is_file())
    shutil.rmtree(work, ignore_errors=True)
    return {**row, "status": "ok", "screened_slices": screened, "end_to_end_s": e2e, "model_s": t_bare,
            "ratio": e2e / t_bare if screened else None, "slices_per_s": n / e2e, "files": files}


def run_job(job: dict) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(job.get("threads") or threads)
    try:
        return bench_volume(job) if job["kind"] == "volume" else bench_images(job)
    finally:
        torch.set_num_threads(threads)


def run_isolated(job: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, __file__, "--_job", json.dumps(job), "--_result", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            return {**job, "status": f"failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}"}
        return json.loads(out.read_text())


def metadata(args) -> dict:
    import ignite
    import monai

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
        "ignite": ignite.__version__, "numpy": np.__version__, "platform": platform.platform(),
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "image_size": args.image_size, "source_size": args.source_size, "repeats": args.repeats,
        "warmup": args.warmup, "amp_on_cuda": args.amp, "isolated_processes": args.isolate,
        "weights": WEIGHTS_NOTE, "memory": {d: memory_method(d) for d in args.devices},
    }


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [f"# Multi-AD speed ({m['date']})", "",
             f"torch {m['torch']}, monai {m['monai']}, CPU: {m['cpu']} ({m['torch_threads']} threads), "
             f"CUDA: {m['cuda_device'] or 'none'}; {m['image_size']} px from {m['source_size']} px uint8 images; "
             f"median of {m['repeats']} after {m['warmup']} warm-up; {m['weights']}.", "",
             "| backbone | device | batch | pipeline img/s | bare img/s | pipeline / bare | train img/s "
             "| inference peak MiB | train peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "pipeline_ms" not in r:
            lines.append(f"| {r['backbone']} | {r['device']} | {r['batch_size']} | {r.get('status')} |" + " |" * 5)
            continue
        lines.append(f"| {r['backbone']} | {r['device']} | {r['batch_size']} | {r['pipeline_images_per_s']:.2f} | "
                     f"{r['bare_images_per_s']:.2f} | {r['overhead_ratio']:.3f} | {r['train_images_per_s']:.2f} | "
                     f"{r['inference_peak_mb']:.0f} | {r['train_peak_mb']:.0f} |")
    lines += ["", "Memory: " + "; ".join(f"{d}: {v}" for d, v in m["memory"].items()), "",
              "| volume screening | device | slices (screened) | end to end s | bare networks s | ratio | status |",
              "|---|---|---|---|---|---|---|"]
    for v in report["volume"]:
        ok = v.get("status") == "ok"
        cells = f"{v['end_to_end_s']:.2f} | {v['model_s']:.2f} | {v['ratio'] or 0:.2f}" if ok else " | | "
        n = f"{v.get('slices', v.get('volume_slices'))} ({v.get('screened_slices', '-')})"
        lines.append(f"| {v['backbone']} | {v['device']} | {n} | {cells} | {v.get('status')} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet18", "se_resnet50"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped when absent")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--source-size", type=int, default=512, help="side of the uint8 input images (resized)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="repeats 3, warm-up 1 (se_resnet50 on CPU is slow)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no fp16 autocast on CUDA")
    p.add_argument("--no-isolate", dest="isolate", action="store_false", help="all in this process")
    p.add_argument("--no-volume", dest="volume", action="store_false", help="skip volume screening")
    p.add_argument("--volume-slices", type=int, default=155)
    p.add_argument("--volume-batch-size", type=int, default=32)
    p.add_argument("--out", default="results.json")
    p.add_argument("--markdown", default="results.md")
    p.add_argument("--_job", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 3), min(args.warmup, 1)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args._job:  # a child process of --isolate
        Path(args._result).write_text(json.dumps(run_job(json.loads(args._job))))
        return {}
    devices = [d for d in args.devices if not d.startswith("cuda") or torch.cuda.is_available()]
    skipped = sorted(set(args.devices) - set(devices))
    common = {k: getattr(args, k) for k in ("image_size", "source_size", "repeats", "warmup", "amp", "threads",
                                             "volume_slices", "volume_batch_size")}
    report = {"meta": {**metadata(args), "skipped_devices": skipped}, "results": [], "volume": []}
    run = run_isolated if args.isolate else run_job
    for device in devices:
        for backbone in args.backbones:
            for b in args.batch_sizes:
                print(f"[speed] {backbone} {device} batch {b}", file=sys.stderr, flush=True)
                report["results"].append(run({**common, "kind": "images", "backbone": backbone, "device": device,
                                              "batch_size": b}))
            if args.volume:
                print(f"[speed] {backbone} {device} volume", file=sys.stderr, flush=True)
                report["volume"].append(run({**common, "kind": "volume", "backbone": backbone, "device": device}))
    report["meta"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    for path, text in ((args.out, json.dumps(report, indent=2)), (args.markdown, markdown(report))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
