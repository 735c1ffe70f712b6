"""2.5D input for volumes (``slice_context`` 1): each slice reaches the network between its two neighbours,
as three channels, in training, evaluation and screening alike."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from conftest import write_phantom
from monai_multiad.config import RunConfig
from monai_multiad.errors import MultiADInputError
from monai_multiad.transforms import VolumeToSlicesd
from monai_multiad.transforms.volume import neighbour_indices, volume_to_slices


def _ramp(n: int = 6) -> MetaTensor:
    """(1, 8, 8, n) volume, identity affine (RAS): every voxel of axial slice k is k + 1."""
    x = torch.arange(1, n + 1, dtype=torch.float32).view(1, 1, 1, n).expand(1, 8, 8, n).clone()
    return MetaTensor(x, affine=torch.eye(4))


def test_neighbour_indices_clamp_at_the_ends():
    assert neighbour_indices([0, 2, 4], 5, 1) == [0, 0, 1, 1, 2, 3, 3, 4, 4]
    assert neighbour_indices([1], 3, 0) == [1]


def test_each_slice_comes_between_its_neighbours():
    vol = _ramp(6)
    one, kept, _ = volume_to_slices(vol, "axial", keep_all=True)
    three, kept3, _ = volume_to_slices(vol, "axial", keep_all=True, context=1)
    assert kept == kept3 == list(range(6))
    assert one.shape == (6, 1, 8, 8) and three.shape == (6, 3, 8, 8)
    for k in range(6):
        expected = [min(max(k + d, 0), 5) + 1 for d in (-1, 0, 1)]
        assert three[k].flatten(1).mean(1).tolist() == expected
    assert torch.equal(three[:, 1:2], one)  # the middle channel is the slice itself
    with pytest.raises(MultiADInputError, match="context"):
        volume_to_slices(vol, "axial", keep_all=True, context=-1)


def test_dictionary_form_stacks_the_image_not_the_label():
    vol = _ramp(5)
    label = MetaTensor(torch.zeros(1, 8, 8, 5), affine=torch.eye(4))
    label[0, 2:5, 2:5, 3] = 1
    out = VolumeToSlicesd(["image", "mask"], keep_all=True, mode=("bilinear", "nearest"), label_key="mask",
                          labelled="add", context=1)({"image": vol, "mask": label})
    assert [d["slice_index"] for d in out] == list(range(5))
    assert all(d["image"].shape == (3, 8, 8) and d["mask"].shape == (1, 8, 8) for d in out)
    assert out[3]["image"].flatten(1).mean(1).tolist() == [3.0, 4.0, 5.0]
    assert [d["label"] for d in out] == [0, 0, 0, 1, 0] and out[3]["mask"].sum() == 9


def test_slice_context_needs_three_channels():
    with pytest.raises(MultiADInputError, match="in_channels 3"):
        RunConfig(slice_context=1, in_channels=1)
    assert RunConfig(slice_context=1, in_channels=3).slice_context == 1


@pytest.fixture(scope="module")
def context_run(tmp_path_factory):
    from monai_multiad import workflow

    root = tmp_path_factory.mktemp("context_run")
    for i in range(3):
        write_phantom(root / "train" / f"normal_{i}.nii.gz", seed=20 + i)
    write_phantom(root / "lesion.nii.gz", seed=30, lesion=True)
    cfg = RunConfig(dataset_dir=str(root / "train"), layout="volumes", image_size=32, in_channels=3, slice_context=1,
                    backbone="resnet18", pretrained="none", batch_size=8, max_steps=2, epochs=1, device="cpu",
                    early_stop_patience=0, val_fraction=0.34, stages=[1, 2], memory_bank=0,
                    segmentation_head_steps=0, seed=0)
    workflow.train(cfg, root / "run", progress=False)
    return root, cfg


def test_training_slices_bring_their_neighbours(context_run):
    from monai_multiad.data.datasets import build_datasets

    root, cfg = context_run
    train, _ = build_datasets(cfg, "train")
    alone, _ = build_datasets(RunConfig(**{**cfg.to_dict(), "slice_context": 0}), "train")
    assert len(train) == len(alone)
    item, single = train[len(train) // 2], alone[len(train) // 2]
    assert item["path"] == single["path"] and item["image"].shape[0] == 3
    assert torch.equal(item["image"][1], single["image"][0])  # the slice itself in the middle
    assert not torch.equal(item["image"][0], item["image"][1])  # a neighbour, not a copy
    assert not torch.equal(item["image"][2], item["image"][1])


def test_screening_feeds_the_network_the_neighbours(context_run):
    from monai_multiad.inferers import load_run
    from monai_multiad.screening import screen_volume
    from monai_multiad.transforms.intensity import intensity_kwargs
    from monai_multiad.transforms.volume import VolumeToSlices, load_volume, scale_intensity

    root, cfg = context_run
    result = screen_volume(root / "run", root / "lesion.nii.gz", device="cpu")
    run = load_run(root / "run", "cpu")
    scaled = scale_intensity(load_volume(root / "lesion.nii.gz"), **intensity_kwargs("mri", None))
    kept = sorted(result.slice_scores)
    slicer = VolumeToSlices("axial", spatial_size=(32, 32))
    with torch.no_grad():
        _, with_context = run.model(slicer.slices(scaled, kept, context=1)[0])
        _, repeated = run.model(slicer.slices(scaled, kept)[0].expand(-1, 3, -1, -1))
    scores = torch.tensor([result.slice_scores[k] for k in kept], dtype=torch.float32)
    assert torch.allclose(scores, with_context, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(scores, repeated, rtol=1e-3)
    assert result.montage_images.shape[1] == 1  # the montage shows the slice itself
