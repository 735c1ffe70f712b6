"""Slice-level calibration on lgg_flair with the accuracy study's default lgg_flair model (128 px,
300 iterations, foreground on: runs/study/flair128/runs/nd+fg/lgg_flair, made by benchmarks/accuracy.py
--study): calibrated at FPR 0.05 on the normal slices of the validation patients (held out from
training), then measured on the test patients. Run from the project root:
``python benchmarks/calibration_lgg.py``. Prints one JSON line (docs/results.md)."""
import json, shutil, sys, numpy as np
from pathlib import Path
from sklearn.metrics import roc_auc_score
from monai_multiad.run_folder import load_model
from monai_multiad.data.volumes import dataset_splits
from monai_multiad.calibration import lesion_slices, calibrate, write_calibration
from monai_multiad.inferers import load_run
from monai_multiad.screening import screen_volume
src = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/study/flair128/runs/nd+fg/lgg_flair")
import tempfile
run_dir = Path(tempfile.mkdtemp()) / "run"; shutil.rmtree(run_dir, ignore_errors=True); shutil.copytree(src, run_dir)
_, cfg, _ = load_model(run_dir)
print("model", cfg.image_size, cfg.foreground, cfg.dataset_dir)
sp = dataset_splits(cfg)
val = [c.image for c in sp["valid"]]
print("validation patients (held out from training):", len(val))
record = calibrate(run_dir, val, 0.05, device="cpu", level="slice", labels={Path(s): Path(s).parent / "mask.nii.gz" for s in val})
write_calibration(run_dir, record)
part = record["slice"]; thr, (lo, hi) = part["threshold"], part["interval"]
print("calibration", part["n"], part["groups"], thr, part["calibration_fpr"], lo, hi)
run = load_run(run_dir, "cpu")
normal, tumour = [], []
for c in sp["test"]:
    res = screen_volume(run, c.image)
    lesion = lesion_slices(Path(c.image).parent / "mask.nii.gz", "axial")
    normal.append(np.array([s for k, s in res.slice_scores.items() if k not in lesion]))
    tumour.append(np.array([s for k, s in res.slice_scores.items() if k in lesion]))
n, t = np.concatenate(normal), np.concatenate(tumour)
print(json.dumps({"test_patients": len(normal), "normal_slices": int(n.size), "tumour_slices": int(t.size),
  "test_fpr": float(np.mean(n > thr)), "sensitivity": float(np.mean(t > thr)),
  "slice_auroc": float(roc_auc_score([0]*n.size + [1]*t.size, np.concatenate([n, t]))),
  "threshold": thr, "cal_fpr": part["calibration_fpr"], "interval": [lo, hi], "cal_slices": part["n"], "cal_patients": part["groups"]}))
