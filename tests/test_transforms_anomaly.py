"""Synthetic anomalies (transforms/anomaly.py): the mask, the blend formula and the seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_multiad.errors import MultiADInputError as InputError
from monai_multiad.transforms.anomaly import (
    ANOMALY_MODES,
    SyntheticAnomaly,
    SyntheticAnomalyd,
    perlin_mask,
    perlin_noise,
)


def _image(seed=0, c=1, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(c, size, size, generator=g) * 0.6 + 0.2  # no value at 0 or 1: every mode changes it


@pytest.mark.parametrize("mode", ANOMALY_MODES)
def test_the_mask_is_where_the_image_changed_and_nowhere_else(mode):
    x = _image(c=3)
    for seed in range(6):
        y, m = SyntheticAnomaly(mode, seed=seed)(x, source=_image(seed=9, c=3))
        assert m.shape == (1, 64, 64) and y.shape == x.shape and y.dtype == torch.float32
        changed = (y != x).any(0, keepdim=True)
        assert torch.equal(changed, m.bool()), (mode, seed)
        assert m.sum() > 0, (mode, seed)
        assert y.min() >= 0 and y.max() <= 1


def test_the_blend_follows_its_formula():
    """x' = x(1-m) + (1-b) src m + b x m: inside the mask (x' - x) / (src - x) is one number 1 - b, b in [0, b_max]."""
    x, src = _image(0), _image(1)
    ratios = []
    for seed in range(8):
        y, m = SyntheticAnomaly("patch", beta_max=0.5, seed=seed)(x, source=src)
        inside = m[0] > 0
        r = ((y - x)[0][inside] / (src - x)[0][inside])
        assert torch.allclose(r, r[0].expand_as(r), atol=1e-4), seed
        assert 0.5 - 1e-4 <= float(r[0]) <= 1 + 1e-4
        assert torch.equal(y[0][~inside], x[0][~inside])
        ratios.append(float(r[0]))
    assert len(set(round(v, 4) for v in ratios)) > 1  # b is drawn, not fixed


def test_hyper_and_hypo_make_brighter_and_darker():
    x = _image()
    y, m = SyntheticAnomaly("hyper", seed=0)(x)
    assert (y - x)[m.bool()].min() > 0
    y, m = SyntheticAnomaly("hypo", seed=0)(x)
    assert (y - x)[m.bool()].max() < 0


def test_the_same_seed_gives_the_same_anomaly_and_another_seed_another():
    x = _image()
    a, ma = SyntheticAnomaly(ANOMALY_MODES, seed=5)(x)
    b, mb = SyntheticAnomaly(ANOMALY_MODES, seed=5)(x)
    c, mc = SyntheticAnomaly(ANOMALY_MODES, seed=6)(x)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not torch.equal(ma, mc)
    t = SyntheticAnomaly("texture", seed=1)
    first = t(x)[1]
    t.set_random_state(1)
    assert torch.equal(t(x)[1], first)


def test_foreground_keeps_the_anomaly_inside_and_the_input_is_not_modified():
    x = _image()
    keep = x.clone()
    fg = torch.zeros(64, 64, dtype=torch.bool)
    fg[16:48, 16:48] = True
    for seed in range(5):
        y, m = SyntheticAnomaly(("hyper", "texture"), seed=seed)(x, foreground=fg)
        assert not m[0][~fg].any()
        assert torch.equal(y[0][~fg], x[0][~fg])
    assert torch.equal(x, keep)


def test_prob_zero_returns_the_image_unchanged_with_an_empty_mask():
    x = _image()
    y, m = SyntheticAnomaly(prob=0.0)(x)
    assert torch.equal(y, x) and m.sum() == 0


def test_perlin_mask_scales_and_threshold():
    g = torch.Generator().manual_seed(0)
    n = perlin_noise((64, 64), (4, 4), g)
    assert n.shape == (64, 64) and n.abs().max() <= 1.5
    assert n[0, 0].abs() < 1e-6  # gradient noise is zero on the lattice points
    areas = [float(perlin_mask((64, 64), torch.Generator().manual_seed(s), threshold=t).mean())
             for t in (0.3, 0.6) for s in range(20)]
    assert np.mean(areas[:20]) > np.mean(areas[20:]) > 0  # a higher threshold, smaller regions


def test_dictionary_form_writes_the_mask_and_uses_the_source():
    x, src = _image(0), _image(1)
    d = SyntheticAnomalyd("image", source_key="other", modes="patch", seed=3)({"image": x, "other": src, "name": "a"})
    y, m = SyntheticAnomaly("patch", seed=3)(x, source=src)
    assert torch.equal(d["image"], y) and torch.equal(d["anomaly_mask"], m) and d["name"] == "a"


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(InputError, match="choose from"):
        SyntheticAnomaly("blob")
    with pytest.raises(InputError, match="source shape"):
        SyntheticAnomaly("patch")(_image(), source=torch.zeros(1, 32, 32))
    with pytest.raises(InputError, match=r"\(C, H, W\)"):
        SyntheticAnomaly()(torch.zeros(64, 64))
