"""Dictionary forms of the volume transforms in :mod:`monai_multiad.transforms.volume`.

Typical use (``image`` and ``label`` are paths to volumes on the same grid)::

    Compose([
        LoadVolumed(["image", "label"]),
        ScaleIntensityByModalityd("image", mode="mri"),
        VolumeToSlicesd(["image", "label"], spatial_size=(256, 256), mode=("bilinear", "nearest")),
        ...  # later transforms run on every slice dict of the list
    ])
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform
from monai.utils import ensure_tuple_rep

from monai_multiad.errors import input_error
from monai_multiad.transforms.volume import (
    FG_THRESHOLD,
    MIN_FOREGROUND,
    LoadVolume,
    ScaleIntensityByModality,
    SlicesToVolume,
    VolumeToSlices,
    as_meta,
    recorded_slice,
    labelled_slices,
)

__all__ = [
    "LoadVolumed", "LoadVolumeD", "LoadVolumeDict",
    "ScaleIntensityByModalityd", "ScaleIntensityByModalityD", "ScaleIntensityByModalityDict",
    "VolumeToSlicesd", "VolumeToSlicesD", "VolumeToSlicesDict",
    "SlicesToVolumed", "SlicesToVolumeD", "SlicesToVolumeDict",
]


class LoadVolumed(MapTransform):
    """Dictionary form of :class:`~monai_multiad.transforms.volume.LoadVolume`: path -> ``MetaTensor`` ``(1, X, Y, Z)``.

    Args:
        keys: keys whose values are paths (NIfTI file, DICOM file or DICOM series folder).
        series_uid: SeriesInstanceUID to pick in folders holding several series.
        dtype: output dtype.
        allow_missing_keys: do not fail on absent keys.
    """

    def __init__(self, keys: KeysCollection, series_uid: str | None = None, dtype=np.float32,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadVolume(series_uid=series_uid, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


class ScaleIntensityByModalityd(MapTransform):
    """Dictionary form of :class:`~monai_multiad.transforms.volume.ScaleIntensityByModality`.

    Args:
        keys: keys of the volumes to scale to float32 ``[0, 1]``.
        mode, lower, upper, window, preset: as in the array transform.
        allow_missing_keys: do not fail on absent keys.
    """

    def __init__(self, keys: KeysCollection, mode: str = "mri", lower: float = 0.5, upper: float = 99.5,
                 window: Sequence[float] | None = None, preset: str | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaler = ScaleIntensityByModality(mode=mode, lower=lower, upper=upper, window=window, preset=preset)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key])
        return d


class VolumeToSlicesd(MapTransform, InvertibleTransform):
    """Dictionary form of :class:`~monai_multiad.transforms.volume.VolumeToSlices`: one dict -> a list of slice dicts.

    The slices to keep are chosen once, on ``fg_key`` (default: the first key), by the
    foreground rule (:meth:`~monai_multiad.transforms.volume.VolumeToSlices.select`), and the
    same indices are taken from every key, so image and label slices stay paired. Each output dict
    holds every key's ``MetaTensor`` ``(C, H, W)``, ``index_key`` (the canonical slice index)
    and the other entries of the input dict (shared, not copied). An empty list comes back when
    no slice is foreground.

    With ``label_key`` (a label volume, on the grid of ``fg_key``'s; any voxel > 0 is anomalous) the
    slices with label voxels are ``labelled="drop"``: left out (the normal slices a detector trains on)
    or ``"add"``: kept besides the foreground (an anomaly is never dropped), and each output dict gets
    ``flag_key`` = 1 for such a slice, else 0. The label must have the image's shape (else an error
    names both files) and is cut with the image's geometry. A dict without ``label_key`` is a normal
    volume (all flags 0).

    Args:
        keys: keys of volumes ``(C, X, Y, Z)`` on one grid.
        axis, orientation, spatial_size, min_foreground, fg_threshold, keep_all, chunk_size:
            as in the array transform.
        mode: resize mode per key ("bilinear" for images, "nearest" for labels), or one for all.
        fg_key: the key the foreground rule looks at (may be outside ``keys``).
        index_key: output key of the slice index.
        label_key: key of the label volume (may also be in ``keys``, to get its slices), or ``None``.
        labelled: "drop" or "add" (above).
        flag_key: output key of the per-slice label flag.
        context: neighbouring slices on each side stacked as channels (2.5D input), for the keys resized
            "bilinear" (images); labels ("nearest") keep their one slice.
        allow_missing_keys: do not fail on absent keys.
    """

    def __init__(self, keys: KeysCollection, axis: str = "axial", orientation: str = "RAS",
                 spatial_size: Sequence[int] | None = None, mode: str | Sequence[str] = "bilinear",
                 min_foreground: float = MIN_FOREGROUND, fg_threshold: float = FG_THRESHOLD, keep_all: bool = False,
                 fg_key: Hashable | None = None, index_key: Hashable = "slice_index", chunk_size: int = 32,
                 label_key: Hashable | None = None, labelled: str = "drop", flag_key: Hashable = "label",
                 context: int = 0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if labelled not in ("drop", "add"):
            raise input_error(None, f"labelled must be 'drop' or 'add', got {labelled!r}")
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.fg_key, self.index_key = fg_key, index_key
        self.label_key, self.labelled, self.flag_key = label_key, labelled, flag_key
        self.slicer = VolumeToSlices(axis=axis, orientation=orientation, spatial_size=spatial_size,
                                     min_foreground=min_foreground, fg_threshold=fg_threshold,
                                     keep_all=keep_all, chunk_size=chunk_size)
        self.context = int(context)

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        keys = [(key, mode) for key, mode in self.key_iterator(d, self.mode)]
        if not keys:
            return [d]
        fg_key = self.fg_key if self.fg_key is not None else keys[0][0]
        if fg_key not in d:
            raise input_error(None, f"fg_key {fg_key!r} is not in the data (keys: {list(d)})")
        geometry, kept = self.slicer.select(d[fg_key])
        anomalous: set[int] = set()
        if self.label_key is not None and self.label_key in d:
            d[self.label_key] = _on_grid_of(d[self.label_key], d[fg_key])
            anomalous = set(labelled_slices(d[self.label_key].as_tensor(), geometry, self.slicer.chunk_size))
            kept = sorted(set(kept) - anomalous) if self.labelled == "drop" else sorted(set(kept) | anomalous)
        per_key = {key: self.slicer(d[key], indices=kept, mode=mode, context=0 if mode == "nearest" else self.context)
                   for key, mode in keys}
        names = set(per_key)
        out = []
        for j, k in enumerate(kept):
            item = {name: value for name, value in d.items() if name not in names}
            item.update({name: slices[j] for name, slices in per_key.items()})
            item[self.index_key] = k
            if self.label_key is not None:
                item[self.flag_key] = int(k in anomalous)
            out.append(item)
        return out

    def inverse(self, data: Sequence[Mapping[Hashable, Any]]) -> dict[Hashable, Any]:
        """Args: data: the list of slice dicts. Returns: one dict with each key's volume."""
        items = list(data)
        if not items:
            raise input_error(None, "no slice dicts to put back into volumes")
        d = {name: value for name, value in items[0].items() if name != self.index_key}
        for key, mode in self.key_iterator(items[0], self.mode):
            d[key] = self.slicer.inverse([item[key] for item in items], mode=mode)
        return d


def _on_grid_of(label: Any, image: Any) -> MetaTensor:
    """``label`` on ``image``'s grid: the same shape (else an error naming both files), the image's affine
    (so a label whose affine differs by rounding is cut exactly as its image)."""
    label, image = as_meta(label), as_meta(image)
    if tuple(label.shape[1:]) != tuple(image.shape[1:]):
        raise input_error(label.meta.get("filename_or_obj"),
                          f"label shape {tuple(label.shape[1:])} differs from its image "
                          f"{image.meta.get('filename_or_obj', '')} {tuple(image.shape[1:])}")
    meta = {k: v for k, v in label.meta.items() if k != "affine"}
    return MetaTensor(label.as_tensor(), affine=image.affine, meta=meta)


class SlicesToVolumed(MapTransform):
    """Dictionary form of :class:`~monai_multiad.transforms.volume.SlicesToVolume`.

    Accepts either the list of slice dicts from :class:`VolumeToSlicesd` (for each key, the
    per-slice maps; indices and geometry from the slices' metadata, or from ``ref_key``'s slices
    when the maps are new tensors), or one dict whose keys hold stacked maps ``(N, C, H, W)``,
    ``index_key`` the indices and ``ref_key`` the reference (the slices'
    :class:`~monai_multiad.transforms.geometry.SliceGeometry` or the original volume). Returns one
    dict: each key holds its ``(C, X, Y, Z)`` volume.

    Args:
        keys: keys of the per-slice maps.
        axis, orientation: slicing geometry, used when the reference is a volume.
        mode: "bilinear" (maps) or "nearest" (labels), per key or one for all.
        fill: value of slices that were not given.
        index_key: key of the slice indices.
        ref_key: key of the reference (see above).
        allow_missing_keys: do not fail on absent keys.
    """

    def __init__(self, keys: KeysCollection, axis: str = "axial", orientation: str = "RAS",
                 mode: str | Sequence[str] = "bilinear", fill: float = 0.0, index_key: Hashable = "slice_index",
                 ref_key: Hashable | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.axis, self.orientation, self.fill = axis, orientation, fill
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.index_key, self.ref_key = index_key, ref_key

    def __call__(self, data: Mapping[Hashable, Any] | Sequence[Mapping[Hashable, Any]]) -> dict[Hashable, Any]:
        if isinstance(data, Mapping):
            d = dict(data)
            indices = d.get(self.index_key)
            reference = d.get(self.ref_key) if self.ref_key is not None else None
            for key, mode in self.key_iterator(d, self.mode):
                t = SlicesToVolume(self.axis, self.orientation, mode, self.fill)
                d[key] = t(d[key], indices=indices, reference=reference)
            return d
        items = list(data)
        if not items:
            raise input_error(None, "no slice dicts to put back into volumes")
        indices = [int(item[self.index_key]) for item in items] if self.index_key in items[0] else None
        reference = None
        if self.ref_key is not None:
            recorded = recorded_slice(items[0][self.ref_key])
            reference = recorded[1] if recorded is not None else None
        d = {name: value for name, value in items[0].items() if name != self.index_key}
        for key, mode in self.key_iterator(items[0], self.mode):
            t = SlicesToVolume(self.axis, self.orientation, mode, self.fill)
            d[key] = t([item[key] for item in items], indices=indices, reference=reference)
        if self.ref_key is not None and self.ref_key not in self.keys:
            d.pop(self.ref_key, None)
        return d


LoadVolumeD = LoadVolumeDict = LoadVolumed
ScaleIntensityByModalityD = ScaleIntensityByModalityDict = ScaleIntensityByModalityd
VolumeToSlicesD = VolumeToSlicesDict = VolumeToSlicesd
SlicesToVolumeD = SlicesToVolumeDict = SlicesToVolumed
