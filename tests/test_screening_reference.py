"""``multiad screen`` writes what it wrote before the inferer layer was put under it: scores, top slices,
thresholds and maps of three phantoms, screened with a seeded untrained run, equal the reference outputs
(``data/screening_reference.json``, written by the screening code as it was) to float rounding."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_multiad.config import RunConfig
from monai_multiad.data.synthetic_volumes import make_phantom_volume, write_nifti
from monai_multiad.networks import MultiAD
from monai_multiad.run_folder import save_model
from test_journeys import multiad

REFERENCE = Path(__file__).parent / "data" / "screening_reference.json"


def test_screen_outputs_equal_the_reference(tmp_path):
    torch.manual_seed(0)
    cfg = RunConfig(backbone="resnet18", pretrained="none", discriminator=False, in_channels=1, image_size=48,
                    memory_bank=0, segmentation_head_steps=0)
    save_model(tmp_path / "run" / "model.pt", MultiAD("resnet18", in_channels=1, pretrained=False,
                                                      discriminator=False), cfg, fusion_stats={"threshold": 1.0})
    for i in range(3):
        image, _ = make_phantom_volume((40, 36, 12), lesion=i == 1, seed=i)
        write_nifti(tmp_path / "data" / f"case_{i}.nii.gz", np.round(image).astype(np.int16))
    multiad(tmp_path, "screen", "data", "--run", "run", "--out", "out", "--device", "cpu")
    rows = json.loads((tmp_path / "out" / "report.json").read_text())
    reference = json.loads(REFERENCE.read_text())
    assert [r["name"] for r in rows] == [r["name"] for r in reference]
    for row, ref in zip(rows, reference):
        for key in ("anomalous", "threshold", "top_slices", "num_slices", "screened_slices", "threshold_source"):
            assert row[key] == ref[key], (row["name"], key)
        assert row["scan_score"] == pytest.approx(ref["scan_score"], rel=1e-5)
        with open(tmp_path / "out" / row["name"] / "slice_scores.csv", newline="") as f:
            slices = [(int(r["slice"]), float(r["score"])) for r in csv.DictReader(f)]
        assert [k for k, _ in slices] == [k for k, _ in ref["slice_scores"]]
        np.testing.assert_allclose([s for _, s in slices], [s for _, s in ref["slice_scores"]], rtol=1e-5)
        amap = nib.load(tmp_path / "out" / row["name"] / "anomaly_map.nii.gz").get_fdata()
        assert list(amap.shape) == ref["map_shape"]
        assert amap.sum() == pytest.approx(ref["map_sum"], rel=1e-5) and amap.max() == pytest.approx(ref["map_max"],
                                                                                                     rel=1e-5)
