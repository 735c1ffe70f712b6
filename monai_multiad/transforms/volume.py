"""Medical volumes for a 2D model: load, scale intensities by modality, cut into slices and back.

Volumes are ``MetaTensor`` ``(C, X, Y, Z)`` (``C = 1`` from :class:`LoadVolume`) with a 4x4
voxel-to-world ``affine`` in RAS (MONAI's convention); slices are ``(N, C, H, W)``. Where the slices
lie is a :class:`~monai_multiad.transforms.geometry.SliceGeometry`; which slices are cut is the
foreground rule (:data:`MIN_FOREGROUND`, :data:`FG_THRESHOLD`, :func:`foreground_slices`), the one
rule training, evaluation and screening all follow through :class:`VolumeToSlices`.
Dictionary forms are in :mod:`monai_multiad.transforms.volume_dict`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, Transform

from monai_multiad.errors import input_error

from monai_multiad.transforms.geometry import SliceGeometry, slice_affine, slice_geometry
from monai_multiad.transforms.intensity import CT_WINDOWS, ScaleIntensityByModality, as_meta, scale_intensity
from monai_multiad.transforms.loading import LoadVolume, load_volume

# loading, intensities and the geometry live in their own modules; they are re-exported here so that
# ``monai_multiad.transforms.volume`` stays the one import for the whole volume pipeline
__all__ = [
    "CT_WINDOWS", "LoadVolume", "ScaleIntensityByModality", "VolumeToSlices", "SlicesToVolume", "SliceGeometry",
    "load_volume", "scale_intensity", "volume_to_slices", "slices_to_volume", "slice_geometry", "slice_affine",
    "slice_foreground", "foreground_slices", "labelled_slices", "neighbour_indices", "MIN_FOREGROUND", "FG_THRESHOLD",
]

#: The foreground rule, written here only: a voxel is foreground when it exceeds
#: ``min + FG_THRESHOLD * (max - min)`` of the whole volume (on a volume scaled to [0, 1]: > 0.05),
#: and a slice is kept (trained on, evaluated, screened) when at least MIN_FOREGROUND of its voxels are.
MIN_FOREGROUND, FG_THRESHOLD = 0.01, 0.05


def _canonical_view(x: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
    return x.permute(0, *(1 + p for p in geometry.perm))  # (C, c0, c1, c2), flips not applied


def _canonical_numpy(a: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """``(n, C, h, w)`` numpy view of a ``(C, X, Y, Z)`` array in canonical order (flips as negative strides)."""
    v = a.transpose(0, *(1 + p for p in geometry.perm))
    v = v[(slice(None),) + tuple(slice(None, None, -1) if f else slice(None) for f in geometry.flip)]
    return np.moveaxis(v, 1 + geometry.slice_dim, 0)


def _numpy_or_none(x: torch.Tensor) -> np.ndarray | None:
    """A numpy view of a CPU tensor (fast strided copies), ``None`` on GPU or for dtypes numpy lacks."""
    if x.device.type != "cpu":
        return None
    try:
        return x.detach().numpy()
    except (TypeError, RuntimeError):
        return None


def _rows(ks: Sequence[int]):
    """An index for ``ks`` along axis 0: a slice when they are consecutive (a view), else an array."""
    return slice(ks[0], ks[0] + len(ks)) if list(ks) == list(range(ks[0], ks[0] + len(ks))) else np.asarray(ks)


def _contiguous(a: np.ndarray) -> np.ndarray:
    """A C-contiguous array torch can take: numpy calls an array with a reversed axis of length 1
    contiguous, but its stride stays negative, which ``torch.from_numpy`` refuses."""
    a = np.ascontiguousarray(a)
    return a.copy() if any(s < 0 for s in a.strides) else a


def _plane_flips(geometry: SliceGeometry) -> list[int]:
    return [2 + j for j, d in enumerate(geometry.plane_dims) if geometry.flip[d]]


def _resize(chunk: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    if tuple(chunk.shape[-2:]) == tuple(size):
        return chunk
    if mode == "nearest":
        return torch.nn.functional.interpolate(chunk.float(), size=tuple(size), mode="nearest-exact").to(chunk.dtype)
    return torch.nn.functional.interpolate(chunk.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


def _slice_counts(volume: Any, geometry: SliceGeometry, threshold: float, chunk_size: int) -> torch.Tensor:
    """How many voxels of each canonical slice exceed ``threshold``: int64 ``(num_slices,)``, reading the
    volume ``(C, X, Y, Z)`` in its memory order."""
    x = torch.as_tensor(volume)
    a = _numpy_or_none(x)
    dim, n = 1 + geometry.array_axis, geometry.num_slices
    if a is None:
        counts = (x > threshold).sum(dim=[d for d in range(4) if d != dim]).cpu()
    else:  # read memory in order: slice by slice if slices are contiguous, else slabs along the slowest axis
        big = max(range(4), key=lambda d: (a.shape[d] > 1, a.strides[d]))
        others = tuple(d for d in range(4) if d != dim)
        counts_np = np.zeros(n, dtype=np.int64)
        if big == dim:
            at = [slice(None)] * 4
            for i in range(n):
                at[dim] = i
                counts_np[i] = np.count_nonzero(a[tuple(at)] > threshold)
        else:
            for start in range(0, a.shape[big], chunk_size):
                index = [slice(None)] * 4
                index[big] = slice(start, start + chunk_size)
                counts_np += (a[tuple(index)] > threshold).sum(axis=others)
        counts = torch.from_numpy(counts_np)
    return counts[torch.as_tensor([geometry.array_index(k) for k in range(n)])]


def slice_foreground(volume: Any, geometry: SliceGeometry, fg_threshold: float = FG_THRESHOLD,
                     chunk_size: int = 32) -> torch.Tensor:
    """Fraction of each canonical slice's voxels above ``min + fg_threshold * (max - min)`` of the volume.

    Args: volume: ``(C, X, Y, Z)``; geometry: its :func:`slice_geometry`; chunk_size: slabs at a time.
    Returns: float64 tensor ``(num_slices,)`` indexed by canonical slice index.
    """
    x = torch.as_tensor(volume)
    a = _numpy_or_none(x)
    lo, hi = (float(a.min()), float(a.max())) if a is not None else (float(x.min()), float(x.max()))
    counts = _slice_counts(x, geometry, lo + fg_threshold * (hi - lo), chunk_size)
    return counts.double() / (x.numel() / geometry.num_slices)


def foreground_slices(volume: Any, geometry: SliceGeometry, min_foreground: float = MIN_FOREGROUND,
                      fg_threshold: float = FG_THRESHOLD, chunk_size: int = 32) -> list[int]:
    """The canonical indices of the slices the foreground rule keeps (see :data:`MIN_FOREGROUND`), in order.
    A constant volume keeps none. Args: as :func:`slice_foreground`, and the rule's two numbers."""
    fractions = slice_foreground(volume, geometry, fg_threshold, chunk_size)
    return [k for k in range(geometry.num_slices) if float(fractions[k]) >= min_foreground]


def labelled_slices(label: Any, geometry: SliceGeometry, chunk_size: int = 32) -> list[int]:
    """The canonical indices of the slices of a label volume ``(C, X, Y, Z)`` with a voxel > 0, in order
    (``geometry``: the one of its image, on the same grid)."""
    counts = _slice_counts(label, geometry, 0, chunk_size)
    return [k for k in range(geometry.num_slices) if int(counts[k]) > 0]


def neighbour_indices(indices: Sequence[int], num_slices: int, context: int) -> list[int]:
    """Each of ``indices`` with its ``context`` neighbours on each side, in order (``k - context .. k +
    context`` for each ``k``), clamped to ``[0, num_slices)``: the slices a 2.5D input stacks."""
    return [min(max(k + d, 0), num_slices - 1) for k in indices for d in range(-context, context + 1)]


def volume_to_slices(volume: Any, axis: str = "axial", *, orientation: str = "RAS",
                     spatial_size: Sequence[int] | None = None, mode: str = "bilinear",
                     min_foreground: float = MIN_FOREGROUND, fg_threshold: float = FG_THRESHOLD,
                     keep_all: bool = False, indices: Sequence[int] | None = None,
                     chunk_size: int = 32, context: int = 0) -> tuple[torch.Tensor, list[int], SliceGeometry]:
    """Cut a volume into canonical 2D slices (see :func:`slice_geometry` for where they lie).

    The slices kept are those of the foreground rule (:func:`foreground_slices`), every slice with
    ``keep_all``, or exactly ``indices``. Memory: the output stack plus one chunk of ``chunk_size``
    slices; the volume is never copied.

    Args:
        volume: ``MetaTensor`` ``(C, X, Y, Z)`` with its affine.
        axis, orientation: see :func:`slice_geometry`.
        spatial_size: resize every slice to ``(H, W)`` (``None``: keep ``(h, w)``).
        mode: "bilinear" (images; float32 output, antialiased when shrinking) or "nearest"
            (labels; keeps the dtype).
        min_foreground, fg_threshold: the foreground rule (:data:`MIN_FOREGROUND`, :data:`FG_THRESHOLD`).
        keep_all: keep every slice.
        indices: take exactly these canonical slice indices (e.g. a label's, from its image).
        chunk_size: slices processed at a time.
        context: slices taken on each side of each kept slice, stacked as channels (2.5D input): with
            ``context=1`` a one-channel volume gives ``(N, 3, H, W)``, slices ``k - 1, k, k + 1`` in that
            order; at the ends of the volume the edge slice stands in for the missing neighbour.

    Returns:
        ``(slices (N, C (2 context + 1), H, W), indices (N canonical slice indices), geometry)``.
    """
    vol = as_meta(volume)
    geometry = slice_geometry(vol, axis, orientation, spatial_size)
    x, n = vol.as_tensor(), geometry.num_slices
    if indices is not None:
        kept = [int(k) for k in indices]
        if any(k < 0 or k >= n for k in kept):
            raise input_error(vol.meta.get("filename_or_obj"), f"slice indices must lie in [0, {n}), got {kept}")
    elif keep_all:
        kept = list(range(n))
    else:
        kept = foreground_slices(x, geometry, min_foreground, fg_threshold, chunk_size)
    if int(context) < 0:
        raise input_error(None, f"context must be 0 or more slices, got {context}")
    if context:
        out, _, _ = volume_to_slices(vol, axis, orientation=orientation, spatial_size=spatial_size, mode=mode,
                                     indices=neighbour_indices(kept, n, int(context)), chunk_size=chunk_size)
        return out.reshape(len(kept), -1, *out.shape[-2:]), kept, geometry
    size = geometry.output_shape
    out = torch.empty((len(kept), x.shape[0], *size), device=x.device,
                      dtype=x.dtype if mode == "nearest" else torch.float32)
    a = _numpy_or_none(x)
    view = _canonical_numpy(a, geometry) if a is not None else _canonical_view(x, geometry)
    dim, flips = 1 + geometry.slice_dim, _plane_flips(geometry)
    for start in range(0, len(kept), chunk_size):
        ks = kept[start:start + chunk_size]
        if a is not None and tuple(size) == tuple(geometry.slice_shape):
            out.numpy()[start:start + len(ks)] = view[_rows(ks)]
            continue
        if a is not None:
            chunk = torch.from_numpy(_contiguous(view[_rows(ks)]))
        else:
            src = torch.as_tensor([geometry.array_index(k) for k in ks], device=x.device)
            chunk = view.index_select(dim, src).movedim(dim, 0)  # (B, C, h, w)
            chunk = chunk.flip(flips) if flips else chunk
        out[start:start + len(ks)] = _resize(chunk, size, mode)
    return out, kept, geometry


def slices_to_volume(slice_maps: Any, indices: Sequence[int], geometry: SliceGeometry, mode: str = "bilinear",
                     fill: float = 0.0, chunk_size: int = 32) -> MetaTensor:
    """Put per-slice 2D maps back on the original volume grid (the inverse of :func:`volume_to_slices`).

    Undoes the resize (to the native ``(h, w)``), puts slice ``indices[i]`` in place (slices not
    given are ``fill``), undoes the reorientation. Memory: the output volume plus one chunk; the
    output's memory order has the slice axis slowest (its strides may not be C-contiguous).

    Args:
        slice_maps: ``(N, C, H, W)`` (or ``(N, H, W)``) maps, in any size.
        indices: their canonical slice indices, as :func:`volume_to_slices` returned them.
        geometry: the :class:`SliceGeometry` from :func:`volume_to_slices` / :func:`slice_geometry`.
        mode: "bilinear" (maps) or "nearest" (labels) for undoing the resize.
        fill: value of the slices not given.

    Returns:
        ``MetaTensor`` ``(C, X, Y, Z)`` with the original affine and metadata.
    """
    maps = slice_maps.as_tensor() if isinstance(slice_maps, MetaTensor) else torch.as_tensor(slice_maps)
    maps = maps[:, None] if maps.ndim == 3 else maps
    indices = [int(k) for k in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
    n = geometry.num_slices
    if maps.ndim != 4 or maps.shape[0] != len(indices):
        raise input_error(None, f"slice maps must be (N, C, H, W) with N = len(indices) = {len(indices)}, "
                                f"got {tuple(maps.shape)}")
    if any(k < 0 or k >= n for k in indices) or len(set(indices)) != len(indices):
        raise input_error(None, f"slice indices must be distinct and lie in [0, {n}), got {indices}")
    dtype = maps.dtype if (mode == "nearest" or maps.is_floating_point()) else torch.float32
    order = [geometry.array_axis] + [geometry.perm[d] for d in geometry.plane_dims]  # slowest first
    shape = geometry.spatial_shape
    buf = torch.full((maps.shape[1], *(shape[p] for p in order)), fill, dtype=dtype, device=maps.device)
    out = buf.permute(0, *(1 + order.index(i) for i in range(3)))  # (C, X, Y, Z)
    a = _numpy_or_none(out)
    view = _canonical_numpy(a, geometry) if a is not None else _canonical_view(out, geometry)
    dim, flips = 1 + geometry.slice_dim, _plane_flips(geometry)
    for start in range(0, len(indices), chunk_size):
        ks = indices[start:start + chunk_size]
        chunk = _resize(maps[start:start + len(ks)], geometry.slice_shape, mode).to(dtype)
        if a is not None:
            view[_rows(ks)] = chunk.detach().cpu().numpy()
            continue
        chunk = chunk.flip(flips) if flips else chunk
        for j, k in enumerate(ks):
            view.select(dim, geometry.array_index(k)).copy_(chunk[j])
    meta = {k: v for k, v in geometry.meta.items() if k != "intensity_normalisation"}  # the maps are not intensities
    return MetaTensor(out, affine=torch.tensor(geometry.affine), meta=meta)


def recorded_slice(item: Any) -> tuple[int, SliceGeometry] | None:
    """``(slice_index, geometry)`` recorded by :class:`VolumeToSlices` on a slice ``MetaTensor``."""
    for op in reversed(getattr(item, "applied_operations", []) or []):
        if op.get("class") == "VolumeToSlices":
            extra = op.get("extra_info", {})
            return int(extra["slice_index"]), extra["geometry"]
    return None


class VolumeToSlices(InvertibleTransform):
    """``(C, X, Y, Z)`` volume -> list of ``MetaTensor`` slices ``(C, H, W)``: see :func:`volume_to_slices`.

    The one way from a volume to the slices a 2D model sees: training and evaluation datasets
    (:mod:`monai_multiad.data.volumes`) and screening (:mod:`monai_multiad.screening`) each build one
    with their axis and size and use :meth:`select` and :meth:`slices`, so they keep the same slices of
    the same volume. Each slice's metadata has ``slice_index`` (canonical index along the axis),
    ``slice_axis`` and ``num_slices``, plus the volume's metadata (entries that are ``None`` dropped so a
    DataLoader can collate them); its affine maps ``(row, col, 0)`` to world RAS (see
    :func:`slice_affine`); the :class:`SliceGeometry` for the inverse is pushed on ``applied_operations``.
    :meth:`inverse` takes the list back (maps derived from the slices may replace them as long as
    they keep the slices' ``applied_operations``).

    Args:
        axis, orientation, spatial_size, mode, min_foreground, fg_threshold, keep_all, chunk_size, context:
            as in :func:`volume_to_slices` (``context``: the neighbours each slice brings as channels).
    """

    def __init__(self, axis: str = "axial", orientation: str = "RAS", spatial_size: Sequence[int] | None = None,
                 mode: str = "bilinear", min_foreground: float = MIN_FOREGROUND, fg_threshold: float = FG_THRESHOLD,
                 keep_all: bool = False, chunk_size: int = 32, context: int = 0) -> None:
        self.axis, self.orientation, self.spatial_size, self.mode = axis, orientation, spatial_size, mode
        self.min_foreground, self.fg_threshold = min_foreground, fg_threshold
        self.keep_all, self.chunk_size, self.context = keep_all, chunk_size, int(context)

    @property
    def foreground_rule(self) -> str:
        """The rule in words, as screening reports record it."""
        if self.keep_all:
            return "every slice"
        return f">= {self.min_foreground:.0%} of the slice's voxels above {self.fg_threshold:.0%} of the range"

    def select(self, img: Any) -> tuple[SliceGeometry, list[int]]:
        """The geometry of ``img`` ``(C, X, Y, Z)`` and the canonical indices of the slices this transform
        keeps (the foreground rule, or every slice with ``keep_all``), reading the volume once."""
        vol = as_meta(img)
        geometry = slice_geometry(vol, self.axis, self.orientation, self.spatial_size)
        if self.keep_all:
            return geometry, list(range(geometry.num_slices))
        return geometry, foreground_slices(vol.as_tensor(), geometry, self.min_foreground, self.fg_threshold,
                                           self.chunk_size)

    def slices(self, img: Any, indices: Sequence[int] | None = None, mode: str | None = None,
               context: int | None = None):
        """The function form: ``(slices (N, C, H, W), indices, geometry)`` (``context``: default the constructor's)."""
        return volume_to_slices(img, self.axis, orientation=self.orientation, spatial_size=self.spatial_size,
                                mode=mode or self.mode, min_foreground=self.min_foreground, fg_threshold=self.fg_threshold,
                                keep_all=self.keep_all, indices=indices, chunk_size=self.chunk_size,
                                context=self.context if context is None else context)

    def __call__(self, img: Any, indices: Sequence[int] | None = None, mode: str | None = None,
                 context: int | None = None) -> list[MetaTensor]:
        """Args: img: ``(C, X, Y, Z)``. indices: take these slices instead of the foreground rule. context:
        neighbours as channels (default the constructor's).
        Returns: list of ``MetaTensor`` ``(C (2 context + 1), H, W)``."""
        img = as_meta(img)
        stack, kept, geometry = self.slices(img, indices, mode, context)
        base = {k: v for k, v in geometry.meta.items() if v is not None}
        out = []
        for j, k in enumerate(kept):
            meta = dict(base, slice_index=k, slice_axis=geometry.axis, num_slices=geometry.num_slices)
            item = MetaTensor(stack[j], affine=torch.as_tensor(slice_affine(geometry, k)), meta=meta,
                              applied_operations=list(img.applied_operations))
            self.push_transform(item, orig_size=geometry.spatial_shape, extra_info={"slice_index": k, "geometry": geometry})
            out.append(item)
        return out

    def inverse(self, data: Sequence[Any], mode: str | None = None) -> MetaTensor:
        """Args: data: the slices (or maps carrying their ``applied_operations``); mode: resize mode
        for undoing a resize (default: the constructor's). Returns: the volume ``(C, X, Y, Z)``."""
        items = list(data)
        if not items:
            raise input_error(None, "no slices to put back into a volume")
        ops = [self.pop_transform(item)["extra_info"] for item in items]
        maps = torch.stack([torch.as_tensor(item) for item in items])
        vol = slices_to_volume(maps, [int(op["slice_index"]) for op in ops], ops[0]["geometry"], mode or self.mode,
                               chunk_size=self.chunk_size)
        vol.applied_operations = list(items[0].applied_operations)
        return vol


class SlicesToVolume(Transform):
    """Per-slice 2D maps -> a volume on the original grid: see :func:`slices_to_volume`.

    Call with either the list of slice ``MetaTensor`` s from :class:`VolumeToSlices` (or maps that
    kept their metadata): indices and geometry are read from them; or with a tensor
    ``(N, C, H, W)``, its ``indices`` and a ``reference``: the :class:`SliceGeometry` from
    :func:`volume_to_slices` or :meth:`VolumeToSlices.select`, or the original volume ``MetaTensor``
    (then ``axis`` and ``orientation`` must be the ones used for slicing).

    Args:
        axis, orientation: slicing geometry when ``reference`` is a volume.
        mode: "bilinear" (maps) or "nearest" (labels) for undoing a resize.
        fill: value of slices that were not given (skipped background).
        chunk_size: slices put back at a time.
    """

    def __init__(self, axis: str = "axial", orientation: str = "RAS", mode: str = "bilinear", fill: float = 0.0,
                 chunk_size: int = 32) -> None:
        self.axis, self.orientation, self.mode, self.fill, self.chunk_size = axis, orientation, mode, fill, chunk_size

    def __call__(self, slice_maps: Any, indices: Sequence[int] | None = None, reference: Any = None) -> MetaTensor:
        """Returns: ``MetaTensor`` ``(C, X, Y, Z)`` with the original shape and affine."""
        if isinstance(slice_maps, (list, tuple)):
            recorded = [recorded_slice(m) for m in slice_maps]
            if indices is None:
                indices = [int(m.meta["slice_index"]) if r is None else r[0] for m, r in zip(slice_maps, recorded)]
            if reference is None and recorded and recorded[0] is not None:
                reference = recorded[0][1]
            if not slice_maps:
                raise input_error(None, "no slices to put back into a volume")
            slice_maps = torch.stack([torch.as_tensor(m) for m in slice_maps])
        if indices is None or reference is None:
            raise input_error(None, "SlicesToVolume needs the slice indices and a reference "
                                    "(the slice geometry or the original volume)")
        geometry = reference if isinstance(reference, SliceGeometry) else \
            slice_geometry(as_meta(reference), self.axis, self.orientation)
        return slices_to_volume(slice_maps, indices, geometry, self.mode, self.fill, self.chunk_size)
