"""Volume folders as slice datasets: discovery, splits by case, normal-only training slices, labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_multiad.config import RunConfig
from monai_multiad.data.synthetic_volumes import make_phantom_volume, write_dicom_series, write_nifti
from monai_multiad.data.volumes import dataset_splits, find_cases, parse_window, volume_slice_datasets
from monai_multiad.errors import MultiADInputError
from monai_multiad.data.datasets import build_datasets

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAPE = (32, 32, 12)


def _case(root: Path, name: str, lesion: bool, seed: int, mask: bool = True, affine=None) -> np.ndarray:
    image, label = make_phantom_volume(SHAPE, lesion=lesion, affine=affine, seed=seed)
    write_nifti(root / name / "flair.nii.gz", np.round(image).astype(np.int16), affine)
    if mask:
        write_nifti(root / name / "mask.nii.gz", label, affine)
    return label


@pytest.fixture(scope="module")
def volume_root(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("volumes")
    labels = {}
    for i in range(5):
        labels[f"normal{i}"] = _case(root, f"normal{i}", lesion=False, seed=i, mask=i % 2 == 0)
    labels["sick_train"] = _case(root, "sick_train", lesion=True, seed=10)
    labels["sick_test"] = _case(root, "sick_test", lesion=True, seed=11, affine=np.diag([-1.0, 1.0, 2.0, 1.0]))
    (root / "notes").mkdir()  # a folder without volumes is ignored
    (root / "notes" / "readme.txt").write_text("not a case")
    splits = {"train": ["normal0", "normal1", "normal2", "normal3", "sick_train"], "test": ["normal4", "sick_test"]}
    (root / "splits.json").write_text(json.dumps(splits))
    return root, labels


def _cfg(root, **kw) -> RunConfig:
    return RunConfig(**{"dataset_dir": str(root), "layout": "volumes", "image_size": 32, "in_channels": 3,
                        "val_fraction": 0.25, "seed": 0, **kw})


def _cases_of(ds) -> set[str]:
    return {ds[i]["case"] for i in range(len(ds))}


def test_train_slices_are_normal_and_validation_is_split_by_case(volume_root):
    root, labels = volume_root
    train, val = build_datasets(_cfg(root), "train")  # splits.json -> the volume layout
    assert len(train) > 0 and len(val) > 0
    train_cases, val_cases = _cases_of(train), _cases_of(val)
    assert not train_cases & val_cases, "validation must be split by case"
    assert train_cases | val_cases <= {"normal0", "normal1", "normal2", "normal3", "sick_train"}
    assert len(val_cases) == 1  # round(0.25 * 5)
    for ds in (train, val):
        for i in range(len(ds)):
            item = ds[i]
            assert item["label"] == 0 and float(item["mask"].sum()) == 0 and item["has_mask"] is True
            assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
            assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
            assert item["path"] == f"{item['case']}#{item['slice_index']}"
            assert tuple(item["original_size"].tolist()) == (32, 32)
            if item["case"] == "sick_train":  # normal slices of a labelled volume only
                assert not labels["sick_train"][:, :, item["slice_index"]].any()
    # sick_train is a train case of splits.json: its normal slices are in training or validation,
    # whichever the seeded split put it in, and its lesion slices in neither
    assert "sick_train" in train_cases | val_cases
    holder = train if "sick_train" in train_cases else val
    sick = {holder[i]["slice_index"] for i in range(len(holder)) if holder[i]["case"] == "sick_train"}
    lesion = {k for k in range(SHAPE[2]) if labels["sick_train"][:, :, k].any()}
    assert sick and lesion and not sick & lesion
    # seeded: the same seed gives the same validation cases
    assert _cases_of(volume_slice_datasets(_cfg(root), "train")[1]) == val_cases


def test_test_slices_are_labelled_by_their_masks(volume_root):
    root, labels = volume_root
    test = volume_slice_datasets(_cfg(root, in_channels=1, image_size=48), "test")
    assert _cases_of(test) == {"normal4", "sick_test"}
    positives = 0
    for i in range(len(test)):
        item = test[i]
        assert item["image"].shape == (1, 48, 48) and item["mask"].shape == (1, 48, 48)
        k = item["slice_index"]
        # sick_test has a flipped x axis and z spacing 2: canonical axial index = array index here
        expected = bool(labels[item["case"]][:, :, k].any())
        assert item["label"] == int(expected)
        assert bool(item["mask"].sum() > 0) == expected and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        positives += item["label"]
    lesion_slices = int(labels["sick_test"].any(axis=(0, 1)).sum())
    assert positives == lesion_slices  # every anomalous slice is kept


def test_without_splits_labelled_cases_are_test(tmp_path):
    image, _ = make_phantom_volume(SHAPE, lesion=False, seed=1)
    sick, label = make_phantom_volume(SHAPE, lesion=True, seed=2)
    for i in range(3):  # flat form; one with an empty mask, the others without masks
        write_nifti(tmp_path / f"n{i}.nii.gz", image)
    write_nifti(tmp_path / "n0_mask.nii.gz", np.zeros(SHAPE, np.uint8))
    write_nifti(tmp_path / "s.nii.gz", sick)
    write_nifti(tmp_path / "s_mask.nii.gz", label)
    write_dicom_series(tmp_path / "d" / "series", image)  # a case folder holding one DICOM series
    cases = {c.name: c for c in find_cases(tmp_path)}
    assert set(cases) == {"n0", "n1", "n2", "s", "d"}
    assert cases["n0"].label.name == "n0_mask.nii.gz" and cases["n1"].label is None
    assert cases["d"].image == tmp_path / "d" / "series"
    splits = dataset_splits(_cfg(tmp_path))
    assert {c.name for c in splits["test"]} == {"s"}
    assert {c.name for c in splits["train"] + splits["valid"]} == {"n0", "n1", "n2", "d"} and splits["valid"]
    test = volume_slice_datasets(_cfg(tmp_path), "test")
    assert {test[i]["label"] for i in range(len(test))} == {0, 1}


def test_bad_folders_name_the_problem(tmp_path):
    _case(tmp_path, "a", lesion=False, seed=0)
    _case(tmp_path, "b", lesion=False, seed=1)
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["a", "zz"], "test": ["b"]}))
    with pytest.raises(MultiADInputError, match="'zz'"):
        volume_slice_datasets(_cfg(tmp_path), "train")
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["a", "b"], "test": ["b"]}))
    with pytest.raises(MultiADInputError, match="both"):
        volume_slice_datasets(_cfg(tmp_path), "test")
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["a"], "test": ["b"]}))
    with pytest.raises(MultiADInputError, match="at least 2"):
        volume_slice_datasets(_cfg(tmp_path), "train")
    write_nifti(tmp_path / "b" / "mask.nii.gz", np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(MultiADInputError, match="label shape"):
        volume_slice_datasets(_cfg(tmp_path), "test")
    write_nifti(tmp_path / "a" / "t1.nii.gz", np.zeros(SHAPE, np.int16))  # flair.nii.gz is still preferred
    assert {c.name: c.image.name for c in find_cases(tmp_path)} == {"a": "flair.nii.gz", "b": "flair.nii.gz"}
    write_nifti(tmp_path / "c" / "t1.nii.gz", np.zeros(SHAPE, np.int16))
    write_nifti(tmp_path / "c" / "t2.nii.gz", np.zeros(SHAPE, np.int16))
    with pytest.raises(MultiADInputError, match="several image volumes"):
        find_cases(tmp_path)
    assert parse_window("liver") == (None, "liver") and parse_window("40, 80") == ((40.0, 80.0), None)
    with pytest.raises(MultiADInputError, match="CT window"):
        parse_window("wide")


@pytest.mark.skipif(not (SHARED_DATA / "lgg_flair").is_dir(), reason=f"real data folder {SHARED_DATA} is absent")
def test_lgg_flair_slices_and_no_test_leak():
    root = SHARED_DATA / "lgg_flair"
    split = json.loads((root / "splits.json").read_text())
    cfg = RunConfig(dataset_dir=str(root), image_size=64, in_channels=1, val_fraction=0.1, seed=0)
    train, val = build_datasets(cfg, "train")
    test = build_datasets(cfg, "test")
    train_cases, val_cases, test_cases = set(train.case_names), set(val.case_names), set(test.case_names)
    assert not (train_cases | val_cases) & set(split["test"]), "a test patient leaked into training"
    assert not train_cases & val_cases and len(val_cases) == 6
    assert train_cases | val_cases <= set(split["train"]) and test_cases == set(split["test"])
    # 2253 slices in the train patients, 1473 of them without tumour; near-empty end slices are dropped
    assert 1200 <= len(train) + len(val) <= 1473
    assert all(int(train._cases[i].labels.sum()) == 0 for i in range(len(train._cases)))
    # 756 test slices, 258 with tumour: every tumour slice is kept
    labels = torch.cat([c.labels for c in test._cases])
    assert 650 <= len(test) <= 756 and int(labels.sum()) == 258
