"""The README's demo: generate data, train briefly, evaluate, predict and screen. No download."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from monai_multiad.config import RunConfig
from monai_multiad.inference import evaluate, format_table, predict
from monai_multiad.workflow import train

__all__ = ["run_demo", "demo_config"]

logger = logging.getLogger("monai_multiad")


def demo_config(dataset_dir: Path, steps: int, device: str = "auto") -> RunConfig:
    """A small, fast configuration of the default model (Lite0 ImageNet teacher) at 128 px."""
    return RunConfig(dataset_dir=str(dataset_dir), image_size=128, in_channels=3, batch_size=8,
                     epochs=max(1, steps // 4), max_steps=steps, early_stop_patience=0, val_fraction=0.2,
                     discriminator_channels=(64, 128), device=device, seed=0)


def run_demo(out: Path, steps: int = 60, device: str = "auto") -> dict:
    from monai_multiad.data.synthetic_images import write_mvtec_dataset

    out = Path(out)
    data = write_mvtec_dataset(out / "data" / "textures", n_train=40, n_test_good=10, n_test_defect=10,
                               size=128, channels=3, seed=0)
    print(f"[1/4] generated a textured dataset with planted defects in {data}")
    cfg = demo_config(data, steps, device)
    summary = train(cfg, out / "run")
    print(f"[2/4] trained {summary['iterations']} iterations in {summary['train_seconds']} s on {summary['device']}")
    metrics = evaluate(out / "run", out_dir=out / "run")
    print("[3/4] test metrics:\n" + format_table({k: v for k, v in metrics.items() if k != "dataset_dir"}))
    results = predict(out / "run", [data / "test" / "scratch"], out / "predictions")
    for r in results[:3]:
        print(f"      {Path(r['path']).name}: score {r['score']:.3f} (threshold {r['threshold']:.3f})")
    print(f"[4/4] overlays and predictions.json in {out / 'predictions'}")
    report = {"training": summary, "evaluation": metrics}
    try:
        from monai_multiad.screening import demo_screen
    except ImportError:
        pass
    else:
        report["screening"] = demo_screen(out, device=device)
    (out / "demo_report.json").write_text(json.dumps(report, indent=2, default=str))
    return report
