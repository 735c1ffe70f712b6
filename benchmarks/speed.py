"""Speed benchmark of Multi-AD: inference pipeline vs bare networks, training, memory, volumes.

Per backbone, batch size and device, at ``--image-size`` (256) px:

* ``pipeline``: uint8 H x W x C numpy images -> float [0, 1] tensor on the device, resized with
  antialiasing -> ``MultiAD`` eval forward (stage maps -> fused map -> score) -> numpy on the CPU;
* ``bare``: ``model.teacher(xn)`` + ``model.student(xn)`` on an already normalised on-device batch,
  the networks as inference loads them (BatchNorm folded into the convolutions, ``load_model(...,
  fold_batchnorm=True)``); ``bare unfolded``: the same networks as trained, for the folding's speed-up;
* ``overhead``: pipeline time / bare time (what the pipeline adds to the networks' own compute);
* ``train``: one ``MultiADTrainer`` iteration (distillation + adversarial loss, two optimizer steps);
* memory: CUDA ``max_memory_allocated``; CPU: peak RSS (``/proc/self/statm`` sampled every 2 ms)
  above the RSS just before the first pass, each configuration in a fresh process (``--isolate``);
* ``volume``: ``monai_multiad.scan_outputs.screen_path`` end to end on a NIfTI phantom of
  size x size x ``--volume-slices`` vs the bare networks on the same number of slices;
* ``cohort``: ``monai_multiad.cohort.screen_paths`` (what ``multiad screen`` runs on a folder) over
  ``--cohort-volumes`` phantoms of size x size x ``--cohort-slices``, once per ``--cohort-workers``
  value (DataLoader processes reading the next scans and a writer thread; 0: all in turn), against the
  bare networks on all the slices it screened (the target: end to end at most 1.5x the model compute).

Timings: ``--warmup`` untimed runs, then the median of ``--repeats`` (CUDA synchronised). What is
compared in a ratio (pipeline and bare networks; Multi-AD and STFPM) is timed interleaved, call by
call, so that a change of load or clock during the run weighs on both alike.
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

WEIGHTS_NOTE = "efficientnet_lite0: real ImageNet weights; others: random weights (speed does not depend on weight values)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_together(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median seconds of each of ``fns`` ({name: callable}), the calls alternated round by round
    (``warmup`` untimed rounds, then ``repeats`` timed ones)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict = {name: [] for name in fns}
    for _ in range(max(repeats, 1)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    return timed_together({"fn": fn}, device, warmup, repeats)["fn"]


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


def preprocessor(size: int, device: torch.device):
    """What ``multiad predict`` uses: uint8 H x W x C images sent as they are, scaled and resized on ``device``."""
    from monai_multiad.data.preprocess import DevicePreprocessor

    return DevicePreprocessor(size, 3, device)


def build_model(backbone: str, device: torch.device, fold: bool = False):
    """The network as a run places it (``RunConfig.memory_format``: channels-last on the CPU by default);
    ``fold=True``: as inference loads it, BatchNorm folded (``run_folder.load_model``'s order)."""
    from monai_multiad.config import RunConfig
    from monai_multiad.networks import MultiAD
    from monai_multiad.run_folder import on_device

    model = MultiAD(backbone, in_channels=3, pretrained=backbone == "efficientnet_lite0")
    if fold:
        model.fold_batchnorm_()
    return on_device(model, RunConfig(backbone=backbone), device).eval()


def trainer_step_times(model, x, opt, d_opt, adversarial_weight: float, device: torch.device, amp: bool,
                       warmup: int, repeats: int, memory: PeakMemory | None = None,
                       teacher_cache: bool = False) -> list[float]:
    """Seconds of ``repeats`` ``MultiADTrainer`` iterations on the batch ``x`` after a first (memory) step and
    ``warmup`` untimed ones. ``d_opt=None`` or weight 0: the default training, without discriminator.
    ``teacher_cache``: the teacher's features are cached in the first step and reused in the timed ones (a
    training epoch after the first)."""
    from ignite.engine import Events

    from monai_multiad.engines.teacher_cache import TeacherFeatureCache
    from monai_multiad.engines.trainer import MultiADTrainer

    steps = warmup + max(repeats, 1) + 1
    batch = {"image": x, "path": [f"image{i}" for i in range(x.shape[0])]}
    trainer = MultiADTrainer(device, 1, [batch] * steps, model, opt, d_opt,
                             adversarial_weight=adversarial_weight, epoch_length=steps, amp=amp,
                             teacher_cache=TeacherFeatureCache(1 << 34) if teacher_cache else None)
    times: list[float] = []

    @trainer.on(Events.ITERATION_STARTED)
    def _start(engine):
        _sync(device)
        if engine.state.iteration == 1 and memory is not None:
            memory.__enter__()
        engine.state.t0 = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _end(engine):
        _sync(device)
        times.append(time.perf_counter() - engine.state.t0)
        if engine.state.iteration == 1 and memory is not None:
            memory.__exit__()

    trainer.run()
    return times[1 + warmup:]  # the first (memory) step and the warm-up are untimed


def bench_images(job: dict) -> dict:
    device, b, size = torch.device(job["device"]), job["batch_size"], job["image_size"]
    amp = bool(job["amp"]) and device.type == "cuda"
    torch.manual_seed(0)
    model = build_model(job["backbone"], device)  # as trained: the training step and the unfolded networks
    torch.manual_seed(0)
    infer = build_model(job["backbone"], device, fold=True)  # as predict and screen load it
    rng = np.random.default_rng(0)
    src = job["source_size"]
    images = [rng.integers(0, 256, (src, src, 3), dtype=np.uint8) for _ in range(b)]
    prep = preprocessor(size, device)

    @torch.no_grad()
    def pipeline():
        with torch.autocast(device.type, enabled=amp):
            amap, score = infer(prep(images))
        return amap.float().cpu().numpy(), score.float().cpu().numpy()

    xn = infer.normalize(prep(images))

    def networks(net):
        @torch.no_grad()
        def bare():
            with torch.autocast(device.type, enabled=amp):
                return net.teacher(xn), net.student(xn)
        return bare

    with PeakMemory(device) as mem_inf:
        pipeline()
    t = timed_together({"pipeline": pipeline, "bare": networks(infer), "unfolded": networks(model)}, device,
                       job["warmup"], job["repeats"])
    t_pipe, t_bare = t["pipeline"], t["bare"]

    x = torch.rand(b, 3, size, size)
    opt = torch.optim.Adam(model.student.parameters(), lr=1e-3, weight_decay=1e-5)
    d_opt = torch.optim.Adam(model.discriminator.parameters(), lr=1e-4, betas=(0.5, 0.999))
    mem_train = PeakMemory(device)
    step_times = trainer_step_times(model, x, opt, d_opt, 0.1, device, amp, job["warmup"], job["repeats"], mem_train)
    t_train = statistics.median(step_times)
    return {
        "backbone": job["backbone"], "batch_size": b, "device": job["device"], "amp": amp,
        "weights": "imagenet" if job["backbone"] == "efficientnet_lite0" else "random",
        "pipeline_ms": 1000 * t_pipe, "pipeline_images_per_s": b / t_pipe,
        "bare_ms": 1000 * t_bare, "bare_images_per_s": b / t_bare,
        "overhead_ratio": t_pipe / t_bare,
        "bare_unfolded_ms": 1000 * t["unfolded"], "folding_speedup": t["unfolded"] / t_bare,
        "train_ms_per_step": 1000 * t_train, "train_images_per_s": b / t_train,
        "inference_peak_mb": mem_inf.peak_mb, "train_peak_mb": mem_train.peak_mb,
    }


def bare_slices(model, n: int, batch_size: int, size: int, device: torch.device):
    """What screening's networks alone cost: a callable running teacher and student over ``n``
    normalised slices in batches of ``batch_size`` (fp32, as screening runs them)."""
    xn = torch.rand(min(batch_size, max(n, 1)), 3, size, size, device=device)

    @torch.no_grad()
    def bare():
        for start in range(0, n, xn.shape[0]):
            x = xn[: min(xn.shape[0], n - start)]
            model.teacher(x), model.student(x)

    return bare


def bench_volume(job: dict) -> dict:
    row = {"backbone": job["backbone"], "device": job["device"], "slices": job["volume_slices"]}
    try:
        from monai_multiad import scan_outputs, screening
    except ImportError as e:
        return {**row, "status": f"skipped: screening not available ({e})"}
    from monai_multiad.data.synthetic_volumes import make_phantom_volume, write_nifti

    device, size, n = torch.device(job["device"]), job["image_size"], job["volume_slices"]
    model = build_model(job["backbone"], device, fold=True)
    work = Path(tempfile.mkdtemp(prefix="multiad_speed_"))
    image, _ = make_phantom_volume((size, size, n), lesion=True, seed=0)
    path = write_nifti(work / "phantom.nii.gz", np.round(image).astype(np.int16))
    kwargs = {"device": job["device"], "batch_size": job["volume_batch_size"], "image_size": size,
              "modality": "mri", "progress": False}
    accepted = {*inspect.signature(scan_outputs.screen_path).parameters,  # pass only the options it names
                *inspect.signature(screening.screen_volume).parameters}
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    runs, reports = iter(range(10**6)), []
    warmup, repeats = min(job["warmup"], 1), min(max(job["repeats"], 1), 3)
    try:
        e2e = timed(lambda: reports.append(scan_outputs.screen_path(model, path, work / f"out{next(runs)}", **kwargs)),
                    device, warmup, repeats)
    except Exception as e:  # a screening error is a result of this benchmark, not its end
        return {**row, "status": f"failed: {type(e).__name__}: {e}"}
    screened = int(reports[-1].get("screened_slices", n)) if isinstance(reports[-1], dict) else n
    t_bare = timed(bare_slices(model, screened, job["volume_batch_size"], size, device), device, warmup, repeats)
    files = sorted(str(p.relative_to(work / "out0")) for p in (work / "out0").rglob("*") if p.is_file())
    shutil.rmtree(work, ignore_errors=True)
    return {**row, "status": "ok", "screened_slices": screened, "end_to_end_s": e2e, "model_s": t_bare,
            "ratio": e2e / t_bare if screened else None, "slices_per_s": n / e2e, "files": files}


def bench_cohort(job: dict) -> dict:
    """``cohort.screen_paths`` over a folder of phantom volumes, per number of workers, against the
    bare networks on the slices it screened (one timed pass each after a one-scan warm-up)."""
    row = {"backbone": job["backbone"], "device": job["device"], "volumes": job["cohort_volumes"],
           "slices": job["cohort_slices"], "map_format": job["cohort_map_format"]}
    try:
        from monai_multiad.cohort import screen_paths
    except ImportError as e:
        return {**row, "status": f"skipped: cohort screening not available ({e})"}
    from monai_multiad.data.synthetic_volumes import make_phantom_volume, write_nifti

    device, size = torch.device(job["device"]), job["image_size"]
    model = build_model(job["backbone"], device, fold=True)
    work = Path(tempfile.mkdtemp(prefix="multiad_cohort_"))
    try:
        paths = []
        for i in range(job["cohort_volumes"]):
            image, _ = make_phantom_volume((size, size, job["cohort_slices"]), lesion=i % 2 == 0, seed=i)
            paths.append(write_nifti(work / "scans" / f"scan{i:03d}.nii.gz", np.round(image).astype(np.int16)))
        common = {"device": job["device"], "batch_size": job["volume_batch_size"], "image_size": size,
                  "modality": "mri", "progress": False, "resume": False, "map_format": job["cohort_map_format"]}
        screen_paths(model, paths[:1], work / "warmup", workers=0, **common)
        timings = []
        for workers in job["cohort_workers"]:
            _sync(device)
            t0 = time.perf_counter()
            rows = screen_paths(model, paths, work / f"out_w{workers}", workers=workers, **common)
            _sync(device)
            failed = [r["name"] for r in rows if r.get("status") != "ok"]
            if failed:
                return {**row, "status": f"failed: {len(failed)} scans not screened ({', '.join(failed[:3])})"}
            timings.append({"workers": workers, "end_to_end_s": time.perf_counter() - t0,
                            "screened_slices": sum(int(r["screened_slices"]) for r in rows)})
        screened = timings[0]["screened_slices"]
        t_bare = timed(bare_slices(model, screened, job["volume_batch_size"], size, device), device, 0, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**row, "status": "ok", "screened_slices": screened, "model_s": t_bare,
            "runs": [{**t, "ratio": t["end_to_end_s"] / t_bare} for t in timings]}


COST_PARTS = ("teacher_forward_ms", "student_forward_ms", "student_step_ms", "discriminator_ms")


def bench_train_cost(job: dict) -> dict:
    """What one training step costs, part by part, at ``cost_batch_size`` x ``cost_size`` px.

    * ``teacher_forward_ms``: the frozen teacher's forward (no gradient);
    * ``student_forward_ms``: the student's forward in training mode (graph recorded), alone;
    * ``student_step_ms``: student forward + distillation loss + backward + Adam step (teacher features given);
    * ``discriminator_ms``: what the discriminator adds when on: the adversarial term's forward and backward
      (into the student's stage-4 features) and the discriminator's own loss, backward and Adam step;
    * ``step_ms`` / ``step_with_discriminator_ms``: whole ``MultiADTrainer`` iterations, discriminator off (the
      default) and on (the paper's), so the parts can be checked against the whole;
    * ``step_cached_ms``: a whole iteration (discriminator off) whose teacher features come from the training's
      feature cache, as in every epoch after the first (``teacher_cache_mb``).

    ``variant``: ``eager``; ``channels_last`` (model and batch in channels-last memory format);
    ``compile`` (teacher and student through ``torch.compile``; the discriminator stays eager, as its
    ``requires_grad`` switch would recompile it). The non-eager variants run on CUDA only unless
    ``cpu_variants`` (CPU inductor compiles for minutes on a small machine).
    """
    from monai_multiad.losses import AdversarialLoss, DiscriminatorLoss, DistillationLoss
    from monai_multiad.networks import MultiAD

    device, b, size, variant = torch.device(job["device"]), job["cost_batch_size"], job["cost_size"], job["variant"]
    row = {"backbone": job["backbone"], "device": job["device"], "batch_size": b, "image_size": size,
           "variant": variant}
    if variant != "eager" and device.type != "cuda" and not job.get("cpu_variants"):
        return {**row, "status": "skipped on CPU: measured on CUDA only (--cpu-variants to measure it here)"}
    amp = bool(job["amp"]) and device.type == "cuda"
    torch.manual_seed(0)
    model = MultiAD(job["backbone"], in_channels=3, pretrained=job["backbone"] == "efficientnet_lite0",
                    discriminator=True).to(device).train()
    fmt = torch.channels_last if variant == "channels_last" else torch.contiguous_format
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    if variant == "compile":
        model.teacher, model.student = torch.compile(model.teacher), torch.compile(model.student)
    teacher, student, disc = model.teacher, model.student, model.discriminator
    x = torch.rand(b, 3, size, size, device=device).contiguous(memory_format=fmt)
    xn = model.normalize(x)
    distill, adversarial, disc_loss = DistillationLoss(), AdversarialLoss(), DiscriminatorLoss()
    opt = torch.optim.Adam(student.parameters(), lr=1e-3, weight_decay=1e-5)
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.999))

    def autocast():
        return torch.autocast(device.type, enabled=amp)

    @torch.no_grad()
    def teacher_forward():
        with autocast():
            return teacher(xn)

    t_feats = teacher_forward()

    def student_forward():
        with autocast():
            return student(xn)

    def student_step():
        with autocast():
            loss = distill(t_feats, student(xn))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.no_grad(), autocast():
        s_top = student(xn)[-1].detach()

    def discriminator():
        s = s_top.clone().requires_grad_(True)  # stands for the student's graph: the gradient stops here
        disc.requires_grad_(False)
        with autocast():
            adv = adversarial(disc, s)
        (0.1 * adv).backward()
        disc.requires_grad_(True)
        with autocast():
            d = disc_loss(disc, t_feats[-1], s)
        d_opt.zero_grad(set_to_none=True)
        d.backward()
        d_opt.step()

    warmup, repeats = job["warmup"], job["repeats"]
    t0 = time.perf_counter()
    for fn in (teacher_forward, student_forward, student_step, discriminator):  # compiles here, untimed
        fn()
    _sync(device)
    first_s = time.perf_counter() - t0
    parts = {name: 1000 * timed(fn, device, warmup, repeats) for name, fn in
             zip(COST_PARTS, (teacher_forward, student_forward, student_step, discriminator))}
    off = statistics.median(trainer_step_times(model, x, opt, None, 0.0, device, amp, warmup, repeats))
    on = statistics.median(trainer_step_times(model, x, opt, d_opt, 0.1, device, amp, warmup, repeats))
    cached = statistics.median(trainer_step_times(model, x, opt, None, 0.0, device, amp, warmup, repeats,
                                                  teacher_cache=True))
    return {**row, "status": "ok", "amp": amp, **parts,
            "step_ms": 1000 * off, "step_with_discriminator_ms": 1000 * on, "step_cached_ms": 1000 * cached,
            "cached_speedup": off / cached,
            "discriminator_share_of_step": (on - off) / on,
            "parts_sum_ms": parts["teacher_forward_ms"] + parts["student_step_ms"],
            "parts_sum_with_discriminator_ms": (parts["teacher_forward_ms"] + parts["student_step_ms"]
                                                + parts["discriminator_ms"]),
            "first_pass_s": first_s, "train_images_per_s": b / off}


PEER_MISSING = "anomalib is not installed: --peer skipped (pip install anomalib to time its STFPM beside Multi-AD)"


def peer_model(size: int):
    """anomalib's STFPM (``STFPMModel``) on timm's ``efficientnet_lite0``, its four stages at strides 4, 8, 16
    and 32 as ours, random weights (timm would download ImageNet weights; speed does not depend on them)."""
    import timm

    try:
        from anomalib.models.image.stfpm.torch_model import STFPMModel  # anomalib >= 1.0
    except ImportError:
        from anomalib.models.stfpm.torch_model import STFPMModel  # anomalib 0.x
    probe = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True)
    layers = [i["module"] for i in probe.feature_info.info if i["reduction"] in (4, 8, 16, 32)]
    create = timm.create_model
    timm.create_model = lambda *a, **k: create(*a, **{**k, "pretrained": False})
    try:
        kwargs = {"layers": layers, "backbone": "efficientnet_lite0"}
        if "input_size" in inspect.signature(STFPMModel).parameters:
            kwargs["input_size"] = (size, size)
        return STFPMModel(**kwargs), layers
    finally:
        timm.create_model = create


def bench_peer(job: dict) -> dict:
    """Eval forward of anomalib's STFPM and of Multi-AD (both Lite0, same batch, same threads): networks,
    maps and score. Ratio = ours / STFPM (at most 1: ours is not slower)."""
    device, b, size = torch.device(job["device"]), job["batch_size"], job["image_size"]
    amp = bool(job["amp"]) and device.type == "cuda"
    torch.manual_seed(0)
    ours = build_model("efficientnet_lite0", device, fold=True)  # as predict and screen load it
    torch.manual_seed(0)
    unfolded = build_model("efficientnet_lite0", device)
    peer, layers = peer_model(size)
    peer = peer.to(device).eval()
    x = torch.rand(b, 3, size, size, device=device)

    def run(model):
        @torch.no_grad()
        def fn():
            with torch.autocast(device.type, enabled=amp):
                return model(x)
        return fn

    t = timed_together({"ours": run(ours), "peer": run(peer), "unfolded": run(unfolded)}, device,
                       job["warmup"], job["repeats"])
    t_ours, t_peer = t["ours"], t["peer"]
    import anomalib

    return {"device": job["device"], "batch_size": b, "image_size": size, "amp": amp, "status": "ok",
            "anomalib": anomalib.__version__, "stfpm_layers": layers, "ours_ms": 1000 * t_ours,
            "stfpm_ms": 1000 * t_peer, "ratio": t_ours / t_peer, "ours_unfolded_ms": 1000 * t["unfolded"],
            "ratio_unfolded": t["unfolded"] / t_peer}


def run_job(job: dict) -> dict:
    from monai_multiad.allocator import keep_freed_memory, kept_freed_memory

    if job.get("keep_freed_memory", True):  # as multiad runs: freed CPU memory kept for the next pass
        keep_freed_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(job.get("threads") or threads)
    try:
        kinds = {"volume": bench_volume, "cohort": bench_cohort, "images": bench_images,
                 "train_cost": bench_train_cost, "peer": bench_peer}
        return {**kinds[job["kind"]](job), "freed_memory_kept": kept_freed_memory()}
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
        "freed_memory_kept": args.keep_freed_memory,
        "weights": WEIGHTS_NOTE, "memory": {d: memory_method(d) for d in args.devices},
    }


def markdown(report: dict) -> str:
    m = report["meta"]
    sizes = (f"{m['image_size']} px from {m['source_size']} px uint8 images; "
             if report["results"] or report["volume"] or report.get("cohort") else "")
    load = [[round(x, 1) for x in m.get(k) or []] for k in ("load_average_at_start", "load_average_at_end")]
    malloc = ("freed CPU memory kept (multiad's default)" if m.get("freed_memory_kept", True)
              else "glibc's malloc as it is (--glibc-malloc)")
    lines = [f"# Multi-AD speed ({m['date']})", "",
             f"torch {m['torch']}, monai {m['monai']}, CPU: {m['cpu']} ({m['torch_threads']} threads), "
             f"CUDA: {m['cuda_device'] or 'none'}; {sizes}median of {m['repeats']} after {m['warmup']} warm-up; "
             f"{m['weights']}; {malloc}; load average (1, 5, 15 min) {load[0]} at start, {load[1]} at end.", ""]
    if report["results"]:
        lines += ["| backbone | device | batch | pipeline img/s | bare img/s | pipeline / bare | bare unfolded img/s "
                  "| folding speed-up | train img/s | inference peak MiB | train peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["results"]:
            if "pipeline_ms" not in r:
                lines.append(f"| {r['backbone']} | {r['device']} | {r['batch_size']} | {r.get('status')} |" + " |" * 7)
                continue
            lines.append(f"| {r['backbone']} | {r['device']} | {r['batch_size']} | {r['pipeline_images_per_s']:.2f} | "
                         f"{r['bare_images_per_s']:.2f} | {r['overhead_ratio']:.3f} | "
                         f"{r['batch_size'] / r['bare_unfolded_ms'] * 1000:.2f} | {r['folding_speedup']:.3f} | "
                         f"{r['train_images_per_s']:.2f} | "
                         f"{r['inference_peak_mb']:.0f} | {r['train_peak_mb']:.0f} |")
        lines += ["", "Memory: " + "; ".join(f"{d}: {v}" for d, v in m["memory"].items()), ""]
    if report["volume"]:
        lines += ["| volume screening | device | slices (screened) | end to end s | bare networks s | ratio | status |",
                  "|---|---|---|---|---|---|---|"]
        for v in report["volume"]:
            ok = v.get("status") == "ok"
            cells = f"{v['end_to_end_s']:.2f} | {v['model_s']:.2f} | {v['ratio'] or 0:.2f}" if ok else " | | "
            n = f"{v.get('slices', v.get('volume_slices'))} ({v.get('screened_slices', '-')})"
            lines.append(f"| {v['backbone']} | {v['device']} | {n} | {cells} | {v.get('status')} |")
        lines.append("")
    if report.get("cohort"):
        lines += ["| cohort screening (`multiad screen` on a folder) | device | volumes x slices (screened) | map format "
                  "| workers | end to end s | bare networks s | ratio | status |", "|---|---|---|---|---|---|---|---|---|"]
        for c in report["cohort"]:
            head = (f"| {c['backbone']} | {c['device']} | {c['volumes']} x {c['slices']} "
                    f"({c.get('screened_slices', '-')}) | {c['map_format']} |")
            if c.get("status") != "ok":
                lines.append(head + " | | | | " + f"{c.get('status')} |")
                continue
            for r in c["runs"]:
                lines.append(f"{head} {r['workers']} | {r['end_to_end_s']:.2f} | {c['model_s']:.2f} | {r['ratio']:.2f} | ok |")
        lines.append("")
    if report.get("train_cost"):
        lines += ["Training cost per step (ms; teacher features given to the student step; discriminator = adversarial "
                  "term + its own loss, backward and step; steps are whole MultiADTrainer iterations):", "",
                  "| backbone | device | px | batch | variant | teacher fwd | student fwd | student fwd+bwd+step "
                  "| discriminator | step (D off) | step (D on) | D share of step | step, teacher cached | speed-up "
                  "| status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["train_cost"]:
            px, b = r.get("cost_size", r.get("image_size")), r.get("cost_batch_size", r.get("batch_size"))
            head = f"| {r['backbone']} | {r['device']} | {px} | {b} | {r['variant']} |"
            if r.get("status") != "ok":
                lines.append(head + " |" * 9 + f" {r.get('status')} |")
                continue
            cells = " | ".join(f"{r[k]:.1f}" for k in (*COST_PARTS, "step_ms", "step_with_discriminator_ms"))
            lines.append(f"{head} {cells} | {100 * r['discriminator_share_of_step']:.0f} % | "
                         f"{r['step_cached_ms']:.1f} | {r['cached_speedup']:.2f}x | ok |")
        lines.append("")
    if report.get("peer"):
        lines += ["| peer: anomalib STFPM vs Multi-AD (Lite0, eval forward) | device | batch | px | Multi-AD ms "
                  "| STFPM ms | Multi-AD / STFPM | Multi-AD unfolded ms | unfolded / STFPM |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in report["peer"]:
            if r.get("status") != "ok":
                lines.append(f"| {r.get('status')} | {r['device']} | {r['batch_size']} | | | | | | |")
                continue
            lines.append(f"| anomalib {r['anomalib']} | {r['device']} | {r['batch_size']} | {r['image_size']} | "
                         f"{r['ours_ms']:.1f} | {r['stfpm_ms']:.1f} | {r['ratio']:.3f} | "
                         f"{r['ours_unfolded_ms']:.1f} | {r['ratio_unfolded']:.3f} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


MODES = ("pipeline", "volume", "cohort", "train-cost")
COST_VARIANTS = ("eager", "channels_last", "compile")


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
    p.add_argument("--glibc-malloc", dest="keep_freed_memory", action="store_false",
                   help="leave glibc's malloc as it is (it unmaps large freed blocks: page faults in every pass)\n"
                        "instead of keeping freed memory as multiad does (monai_multiad.allocator)")
    p.add_argument("--no-volume", dest="volume", action="store_false", help="skip volume screening")
    p.add_argument("--volume-slices", type=int, default=155)
    p.add_argument("--volume-batch-size", type=int, default=32)
    p.add_argument("--cohort-volumes", type=int, default=20, help="cohort mode: phantom volumes screened")
    p.add_argument("--cohort-slices", type=int, default=48, help="cohort mode: slices per phantom volume")
    p.add_argument("--cohort-workers", nargs="+", type=int, default=[0, 2],
                   help="cohort mode: DataLoader worker counts to time (0: all in turn)")
    p.add_argument("--cohort-map-format", default="nii.gz", choices=("nii.gz", "nii"), help="cohort mode: map files")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="pipeline: inference pipeline vs bare networks (and a training step); volume: screening\n"
                        "one NIfTI volume; cohort: screening a folder of volumes (--cohort-*); train-cost: a\n"
                        "training step part by part (teacher, student, discriminator) at --cost-batch-size\n"
                        "and each of --cost-sizes")
    p.add_argument("--cost-batch-size", type=int, default=16)
    p.add_argument("--cost-sizes", nargs="+", type=int, default=[256, 128])
    p.add_argument("--cost-variants", nargs="+", choices=COST_VARIANTS, default=list(COST_VARIANTS),
                   help="eager; channels_last; compile (torch.compile of teacher and student). The last two\n"
                        "run on CUDA only unless --cpu-variants")
    p.add_argument("--cpu-variants", action="store_true", help="measure channels_last / compile on the CPU too")
    p.add_argument("--peer", action="store_true",
                   help="only: anomalib's STFPM (timm efficientnet_lite0) beside Multi-AD's Lite0, eval forward,\n"
                        "same inputs and threads, at --batch-sizes x --image-size; needs anomalib installed\n"
                        "(without it: one line, exit status 0)")
    p.add_argument("--out", default="results.json")
    p.add_argument("--markdown", default="results.md")
    p.add_argument("--_job", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 3), min(args.warmup, 1)
    if not args.volume:
        args.modes = [m for m in args.modes if m != "volume"]
    return args


def peer_available() -> bool:
    import importlib

    try:
        for name in ("anomalib", "timm"):
            importlib.import_module(name)
    except ImportError:
        return False
    return True


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args._job:  # a child process of --isolate
        Path(args._result).write_text(json.dumps(run_job(json.loads(args._job))))
        return {}
    if args.peer and not peer_available():
        print(PEER_MISSING)
        return {}
    devices = [d for d in args.devices if not d.startswith("cuda") or torch.cuda.is_available()]
    skipped = sorted(set(args.devices) - set(devices))
    common = {k: getattr(args, k) for k in ("image_size", "source_size", "repeats", "warmup", "amp", "threads",
                                             "keep_freed_memory", "volume_slices", "volume_batch_size",
                                             "cost_batch_size", "cpu_variants",
                                             "cohort_volumes", "cohort_slices", "cohort_workers", "cohort_map_format")}
    report = {"meta": {**metadata(args), "skipped_devices": skipped, "modes": ["peer"] if args.peer else args.modes},
              "results": [], "volume": [], "cohort": [], "train_cost": [], "peer": []}
    run = run_isolated if args.isolate else run_job
    for device in devices:
        if args.peer:
            for b in args.batch_sizes:
                print(f"[speed] peer {device} batch {b}", file=sys.stderr, flush=True)
                report["peer"].append(run({**common, "kind": "peer", "device": device, "batch_size": b}))
            continue
        for backbone in args.backbones:
            if "pipeline" in args.modes:
                for b in args.batch_sizes:
                    print(f"[speed] {backbone} {device} batch {b}", file=sys.stderr, flush=True)
                    report["results"].append(run({**common, "kind": "images", "backbone": backbone, "device": device,
                                                  "batch_size": b}))
            if "volume" in args.modes:
                print(f"[speed] {backbone} {device} volume", file=sys.stderr, flush=True)
                report["volume"].append(run({**common, "kind": "volume", "backbone": backbone, "device": device}))
            if "cohort" in args.modes:
                print(f"[speed] {backbone} {device} cohort", file=sys.stderr, flush=True)
                report["cohort"].append(run({**common, "kind": "cohort", "backbone": backbone, "device": device}))
            if "train-cost" in args.modes:
                for size in args.cost_sizes:
                    for variant in args.cost_variants:
                        print(f"[speed] {backbone} {device} training cost {size} px {variant}", file=sys.stderr,
                              flush=True)
                        report["train_cost"].append(run({**common, "kind": "train_cost", "backbone": backbone,
                                                         "device": device, "cost_size": size, "variant": variant}))
    report["meta"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    for path, text in ((args.out, json.dumps(report, indent=2)), (args.markdown, markdown(report))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
