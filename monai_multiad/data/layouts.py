"""2D dataset layouts: which layout a folder follows, and its samples per split.

* MVTec AD: ``<root>/train/good``, ``<root>/test/{good,<defect>}``,
  ``<root>/ground_truth/<defect>/<stem>_mask.png``  -> :func:`mvtec_samples`
* a pair of plain folders (normal, abnormal, optional masks)  -> :func:`folder_samples`
* the plain-folder layout (anomalib's ``Folder``): ``<root>/good``, ``<root>/<defect>``, optional
  ``<root>/normal_test`` and ``<root>/mask/<defect>``  -> :func:`folder_layout_samples`
* BMAD slices: ``<root>/train/good[/img]``, ``<root>/{valid,test}/{good,Ungood}/img``,
  masks in ``<root>/{valid,test}/Ungood/label`` with the image's file name  -> :func:`bmad_samples`

:func:`detect_layout` is the one place a layout is recognised, volume folders included (those are
read by :mod:`monai_multiad.data.volumes`). Every layout function returns a list of sample dicts
``{"image": str, "mask": str | None, "label": 0 | 1, "defect": str, "name": str}``
(``defect`` is ``"good"`` for normal samples; ``name`` is ``"<defect>_<file stem>"``, unique
within a split and safe to use as a file name), which
:class:`~monai_multiad.data.images.AnomalyImageDataset` loads. A new layout is a ``*_samples``
function here, a test in :func:`detect_layout`, a branch in :func:`samples_for` and its name in
:data:`LAYOUTS` and in ``RunConfig.layout``'s choices.

Every bad input raises :class:`~monai_multiad.errors.MultiADInputError` naming the file or folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from monai_multiad.data.decoding import IMAGE_EXTENSIONS
from monai_multiad.errors import input_error

__all__ = [
    "list_images",
    "mvtec_samples",
    "folder_samples",
    "folder_layout_samples",
    "bmad_samples",
    "LAYOUTS",
    "detect_layout",
    "samples_for",
    "split_normals",
]


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".")


def is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(p) and p.is_file()


def _require_dir(folder: Path, what: str = "folder") -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise input_error(folder, f"{what} not found")
    if not folder.is_dir():
        raise input_error(folder, f"{what} is not a folder")
    return folder


def list_images(folder, required: bool = True) -> list[Path]:
    """Image files in ``folder`` (not recursive), by extension (case-insensitive), sorted by name.

    Hidden files are skipped. With ``required`` a missing folder or one without images raises
    MultiADInputError naming it; otherwise an empty list is returned.
    """
    folder = Path(folder)
    if not folder.is_dir():
        if required:
            _require_dir(folder)
        return []
    files = sorted((p for p in folder.iterdir() if is_image(p)), key=lambda p: p.name)
    if not files and required:
        raise input_error(folder, f"no image files ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) in this folder")
    return files


def _subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p)), key=lambda p: p.name)


def _mask_index(mask_dir: Path | None) -> dict[str, Path]:
    """stem -> mask file; ``<stem>_mask.*`` wins over ``<stem>.*``."""
    if mask_dir is None or not Path(mask_dir).is_dir():
        return {}
    index: dict[str, Path] = {}
    files = list_images(mask_dir, required=False)
    for p in files:  # plain stems first, then *_mask overrides
        index.setdefault(p.stem, p)
    for p in files:
        if p.stem.endswith("_mask"):
            index[p.stem[: -len("_mask")]] = p
    return index


def _sample(image: Path, mask: Path | None, label: int, defect: str) -> dict:
    return {
        "image": str(image),
        "mask": str(mask) if mask is not None else None,
        "label": int(label),
        "defect": defect,
        "name": f"{defect}_{image.stem}",
    }


def _check_split(split: str, allowed: Sequence[str], root) -> str:
    if split not in allowed:
        raise input_error(root, f"unknown split {split!r}; expected one of {', '.join(allowed)}")
    return split


def mvtec_samples(root, split: str = "train") -> list[dict]:
    """Samples of an MVTec AD category folder.

    ``split="train"``: ``train/good`` (label 0). ``split="test"``: ``test/good`` (label 0) and
    every ``test/<defect>`` (label 1) with masks from ``ground_truth/<defect>/<stem>_mask.png``
    (also ``<stem>.<ext>``); a defect image without a mask gets ``mask=None``. Mask sizes are
    checked when loaded (:class:`AnomalyImageDataset`).
    """
    root = _require_dir(Path(root), "dataset folder")
    _check_split(split, ("train", "test"), root)
    if split == "train":
        return [_sample(p, None, 0, "good") for p in list_images(root / "train" / "good")]
    test = _require_dir(root / "test", "test folder")
    classes = _subdirs(test)
    if not classes:
        raise input_error(test, "no class folders (good, <defect>...) in this folder")
    samples = []
    for cls in classes:
        files = list_images(cls)
        if cls.name == "good":
            samples += [_sample(p, None, 0, "good") for p in files]
        else:
            masks = _mask_index(root / "ground_truth" / cls.name)
            samples += [_sample(p, masks.get(p.stem), 1, cls.name) for p in files]
    return samples


def folder_samples(normal_dir, abnormal_dir=None, mask_dir=None, split: str = "test") -> list[dict]:
    """Samples from plain folders.

    ``split="train"``: the images of ``normal_dir`` (label 0). ``"valid"``/``"test"``: those
    plus the images of ``abnormal_dir`` (label 1, defect = that folder's name), whose masks are
    matched by stem in ``mask_dir`` (``<stem>.<ext>`` or ``<stem>_mask.<ext>``; none -> ``None``).
    """
    normal_dir = Path(normal_dir)
    _check_split(split, ("train", "valid", "test"), normal_dir)
    samples = [_sample(p, None, 0, "good") for p in list_images(normal_dir)]
    if split == "train" or abnormal_dir is None:
        return samples
    abnormal_dir = Path(abnormal_dir)
    files = list_images(abnormal_dir)
    if mask_dir is not None:
        _require_dir(Path(mask_dir), "mask folder")
    masks = _mask_index(mask_dir)
    defect = abnormal_dir.name or "anomaly"
    if defect == "good":
        defect = "anomaly"
    return samples + [_sample(p, masks.get(p.stem), 1, defect) for p in files]


def _child(folder: Path, name: str) -> Path:
    """``folder/name``, matching ``name`` case-insensitively when the exact one is absent."""
    exact = folder / name
    if exact.is_dir() or not folder.is_dir():
        return exact
    for p in folder.iterdir():
        if p.is_dir() and p.name.lower() == name.lower():
            return p
    return exact


def _img_dir(folder: Path) -> Path:
    """``folder/img`` if it exists, else ``folder`` itself (BMAD's optional ``img`` level)."""
    img = _child(folder, "img")
    return img if img.is_dir() else folder


def bmad_samples(root, split: str = "train") -> list[dict]:
    """Samples of a BMAD slice dataset.

    ``train``: ``train/good[/img]`` (label 0). ``valid``/``test``: ``<split>/good/img`` (label 0)
    and ``<split>/Ungood/img`` (label 1), masks in ``<split>/Ungood/label`` with the same file
    name (or the same stem with another image extension).
    """
    root = _require_dir(Path(root), "dataset folder")
    _check_split(split, ("train", "valid", "test"), root)
    if split == "train":
        good = _require_dir(_child(root / "train", "good"), "train/good folder")
        return [_sample(p, None, 0, "good") for p in list_images(_img_dir(good))]
    base = _require_dir(root / split, f"{split} folder")
    good, ungood = _child(base, "good"), _child(base, "Ungood")
    if not good.is_dir() and not ungood.is_dir():
        raise input_error(base, "expected the class folders good/img and Ungood/img in this folder")
    samples = []
    if good.is_dir():
        samples += [_sample(p, None, 0, "good") for p in list_images(_img_dir(good))]
    if ungood.is_dir():
        label_dir = _child(ungood, "label")
        by_name = {p.name: p for p in list_images(label_dir, required=False)}
        by_stem = _mask_index(label_dir)
        for p in list_images(_img_dir(ungood)):
            samples.append(_sample(p, by_name.get(p.name, by_stem.get(p.stem)), 1, ungood.name))
    return samples


#: reserved sub-folder names of the plain-folder layout (everything else is a class of anomaly)
FOLDER_NORMAL, FOLDER_NORMAL_TEST, FOLDER_MASKS = "good", "normal_test", ("mask", "masks")
#: every ``FOLDER_TEST_EVERY``-th image of ``good/`` (by name) is a test image when there is no ``normal_test/``
FOLDER_TEST_EVERY = 5


def folder_layout_samples(root, split: str = "train") -> list[dict]:
    """Samples of a plain-folder dataset, the layout of anomalib's ``Folder``::

        <root>/good/                  normal images
        <root>/<defect>/              anomalous images, one folder per kind (any other name)
        <root>/normal_test/           optional: normal test images
        <root>/mask/<defect>/         optional: masks, <stem>.<ext> or <stem>_mask.<ext>

    ``split="train"``: the images of ``good/``, except, when there is no ``normal_test/``, every
    fifth one by name (the 5th, 10th, ...), which is kept for testing. ``"test"``: those held-out
    (or ``normal_test/``'s) normal images (label 0) and every ``<defect>/`` image (label 1) with its
    mask when ``mask/<defect>/`` has one (else ``mask=None``: image-level metrics only).
    """
    root = _require_dir(Path(root), "dataset folder")
    _check_split(split, ("train", "test"), root)
    good = list_images(_require_dir(root / FOLDER_NORMAL, f"{FOLDER_NORMAL}/ folder of normal images"))
    normal_test = root / FOLDER_NORMAL_TEST
    if normal_test.is_dir():
        train, test_normal = good, list_images(normal_test)
    else:
        held = {i for i in range(len(good)) if i % FOLDER_TEST_EVERY == FOLDER_TEST_EVERY - 1}
        train = [p for i, p in enumerate(good) if i not in held]
        test_normal = [p for i, p in enumerate(good) if i in held]
    if split == "train":
        return [_sample(p, None, 0, "good") for p in train]
    samples = [_sample(p, None, 0, "good") for p in test_normal]
    reserved = {FOLDER_NORMAL, FOLDER_NORMAL_TEST, *FOLDER_MASKS}
    mask_root = next((root / m for m in FOLDER_MASKS if (root / m).is_dir()), None)
    for cls in _subdirs(root):
        if cls.name.lower() in reserved:
            continue
        files = list_images(cls, required=False)
        masks = _mask_index(mask_root / cls.name) if mask_root is not None else {}
        samples += [_sample(p, masks.get(p.stem), 1, cls.name) for p in files]
    return samples


_EXPECTED = (
    "expected MVTec AD (train/good, test/good, test/<defect>, ground_truth/<defect>/<name>_mask.png), "
    "BMAD (train/good[/img], {valid,test}/{good,Ungood}/img, {valid,test}/Ungood/label), "
    "plain folders (good/, <defect>/, optional normal_test/ and mask/<defect>/) "
    "or volumes (<case>.nii.gz or <case>/<image>.nii.gz, optional splits.json)"
)

#: the 2D image layouts :func:`samples_for` reads
LAYOUTS = ("mvtec", "bmad", "folder")


def _holds_volumes(root: Path) -> bool:
    """A ``splits.json``, or NIfTI files in ``root`` or one folder down."""
    if (root / "splits.json").is_file():
        return True
    return any(p.name.lower().endswith((".nii", ".nii.gz")) for p in [*root.glob("*"), *root.glob("*/*")])


def detect_layout(root) -> str:
    """The layout of a dataset folder, from its structure: ``"volumes"`` (NIfTI files or a ``splits.json``:
    :mod:`monai_multiad.data.volumes`) before the 2D layouts ``"bmad"``, ``"mvtec"``, ``"folder"``;
    MultiADInputError when none fits."""
    root = _require_dir(Path(root), "dataset folder")
    if _holds_volumes(root):
        return "volumes"
    for split in ("valid", "test"):
        if _child(root / split, "Ungood").is_dir() or _child(_child(root / split, "good"), "img").is_dir():
            return "bmad"
    if _child(_child(root / "train", "good"), "img").is_dir():
        return "bmad"
    if (root / "train" / "good").is_dir() and ((root / "test").is_dir() or (root / "ground_truth").is_dir()):
        return "mvtec"
    if (root / FOLDER_NORMAL).is_dir() and not (root / "train").is_dir():
        return "folder"
    found = [p.name + "/" for p in _subdirs(root)]
    found_txt = ", ".join(found[:12]) + (" ..." if len(found) > 12 else "") if found else "no subfolders"
    raise input_error(root, f"unknown dataset layout: {_EXPECTED}; found {found_txt}")


def samples_for(root, split: str = "train", layout: str = "auto") -> list[dict]:
    """Samples of ``root`` for ``split`` in ``layout`` (one of :data:`LAYOUTS`; ``"auto"``: the
    one :func:`detect_layout` finds). The layout given is the one read: a folder that does not
    follow it is an error naming what is missing.

    MVTec AD and the plain-folder layout have no ``valid`` split: use :func:`split_normals` on
    the train samples instead.
    """
    if layout == "auto":
        layout = detect_layout(root)
        if layout == "volumes":
            raise input_error(root, "a folder of volumes, not of 2D images: its slices are read by "
                                    "monai_multiad.data.volumes")
    if layout not in LAYOUTS:
        raise input_error(root, f"unknown image layout {layout!r}; expected auto or one of {', '.join(LAYOUTS)}")
    if layout == "bmad":
        return bmad_samples(root, split)
    if split == "valid":
        raise input_error(root, f"a {layout} dataset has no 'valid' split; hold out normal train images with "
                                "split_normals")
    return mvtec_samples(root, split) if layout == "mvtec" else folder_layout_samples(root, split)


def split_normals(samples: Sequence[dict], fraction: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic hold-out of normal samples: ``(train, val)``.

    ``round(fraction * n_normal)`` normal samples (at least 1 when ``fraction > 0`` and there
    are at least 2) go to ``val``, chosen by ``seed``; everything else stays in ``train``. Both
    keep the input order.
    """
    if not 0.0 <= float(fraction) < 1.0:
        raise input_error(None, f"fraction must be in [0, 1), got {fraction!r}")
    normal = [i for i, s in enumerate(samples) if int(s["label"]) == 0]
    n_val = int(round(fraction * len(normal)))
    if fraction > 0 and len(normal) >= 2:
        n_val = min(max(n_val, 1), len(normal) - 1)
    else:
        n_val = 0
    rng = np.random.default_rng(seed)
    val_idx = {normal[i] for i in rng.permutation(len(normal))[:n_val]}
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val
