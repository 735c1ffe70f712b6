"""The README's demo: generate data, train briefly, evaluate, predict and screen. No download.

Everything the demo writes goes under one folder (``./multiad_demo`` by default); it ends with a
short summary of what a newcomer should see (the textures' image AUROC, whether the phantom scan
was flagged and where its most anomalous slices are) and where to look, and writes the same as
``demo_report.json`` (atomically), with ``checks`` saying whether each expectation was met.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from monai_multiad.config import RunConfig
from monai_multiad.inference import evaluate, format_table, predict
from monai_multiad.outputs import display_path as _shown, write_json
from monai_multiad.workflow import train

__all__ = ["run_demo", "demo_config", "summary_lines", "MIN_IMAGE_AUROC"]

logger = logging.getLogger("monai_multiad")

#: the image AUROC the textures must reach for the demo to have shown what it should
MIN_IMAGE_AUROC = 0.9


def demo_config(dataset_dir: Path, steps: int, device: str = "auto") -> RunConfig:
    """A small, fast configuration of the default model (Lite0 ImageNet teacher) at 128 px."""
    return RunConfig(dataset_dir=str(dataset_dir), image_size=128, in_channels=3, batch_size=8,
                     epochs=max(1, steps // 4), max_steps=steps, early_stop_patience=0, val_fraction=0.2,
                     discriminator_channels=(64, 128), device=device, seed=0)


def run_demo(out: Path, steps: int = 60, device: str = "auto") -> dict:
    """Run the demo into ``out`` and return its report (also ``out/demo_report.json``)."""
    from monai_multiad.data.synthetic_images import write_mvtec_dataset

    t0 = time.perf_counter()
    out = Path(out).absolute()  # one root for every file below; paths are shown relative to the working folder
    data = write_mvtec_dataset(out / "data" / "textures", n_train=40, n_test_good=10, n_test_defect=10,
                               size=128, channels=3, seed=0)
    print(f"[1/4] generated a textured dataset with planted defects in {_shown(data)}")
    cfg = demo_config(data, steps, device)
    summary = train(cfg, out / "run")
    print(f"[2/4] trained {summary['iterations']} iterations in {summary['train_seconds']} s on {summary['device']}")
    metrics = evaluate(out / "run", out_dir=out / "run")
    print("[3/4] test metrics:\n" + format_table({k: v for k, v in metrics.items()
                                                 if k not in ("dataset_dir", "pixel_metrics")}))
    results = predict(out / "run", [data / "test" / "scratch"], out / "predictions")
    for r in results[:3]:
        print(f"      {Path(r['path']).name}: score {r['score']:.3f} (threshold {r['threshold']:.3f})")
    print(f"[4/4] overlays and predictions.json in {_shown(out / 'predictions')}")
    from monai_multiad.screening import demo_screen

    screening = demo_screen(out, device=device)
    report = {
        "training": summary,
        "evaluation": metrics,
        "predictions": {"folder": str(out / "predictions"),
                        "overlays": [r["overlay"] for r in results if "overlay" in r],
                        "flagged": sum(bool(r.get("anomalous")) for r in results), "images": len(results)},
        "contact_sheet": str(out / "run" / "contact_sheet.png"),
        "screening": screening,
        "checks": {
            "textures_image_auroc": metrics["image_auroc"] >= MIN_IMAGE_AUROC,
            "phantom_flagged": bool(screening["anomalous"]),
            "top_slices_in_lesion": screening["top_slices_in_lesion"] == len(screening["top_slices"]),
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "demo_report.json", report)
    print("\n".join(summary_lines(report, out)))
    return report


def summary_lines(report: dict, out: Path) -> list[str]:
    """The demo's closing summary: what was found and where to look."""
    ev, sc, pr, ok = report["evaluation"], report["screening"], report["predictions"], report["checks"]
    lesion = sc["lesion_slices"]
    flag = (f"FLAGGED as anomalous: scan score {sc['scan_score']:.3f} > normal threshold {sc['threshold']:.3f}"
            if sc["anomalous"] else
            f"NOT flagged: scan score {sc['scan_score']:.3f} <= normal threshold {sc['threshold']:.3f}")
    inside = f"{sc['top_slices_in_lesion']} of {len(sc['top_slices'])}"
    pixel = (f", pixel AUROC {ev['pixel_auroc']:.3f}, AUPRO {ev['aupro']:.3f}" if ev.get("pixel_auroc") is not None
             else "")
    unmet = [k for k, v in ok.items() if not v]
    return [
        "",
        "=" * 20 + " multiad demo: summary " + "=" * 20,
        f"textures  image AUROC {ev['image_auroc']:.3f} (expected >= {MIN_IMAGE_AUROC}){pixel}, "
        f"{ev['num_images']} test images; {pr['flagged']} of {pr['images']} scratched parts flagged",
        f"          overlays:      {_shown(pr['folder'])}/*_overlay.png",
        f"          contact sheet: {_shown(report['contact_sheet'])}",
        f"phantom   {flag}",
        f"          most anomalous slices {sc['top_slices']}: {inside} inside the lesion "
        f"(slices {lesion[0]}-{lesion[-1]})",
        f"          anomaly map:   {_shown(sc['map'])} (NIfTI, the scan's grid)",
        f"          montage:       {_shown(sc['montage'])}",
        f"report    {_shown(out / 'demo_report.json')}; {report['seconds']} s in all",
        "all as expected" if not unmet else f"NOT as expected: {', '.join(unmet)}",
    ]
