"""Intensity normalisation by modality (transforms/intensity.py) against the formula it implements."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_multiad.transforms import scale_intensity


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.float32, torch.float64])
def test_scaling_is_the_clipped_linear_map_bit_for_bit(dtype):
    """MONAI's ScaleIntensityRange does the mapping: the same float32 numbers as (x - lo) / (hi - lo) clipped,
    for a CT window, min-max and MRI percentiles, with the affine and metadata kept."""
    x = (torch.randn(1, 9, 10, 11, generator=torch.Generator().manual_seed(0)) * 300 + 100).clamp(0, 255).to(dtype)
    img = MetaTensor(x, affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])), meta={"source": "test"})
    flat = x.float().view(-1)
    fg = flat[flat != 0].double().numpy()
    cases = {"ct": ((-160.0, 240.0), {"window": (40, 400)}), "minmax": ((float(x.min()), float(x.max())), {}),
             "mri": (tuple(float(v) for v in np.percentile(fg, [0.5, 99.5])), {})}
    for mode, ((lo, hi), kw) in cases.items():
        out = scale_intensity(img, mode, **kw)
        assert type(out) is MetaTensor and out.dtype == torch.float32 and out.meta["source"] == "test"
        assert torch.equal(out.affine, img.affine)
        assert torch.equal(out.as_tensor(), ((x.float() - lo) / (hi - lo)).clamp(0.0, 1.0)), mode

