"""Volume folders as 2D slice datasets: normal slices to train on, labelled slices to test on.

Layout (``cfg.dataset_dir``)::

    <root>/splits.json                 optional: {"train": [case, ...], "test": [...], "valid": [...]}
    <root>/<case>/flair.nii.gz         one image volume per case folder: ``flair.nii[.gz]``, else the
                                       only ``*.nii[.gz]`` that is not a label, else a DICOM series
                                       (the folder itself or its one DICOM subfolder)
    <root>/<case>/mask.nii.gz          optional label volume (see :data:`LABEL_PATTERNS`), same grid
    <root>/<case>.nii.gz               flat form: image ...
    <root>/<case>_mask.nii.gz          ... and its label (``<case>_*`` matching a label pattern)

Splits:

* with ``splits.json``: its lists (cases not listed are ignored; a listed case that is not
  found, or one listed twice, is an error). ``"valid"`` (or ``"val"``) is optional: without it
  the validation cases are a ``cfg.val_fraction`` share of the train cases.
* without ``splits.json``: a case without a label volume, or whose label is all zero, is a
  **train** case (normal); a case with a non-empty label is a **test** case.

Validation is split **by case** (seeded by ``cfg.seed``), never by slice, and never from test
cases: ``round(val_fraction * n)`` train cases, at least 1 and leaving at least 1 (so at least
2 train cases are needed without a "valid" list). A label voxel is anomalous when > 0; a
missing label means a normal volume. Slice indices (``"<case>#<k>"``) are canonical RAS indices
along the axis (the array index for RAS-oriented volumes such as lgg_flair's).

Slices: each case goes through :func:`volume_preprocessing`, a MONAI ``Compose`` of the project's
dictionary transforms (the brain bundle's ``preprocessing``): loaded, normalised once
(``cfg.modality``, ``cfg.ct_window``; see :func:`~monai_multiad.transforms.scale_intensity`), cut
along ``cfg.slice_axis`` into canonical RAS slices resized to ``cfg.image_size`` by a
:class:`~monai_multiad.transforms.VolumeToSlicesd`, whose array form screening cuts a scan with.
**Foreground rule** (that transform's, written in :mod:`monai_multiad.transforms.volume`): a slice
is kept when at least 1 % of its voxels exceed 5 % of the normalised volume's range.
Train/validation slices are the kept slices whose label slice is empty; test slices are the kept
slices plus every slice with label voxels (an anomaly is never dropped). Slices are held in
memory as uint8 (one channel, repeated to ``in_channels`` when read; or, with ``cfg.slice_context`` 1, the
slice between its two neighbours as three channels), masks only where non-empty.
"""

from __future__ import annotations

import fnmatch
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.transforms import Compose
from torch.utils.data import Dataset

from monai_multiad.errors import find_input_error, input_error
from monai_multiad.transforms.intensity import intensity_kwargs, parse_window  # noqa: F401 - importable from here
from monai_multiad.transforms.volume import FG_THRESHOLD, MIN_FOREGROUND, recorded_slice, load_volume
from monai_multiad.transforms.volume_dict import LoadVolumed, ScaleIntensityByModalityd, VolumeToSlicesd

__all__ = ["LABEL_PATTERNS", "VolumeCase", "VolumeSliceDataset", "find_cases", "read_splits", "parse_window",
           "intensity_kwargs", "dataset_splits", "volume_datalist", "volume_preprocessing", "volume_slice_datasets",
           "MIN_FOREGROUND", "FG_THRESHOLD"]

#: file (or folder) names, matched case-insensitively, that are label volumes, not images
LABEL_PATTERNS: tuple[str, ...] = ("mask.nii", "mask.nii.gz", "*_mask.nii", "*_mask.nii.gz", "*label*")
_SPLIT_ALIASES = {"train": "train", "test": "test", "valid": "valid", "val": "valid", "validation": "valid"}


@dataclass(frozen=True)
class VolumeCase:
    """One case: its name, image volume (NIfTI file or DICOM folder) and optional label volume."""

    name: str
    image: Path
    label: Path | None = None


# ----------------------------------------------------------------------------- discovery
def is_label(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name.lower(), p.lower()) for p in patterns)


def is_nifti(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith((".nii", ".nii.gz"))


def _stem(p: Path) -> str:
    name = p.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return p.stem


def any_dicom(files: Sequence[Path], tries: int = 3) -> bool:
    """Whether one of the first ``tries`` regular, non-hidden files is DICOM (a cheap header check)."""
    from pydicom.misc import is_dicom

    files = [f for f in files if f.is_file() and not f.name.startswith(".")][:tries]
    for f in files:
        try:
            if is_dicom(f):
                return True
        except OSError:
            pass
    return False


def holds_dicom(folder: Path) -> bool:
    return any_dicom(sorted(folder.rglob("*")))


def _pick_label(folder: Path, found: list[Path]) -> Path | None:
    if len(found) > 1:
        found = [p for p in found if is_nifti(p)] or found
    if len(found) > 1:
        raise input_error(folder, f"several label volumes ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def _case_from_folder(folder: Path, patterns: Sequence[str]) -> VolumeCase | None:
    children = sorted(c for c in folder.iterdir() if not c.name.startswith("."))
    labels = [c for c in children if is_label(c.name, patterns)]
    images = [c for c in children if is_nifti(c) and c not in labels]
    if len(images) > 1:
        images = [c for c in images if c.name.lower().startswith("flair.")] or images
    if len(images) > 1:
        raise input_error(folder, f"several image volumes ({', '.join(c.name for c in images)}); expected one "
                                  f"(or a flair.nii.gz), other files named like a label {list(patterns)}")
    if not images:
        if any_dicom([c for c in children if c not in labels and not is_nifti(c)]):
            images = [folder]
        else:
            images = [c for c in children if c.is_dir() and c not in labels and holds_dicom(c)]
            if len(images) > 1:
                raise input_error(folder, f"several DICOM series folders ({', '.join(c.name for c in images)}); "
                                          "expected one image per case folder")
    if not images:
        return None
    return VolumeCase(folder.name, images[0], _pick_label(folder, labels))


def find_cases(root: str | Path, label_patterns: Sequence[str] = LABEL_PATTERNS) -> list[VolumeCase]:
    """All cases of a volume folder (see the module docstring), sorted by name.

    Folders that hold no volume are skipped; an ambiguous folder (two images) is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise input_error(root, "volume dataset folder not found")
    cases: dict[str, VolumeCase] = {}
    entries = sorted(c for c in root.iterdir() if not c.name.startswith("."))
    files = [c for c in entries if is_nifti(c)]
    for c in entries:
        if c.is_dir():
            case = _case_from_folder(c, label_patterns)
            if case is not None:
                cases[case.name] = case
    for f in files:
        if is_label(f.name, label_patterns):
            continue
        name = _stem(f)
        if name in cases:
            raise input_error(root, f"case {name!r} is both a folder and a file {f.name}")
        found = [g for g in files if g != f and is_label(g.name, label_patterns)
                 and g.name.lower().startswith(name.lower() + "_")]
        cases[name] = VolumeCase(name, f, _pick_label(root, found))
    return [cases[k] for k in sorted(cases)]


def read_splits(root: str | Path, cases: Sequence[VolumeCase]) -> dict[str, list[VolumeCase]] | None:
    """``splits.json`` as ``{"train": [...], "test": [...], "valid": [...]}`` of cases, or ``None`` without one."""
    path = Path(root) / "splits.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise input_error(path, f"cannot read the splits ({e})") from None
    if not isinstance(data, dict):
        raise input_error(path, 'expected {"train": [cases], "test": [cases]} with an optional "valid"')
    by_name = {c.name: c for c in cases}
    out: dict[str, list[VolumeCase]] = {"train": [], "valid": [], "test": []}
    seen: dict[str, str] = {}
    for key, names in data.items():
        split = _SPLIT_ALIASES.get(str(key).lower())
        if split is None:
            raise input_error(path, f"unknown split {key!r}; expected train, valid, test")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise input_error(path, f"split {key!r} must be a list of case names")
        for n in names:
            if n in seen:
                raise input_error(path, f"case {n!r} is listed in both {seen[n]!r} and {key!r}")
            seen[n] = key
            if n not in by_name:
                raise input_error(path, f"case {n!r} ({key}) not found: no folder {Path(root) / n} holding an image "
                                        f"volume and no {n}.nii[.gz]")
            out[split].append(by_name[n])
    return out


def _label_empty(case: VolumeCase) -> bool:
    return case.label is None or not bool(np.any(load_volume(case.label).as_tensor().numpy() > 0))


def _split_by_case(cases: list[VolumeCase], fraction: float, seed: int) -> tuple[list, list]:
    n_val = min(max(int(round(fraction * len(cases))), 1), len(cases) - 1)
    val = set(np.random.default_rng(seed).permutation(len(cases))[:n_val].tolist())
    return [c for i, c in enumerate(cases) if i not in val], [c for i, c in enumerate(cases) if i in val]


def dataset_splits(cfg) -> dict[str, list[VolumeCase]]:
    """Cases per split ("train", "valid", "test") for a config, by the rules of the module docstring."""
    root = Path(cfg.dataset_dir)
    cases = find_cases(root)
    if not cases:
        raise input_error(root, "no volumes here: expected <case>/<image>.nii.gz (or a DICOM series folder) "
                                "per case, or <case>.nii.gz files")
    splits = read_splits(root, cases)
    if splits is None:
        normal = [c for c in cases if _label_empty(c)]
        splits = {"train": normal, "valid": [], "test": [c for c in cases if c not in normal]}
    if not splits["valid"] and len(splits["train"]) >= 2:
        splits["train"], splits["valid"] = _split_by_case(splits["train"], cfg.val_fraction, cfg.seed)
    return splits


# ----------------------------------------------------------------------------- preprocessing
def volume_datalist(cases: Sequence[VolumeCase]) -> list[dict]:
    """Cases as MONAI datalist entries: ``{"image": path, "name": case}``, plus ``"mask": path`` when the
    case has a label volume (the keys :func:`volume_preprocessing` reads)."""
    return [{"image": str(c.image), "name": c.name, **({"mask": str(c.label)} if c.label is not None else {})}
            for c in cases]


def volume_preprocessing(modality: str = "mri", ct_window=None, slice_axis: str = "axial", image_size: int = 256,
                         labelled: str = "drop", slice_context: int = 0) -> Compose:
    """One case's preprocessing as MONAI dictionary transforms, what the brain bundle's ``train.json`` shows as
    ``preprocessing``: load the image and its label (:class:`~monai_multiad.transforms.LoadVolumed`),
    scale the image by modality (:class:`~monai_multiad.transforms.ScaleIntensityByModalityd`), and cut
    both into canonical slices of ``image_size`` by the foreground rule
    (:class:`~monai_multiad.transforms.VolumeToSlicesd`, whose array form screening cuts a scan with),
    leaving out (``labelled="drop"``: training and validation) or adding (``"add"``: testing) the
    slices with label voxels. A datalist entry (:func:`volume_datalist`) becomes a list of slice dicts.
    ``slice_context``: neighbouring slices on each side stacked as the image's channels (1: 2.5D input,
    slices ``k - 1, k, k + 1``); the label keeps its one slice.
    """
    return Compose([  # log_stats=False: a bad file is one error line, not data statistics in the log
        LoadVolumed(["image", "mask"], allow_missing_keys=True),
        ScaleIntensityByModalityd("image", mode=modality, window=ct_window),
        VolumeToSlicesd(["image", "mask"], axis=slice_axis, spatial_size=(image_size, image_size),
                        mode=("bilinear", "nearest"), label_key="mask", labelled=labelled, context=slice_context,
                        allow_missing_keys=True),
    ], log_stats=False)


@dataclass
class _CaseSlices:
    name: str
    images: torch.Tensor  # (N, 1, S, S) uint8, or (N, 3, S, S) with the neighbouring slices (2.5D)
    indices: list[int]  # canonical slice indices
    labels: torch.Tensor  # (N,) bool
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> (1, S, S) uint8, non-empty only
    original_size: tuple[int, int] = (0, 0)


def _case_slices(entry: dict, transform) -> _CaseSlices:
    """One datalist entry through ``transform`` (a list of slice dicts), held as uint8 slices."""
    try:
        slices = transform(entry)
    except RuntimeError as e:  # MONAI's Compose wraps a transform's error: raise the user's one-line error
        found = find_input_error(e)
        if found is None:
            raise
        raise found from None
    name = str(entry.get("name", entry["image"]))
    if not slices:
        return _CaseSlices(name, torch.zeros((0, 1, 0, 0), dtype=torch.uint8), [], torch.zeros(0, dtype=torch.bool))
    images = torch.stack([torch.as_tensor(s["image"]) for s in slices])
    if images.shape[1] not in (1, 3):  # one slice, or a slice between its two neighbours (2.5D)
        raise input_error(entry["image"], f"{images.shape[1]} channels per slice; expected a single-channel volume")
    images = images.mul_(255.0).add_(0.5).clamp_(0, 255).to(torch.uint8)
    labels = torch.tensor([bool(s.get("label", 0)) for s in slices], dtype=torch.bool)
    masks = {j: (torch.as_tensor(s["mask"]) > 0).to(torch.uint8) for j, s in enumerate(slices) if labels[j]}
    geometry = recorded_slice(slices[0]["image"])[1]
    return _CaseSlices(name, images, [int(s["slice_index"]) for s in slices], labels, masks,
                       tuple(int(v) for v in geometry.slice_shape))


class VolumeSliceDataset(Dataset):
    """Slices of volumes, preprocessed once (as MONAI's ``CacheDataset``: ``transform`` runs on each
    datalist entry when the dataset is built, a few cases at a time in threads) and held as uint8.

    ``data``: datalist entries (:func:`volume_datalist`); ``transform``: entry -> list of slice dicts,
    normally :func:`volume_preprocessing`. Items are shaped as the 2D datasets' are:

    ``{"image": float32 (in_channels, S, S) in [0, 1], "mask": float32 (1, S, S) of 0/1,
    "label": int, "has_mask": True, "path": "<case>#<slice index>", "name": same,
    "defect": "good" | "anomaly", "original_size": int64 [h, w], "case": str, "slice_index": int}``.

    The slice index is the canonical (RAS-reoriented) index along the slicing axis, as
    :class:`~monai_multiad.transforms.VolumeToSlices` gives it (the array index for RAS volumes).
    """

    def __init__(self, data: Sequence[dict], transform, in_channels: int = 3) -> None:
        self.in_channels = int(in_channels)
        data = list(data)
        workers = max(1, min(4, os.cpu_count() or 1, len(data)))
        if workers == 1:
            self._cases = [_case_slices(e, transform) for e in data]
        else:  # nibabel's gzip and numpy release the GIL for most of the work
            with ThreadPoolExecutor(workers) as pool:
                self._cases = list(pool.map(lambda e: _case_slices(e, transform), data))
        self.items = [(i, j) for i, c in enumerate(self._cases) for j in range(len(c.indices))]

    @property
    def case_names(self) -> list[str]:
        """Names of the cases with at least one slice here."""
        return [c.name for c in self._cases if c.indices]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        i, j = self.items[index]
        c = self._cases[i]
        image = c.images[j].float().div_(255.0)
        if image.shape[0] != self.in_channels:  # one slice repeated to the network's channels
            image = image.expand(self.in_channels, -1, -1).contiguous()
        mask = c.masks[j].float() if j in c.masks else torch.zeros((1, *image.shape[-2:]), dtype=torch.float32)
        label = int(c.labels[j])
        path = f"{c.name}#{c.indices[j]}"
        return {"image": image, "mask": mask, "label": label, "has_mask": True, "path": path, "name": path,
                "defect": "anomaly" if label else "good", "original_size": torch.tensor(c.original_size),
                "case": c.name, "slice_index": int(c.indices[j])}


def volume_slice_datasets(cfg, split: str = "train", preprocessing=None):
    """Datasets of a volume folder for :func:`monai_multiad.data.datasets.build_datasets`.

    Args:
        cfg: a :class:`~monai_multiad.config.RunConfig` (``dataset_dir``, ``image_size``,
            ``in_channels``, ``modality``, ``ct_window``, ``slice_axis``, ``val_fraction``, ``seed``).
        split: "train" -> ``(train, validation)`` of normal slices (validation = held-out train
            cases, or the "valid" cases of splits.json); "test" (or "valid") -> all slices of those
            cases, labelled by their masks.
        preprocessing: the per-case transform (the bundles' ``preprocessing``); default
            :func:`volume_preprocessing` of ``cfg``, leaving out labelled slices for "train" and
            adding them for the other splits.
    """
    splits = dataset_splits(cfg)

    def prep(labelled: str):
        if preprocessing is not None:
            return preprocessing
        return volume_preprocessing(cfg.modality, cfg.ct_window, cfg.slice_axis, cfg.image_size, labelled,
                                    cfg.slice_context)

    if split == "train":
        if not splits["valid"]:
            raise input_error(cfg.dataset_dir, f"{len(splits['train'])} training case(s): at least 2 are needed to "
                                               "hold out a validation case (or list \"valid\" cases in splits.json)")
        transform = prep("drop")
        train = VolumeSliceDataset(volume_datalist(splits["train"]), transform, cfg.in_channels)
        val = VolumeSliceDataset(volume_datalist(splits["valid"]), transform, cfg.in_channels)
        if len(val) == 0:
            raise input_error(cfg.dataset_dir, "the validation cases have no normal foreground slice")
        return train, val
    key = _SPLIT_ALIASES.get(split)
    if key not in ("test", "valid"):
        raise input_error(cfg.dataset_dir, f"unknown split {split!r}; expected train, valid or test")
    return VolumeSliceDataset(volume_datalist(splits[key]), prep("add"), cfg.in_channels)
