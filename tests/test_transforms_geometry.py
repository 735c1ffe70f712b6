"""The slice-geometry record: what it holds for a known affine, that it cannot change, that slices and
reassembly carry it, and the foreground rule that picks the slices it describes."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_multiad.data.synthetic_volumes import make_affine
from monai_multiad.transforms import (
    FG_THRESHOLD,
    MIN_FOREGROUND,
    SliceGeometry,
    SlicesToVolume,
    VolumeToSlices,
    foreground_slices,
    labelled_slices,
    slice_geometry,
    volume_to_slices,
)

# array axis 0 runs anterior, axis 1 inferior, axis 2 left: RAS is (axis 2 reversed, axis 0, axis 1 reversed)
PERMUTED = make_affine(np.array([[0, 0, -1.0], [1.0, 0, 0], [0, -1.0, 0]]), (4, 5, 6))
SHAPE = (5, 7, 9)


def _vol(array, affine, **meta) -> MetaTensor:
    return MetaTensor(torch.as_tensor(np.asarray(array, np.float32))[None], affine=torch.as_tensor(affine), meta=meta)


@pytest.mark.parametrize("axis, slice_dim, array_axis, flipped, slice_shape", [
    ("axial", 2, 1, True, (9, 5)), ("coronal", 1, 0, False, (9, 7)), ("sagittal", 0, 2, True, (5, 7))])
def test_fields_of_a_permuted_flipped_volume(axis, slice_dim, array_axis, flipped, slice_shape):
    g = slice_geometry(_vol(np.zeros(SHAPE), PERMUTED, filename_or_obj="scan.nii.gz"), axis, spatial_size=(32, 30))
    assert isinstance(g, SliceGeometry) and g.axis == axis and g.orientation == "RAS"
    assert g.perm == (2, 0, 1) and g.flip == (True, False, True)
    assert g.slice_dim == slice_dim and g.plane_dims == tuple(d for d in range(3) if d != slice_dim)
    assert g.spatial_shape == SHAPE and g.num_slices == SHAPE[array_axis] and g.slice_shape == slice_shape
    assert g.array_axis == array_axis and g.array_axis_flipped == flipped
    assert g.spatial_size == (32, 30) and g.output_shape == (32, 30)
    n = g.num_slices
    assert [g.array_index(k) for k in range(n)] == (list(range(n))[::-1] if flipped else list(range(n)))
    np.testing.assert_array_equal(g.affine, PERMUTED)
    # canonical voxel c is input voxel v (v[perm[m]] = c[m], counted from the far end where flipped)
    for c in np.random.default_rng(0).integers(0, 5, (6, 3)):
        v = np.zeros(3)
        for m in range(3):
            v[g.perm[m]] = SHAPE[g.perm[m]] - 1 - c[m] if g.flip[m] else c[m]
        np.testing.assert_allclose(g.canonical_affine @ [*c, 1.0], PERMUTED @ [*v, 1.0], atol=1e-9)
    assert g.meta["filename_or_obj"] == "scan.nii.gz" and "affine" not in g.meta
    assert slice_geometry(_vol(np.zeros(SHAPE), PERMUTED), axis).output_shape == slice_shape


def test_the_record_cannot_change_and_does_not_follow_its_volume():
    vol = _vol(np.zeros(SHAPE), np.eye(4))
    g = slice_geometry(vol)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.num_slices = 3
    with pytest.raises(ValueError):
        g.canonical_affine[0, 0] = 2.0
    vol.affine[0, 0] = 5.0  # a later edit of the volume's affine is not the geometry the slices were cut with
    assert g.affine[0, 0] == 1.0
    back = pickle.loads(pickle.dumps(g))  # slices carry it through DataLoader workers
    assert back.perm == g.perm and np.array_equal(back.canonical_affine, g.canonical_affine)


def test_slices_carry_the_record_and_it_puts_maps_back():
    rng = np.random.default_rng(1)
    arr = rng.random(SHAPE).astype(np.float32)
    stack, kept, g = volume_to_slices(_vol(arr, PERMUTED), "axial", keep_all=True)
    for k in kept:  # axial slice k is array slice array_index(k) along axis 1, rows along R (axis 2 reversed)
        np.testing.assert_array_equal(stack[k, 0].numpy(), arr[:, g.array_index(k), ::-1].T)
    slices = VolumeToSlices("axial")(_vol(arr, PERMUTED), indices=[1, 4])
    recorded = slices[0].applied_operations[-1]["extra_info"]["geometry"]
    assert isinstance(recorded, SliceGeometry) and recorded.perm == g.perm
    back = SlicesToVolume()(stack[[1, 4]], [1, 4], g)
    assert torch.equal(back.affine, torch.as_tensor(PERMUTED))
    expected = np.zeros(SHAPE, np.float32)
    for k in (1, 4):
        expected[:, g.array_index(k)] = arr[:, g.array_index(k)]
    np.testing.assert_array_equal(back[0].numpy(), expected)


def test_the_foreground_rule_against_numpy():
    rng = np.random.default_rng(2)
    arr = np.full((12, 10, 8), 10.0, np.float32)  # the level is relative: a background of 10 is not foreground
    for z, count in enumerate([0, 1, 2, 3, 60, 120, 1, 36]):  # of 120 voxels a slice; 1 % is 1.2 voxels
        arr[..., z].flat[:count] = 20.0 + rng.random()
    g = slice_geometry(_vol(arr, np.eye(4)))
    level = arr.min() + FG_THRESHOLD * (arr.max() - arr.min())
    expected = [z for z in range(8) if np.mean(arr[..., z] > level) >= MIN_FOREGROUND]
    assert foreground_slices(torch.as_tensor(arr)[None], g) == expected == [2, 3, 4, 5, 7]
    slicer = VolumeToSlices()
    assert slicer.select(_vol(arr, np.eye(4)))[1] == expected == volume_to_slices(_vol(arr, np.eye(4)))[1]
    assert slicer.foreground_rule == ">= 1% of the slice's voxels above 5% of the range"
    assert VolumeToSlices(keep_all=True).select(_vol(arr, np.eye(4)))[1] == list(range(8))
    label = np.zeros_like(arr)
    label[3, 4, [1, 6]] = 2.0
    assert labelled_slices(torch.as_tensor(label)[None], g) == [1, 6]
    flipped = slice_geometry(_vol(arr, np.diag([1.0, 1.0, -1.0, 1.0])))  # canonical slice k is array slice 7 - k
    assert labelled_slices(torch.as_tensor(label)[None], flipped) == [1, 6]
    assert foreground_slices(torch.as_tensor(arr)[None], flipped) == sorted(7 - z for z in expected)
