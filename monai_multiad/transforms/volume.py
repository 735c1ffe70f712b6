"""Medical volumes for a 2D model: load, scale intensities by modality, cut into slices and back.

Volumes are ``MetaTensor`` ``(C, X, Y, Z)`` (``C = 1`` from :class:`LoadVolume`) with a 4x4
voxel-to-world ``affine`` in RAS (MONAI's convention); slices are ``(N, C, H, W)``.
Dictionary forms are in :mod:`monai_multiad.transforms.volume_dict`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, Transform

from monai_multiad.errors import input_error

from monai_multiad.transforms.intensity import CT_WINDOWS, ScaleIntensityByModality, _as_meta, scale_intensity
from monai_multiad.transforms.loading import LoadVolume, _check_affine, load_volume

# loading and intensities live in their own modules; they are re-exported here so that
# ``monai_multiad.transforms.volume`` stays the one import for the whole volume pipeline
__all__ = [
    "CT_WINDOWS", "LoadVolume", "ScaleIntensityByModality", "VolumeToSlices", "SlicesToVolume",
    "load_volume", "scale_intensity", "volume_to_slices", "slices_to_volume", "slice_info", "slice_affine",
    "slice_foreground",
]


_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # the RAS world axis normal to the slices


def slice_info(volume: MetaTensor, axis: str = "axial", orientation: str = "RAS",
               spatial_size: Sequence[int] | None = None) -> dict:
    """The geometry that maps a volume to canonical 2D slices and back (reads no voxels).

    The volume is reoriented (axes permuted and flipped, never resampled) to ``orientation``
    (nibabel axis codes, default "RAS": the same as ``monai.transforms.Orientation("RAS")``),
    using the array axis closest to each world axis as found from the affine
    (``nibabel.orientations.io_orientation``), whatever the array order. Slices are taken along
    the canonical axis normal to ``axis`` ("axial": S-I, "coronal": A-P, "sagittal": R-L), index
    0 at the first end of that axis in ``orientation``; a slice's rows and columns are the two
    other canonical axes in order. With "RAS", axial slice ``k`` is ``ras[:, :, k]``: the row index
    grows toward the patient's right, the column index toward anterior, ``k`` toward superior
    (``orientation="PLS"`` gives the radiological display instead: anterior at the top, the
    patient's right on the image's left).

    Args:
        volume: ``MetaTensor`` ``(C, X, Y, Z)`` with its affine.
        axis: "axial", "coronal" or "sagittal".
        orientation: three axis codes, one of L/R, one of P/A, one of I/S.
        spatial_size: ``(H, W)`` the slices are resized to, or ``None``.

    Returns:
        A plain dict: ``axis``, ``orientation``, ``perm``/``flip`` (canonical axis ``m`` is input
        axis ``perm[m]``, reversed where ``flip[m]``), ``slice_dim``, ``plane_dims``,
        ``spatial_shape`` ``(X, Y, Z)``, ``num_slices``, ``slice_shape`` ``(h, w)``,
        ``spatial_size``, ``affine`` (the input's, numpy 4x4), ``canonical_affine`` and ``meta``.
    """
    import nibabel.orientations as nio

    path = volume.meta.get("filename_or_obj") if isinstance(volume, MetaTensor) else None
    if axis not in _AXES:
        raise input_error(path, f"unknown slice axis {axis!r}; expected one of {sorted(_AXES)}")
    codes = tuple(str(orientation).upper())
    try:
        target = nio.axcodes2ornt(codes)
    except Exception:  # noqa: BLE001
        target = np.zeros((0, 2))
    if len(codes) != 3 or sorted(target[:, 0].tolist()) != [0, 1, 2]:
        raise input_error(path, f"bad orientation {orientation!r}; expected 3 axis codes like 'RAS' or 'LPS'")
    if volume.ndim != 4:
        raise input_error(path, f"expected a volume (C, X, Y, Z), got shape {tuple(volume.shape)}")
    affine = _check_affine(path, np.asarray(volume.affine.detach().cpu(), dtype=np.float64))
    src = nio.io_orientation(affine)
    perm = [int(np.flatnonzero(src[:, 0] == w)[0]) for w in target[:, 0]]
    flip = [bool(src[p, 1] != s) for p, s in zip(perm, target[:, 1])]
    shape = tuple(int(s) for s in volume.shape[1:])
    to_input = np.eye(4)  # canonical voxel -> input voxel
    to_input[:3, :3] = 0
    for m, (p, f) in enumerate(zip(perm, flip)):
        to_input[p, m] = -1.0 if f else 1.0
        to_input[p, 3] = shape[p] - 1 if f else 0
    sdim = int(np.flatnonzero(target[:, 0] == _AXES[axis])[0])
    plane = [d for d in range(3) if d != sdim]
    cshape = [shape[p] for p in perm]
    return {"axis": axis, "orientation": "".join(codes), "perm": perm, "flip": flip, "slice_dim": sdim,
            "plane_dims": plane, "spatial_shape": shape, "num_slices": cshape[sdim],
            "slice_shape": (cshape[plane[0]], cshape[plane[1]]),
            "spatial_size": None if spatial_size is None else tuple(int(s) for s in spatial_size),
            "affine": affine, "canonical_affine": affine @ to_input,
            "meta": {k: v for k, v in getattr(volume, "meta", {}).items() if k != "affine"}}


def slice_affine(info: dict, index: int) -> np.ndarray:
    """4x4 matrix mapping ``(row, col, 0)`` of output slice ``index`` (after any resize) to world RAS."""
    h, w = info["slice_shape"]
    big_h, big_w = info["spatial_size"] or (h, w)
    a, b = info["plane_dims"]
    scale = np.zeros((4, 4))
    scale[3, 3] = 1.0
    scale[a, 0], scale[a, 3] = h / big_h, 0.5 * h / big_h - 0.5
    scale[b, 1], scale[b, 3] = w / big_w, 0.5 * w / big_w - 0.5
    scale[info["slice_dim"], 2], scale[info["slice_dim"], 3] = 1.0, float(index)
    return info["canonical_affine"] @ scale


def _canonical_view(x: torch.Tensor, info: dict) -> torch.Tensor:
    return x.permute(0, *(1 + p for p in info["perm"]))  # (C, c0, c1, c2), flips not applied


def _canonical_numpy(a: np.ndarray, info: dict) -> np.ndarray:
    """``(n, C, h, w)`` numpy view of a ``(C, X, Y, Z)`` array in canonical order (flips as negative strides)."""
    v = a.transpose(0, *(1 + p for p in info["perm"]))
    v = v[(slice(None),) + tuple(slice(None, None, -1) if f else slice(None) for f in info["flip"])]
    return np.moveaxis(v, 1 + info["slice_dim"], 0)


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


def _source_index(info: dict, k: int) -> int:
    return info["num_slices"] - 1 - k if info["flip"][info["slice_dim"]] else k


def _plane_flips(info: dict) -> list[int]:
    return [2 + j for j, d in enumerate(info["plane_dims"]) if info["flip"][d]]


def _resize(chunk: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    if tuple(chunk.shape[-2:]) == tuple(size):
        return chunk
    if mode == "nearest":
        return torch.nn.functional.interpolate(chunk.float(), size=tuple(size), mode="nearest-exact").to(chunk.dtype)
    return torch.nn.functional.interpolate(chunk.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


def slice_foreground(volume: torch.Tensor, info: dict, fg_threshold: float = 0.05, chunk_size: int = 32) -> torch.Tensor:
    """Fraction of each canonical slice's voxels above ``min + fg_threshold * (max - min)`` of the volume.

    Args: volume: ``(C, X, Y, Z)``; info: from :func:`slice_info`; chunk_size: slabs at a time.
    Returns: float64 tensor ``(num_slices,)`` indexed by canonical slice index.
    """
    x = torch.as_tensor(volume)
    a = _numpy_or_none(x)
    lo, hi = (float(a.min()), float(a.max())) if a is not None else (float(x.min()), float(x.max()))
    thr = lo + fg_threshold * (hi - lo)
    dim, n = 1 + info["perm"][info["slice_dim"]], info["num_slices"]
    if a is None:
        counts = (x > thr).sum(dim=[d for d in range(4) if d != dim]).double().cpu()
    else:  # read memory in order: slice by slice if slices are contiguous, else slabs along the slowest axis
        big = max(range(4), key=lambda d: (a.shape[d] > 1, a.strides[d]))
        others = tuple(d for d in range(4) if d != dim)
        if big == dim:
            at = [slice(None)] * 4
            counts_np = np.zeros(n, dtype=np.int64)
            for i in range(n):
                at[dim] = i
                counts_np[i] = np.count_nonzero(a[tuple(at)] > thr)
        else:
            counts_np = np.zeros(n, dtype=np.int64)
            for start in range(0, a.shape[big], chunk_size):
                index = [slice(None)] * 4
                index[big] = slice(start, start + chunk_size)
                counts_np += (a[tuple(index)] > thr).sum(axis=others)
        counts = torch.from_numpy(counts_np).double()
    fractions = counts / (x.numel() / n)
    return fractions[torch.as_tensor([_source_index(info, k) for k in range(n)])]


def volume_to_slices(volume: Any, axis: str = "axial", *, orientation: str = "RAS",
                     spatial_size: Sequence[int] | None = None, mode: str = "bilinear",
                     min_foreground: float = 0.01, fg_threshold: float = 0.05, keep_all: bool = False,
                     indices: Sequence[int] | None = None, chunk_size: int = 32) -> tuple[torch.Tensor, list[int], dict]:
    """Cut a volume into canonical 2D slices (see :func:`slice_info` for the geometry).

    Foreground rule: a voxel is foreground when it exceeds ``min + fg_threshold * (max - min)``
    of the whole volume (on a volume scaled to [0, 1]: > 0.05); a slice is kept when at least
    ``min_foreground`` (1 %) of its voxels are foreground. A constant volume keeps no slice.
    Memory: the output stack plus one chunk of ``chunk_size`` slices; the volume is never copied.

    Args:
        volume: ``MetaTensor`` ``(C, X, Y, Z)`` with its affine.
        axis, orientation: see :func:`slice_info`.
        spatial_size: resize every slice to ``(H, W)`` (``None``: keep ``(h, w)``).
        mode: "bilinear" (images; float32 output, antialiased when shrinking) or "nearest"
            (labels; keeps the dtype).
        min_foreground, fg_threshold: the background rule above.
        keep_all: keep every slice.
        indices: take exactly these canonical slice indices (e.g. a label's, from its image).
        chunk_size: slices processed at a time.

    Returns:
        ``(slices (N, C, H, W), indices (N canonical slice indices), info)``.
    """
    vol = _as_meta(volume)
    info = slice_info(vol, axis, orientation, spatial_size)
    x, n = vol.as_tensor(), info["num_slices"]
    if indices is not None:
        kept = [int(k) for k in indices]
        if any(k < 0 or k >= n for k in kept):
            raise input_error(vol.meta.get("filename_or_obj"), f"slice indices must lie in [0, {n}), got {kept}")
    elif keep_all:
        kept = list(range(n))
    else:
        fractions = slice_foreground(x, info, fg_threshold, chunk_size)
        kept = [k for k in range(n) if float(fractions[k]) >= min_foreground]
    size = info["spatial_size"] or info["slice_shape"]
    out = torch.empty((len(kept), x.shape[0], *size), device=x.device,
                      dtype=x.dtype if mode == "nearest" else torch.float32)
    a = _numpy_or_none(x)
    view = _canonical_numpy(a, info) if a is not None else _canonical_view(x, info)
    dim, flips = 1 + info["slice_dim"], _plane_flips(info)
    for start in range(0, len(kept), chunk_size):
        ks = kept[start:start + chunk_size]
        if a is not None and tuple(size) == tuple(info["slice_shape"]):
            out.numpy()[start:start + len(ks)] = view[_rows(ks)]
            continue
        if a is not None:
            chunk = torch.from_numpy(np.ascontiguousarray(view[_rows(ks)]))
        else:
            src = torch.as_tensor([_source_index(info, k) for k in ks], device=x.device)
            chunk = view.index_select(dim, src).movedim(dim, 0)  # (B, C, h, w)
            chunk = chunk.flip(flips) if flips else chunk
        out[start:start + len(ks)] = _resize(chunk, size, mode)
    return out, kept, info


def slices_to_volume(slice_maps: Any, indices: Sequence[int], info: dict, mode: str = "bilinear",
                     fill: float = 0.0, chunk_size: int = 32) -> MetaTensor:
    """Put per-slice 2D maps back on the original volume grid (the inverse of :func:`volume_to_slices`).

    Undoes the resize (to the native ``(h, w)``), puts slice ``indices[i]`` in place (slices not
    given are ``fill``), undoes the reorientation. Memory: the output volume plus one chunk; the
    output's memory order has the slice axis slowest (its strides may not be C-contiguous).

    Args:
        slice_maps: ``(N, C, H, W)`` (or ``(N, H, W)``) maps, in any size.
        indices: their canonical slice indices, as :func:`volume_to_slices` returned them.
        info: the ``info`` from :func:`volume_to_slices` / :func:`slice_info`.
        mode: "bilinear" (maps) or "nearest" (labels) for undoing the resize.
        fill: value of the slices not given.

    Returns:
        ``MetaTensor`` ``(C, X, Y, Z)`` with the original affine and metadata.
    """
    maps = slice_maps.as_tensor() if isinstance(slice_maps, MetaTensor) else torch.as_tensor(slice_maps)
    maps = maps[:, None] if maps.ndim == 3 else maps
    indices = [int(k) for k in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
    n = info["num_slices"]
    if maps.ndim != 4 or maps.shape[0] != len(indices):
        raise input_error(None, f"slice maps must be (N, C, H, W) with N = len(indices) = {len(indices)}, "
                                f"got {tuple(maps.shape)}")
    if any(k < 0 or k >= n for k in indices) or len(set(indices)) != len(indices):
        raise input_error(None, f"slice indices must be distinct and lie in [0, {n}), got {indices}")
    dtype = maps.dtype if (mode == "nearest" or maps.is_floating_point()) else torch.float32
    order = [info["perm"][info["slice_dim"]]] + [info["perm"][d] for d in info["plane_dims"]]  # slowest first
    shape = info["spatial_shape"]
    buf = torch.full((maps.shape[1], *(shape[p] for p in order)), fill, dtype=dtype, device=maps.device)
    out = buf.permute(0, *(1 + order.index(i) for i in range(3)))  # (C, X, Y, Z)
    a = _numpy_or_none(out)
    view = _canonical_numpy(a, info) if a is not None else _canonical_view(out, info)
    dim, flips = 1 + info["slice_dim"], _plane_flips(info)
    for start in range(0, len(indices), chunk_size):
        ks = indices[start:start + chunk_size]
        chunk = _resize(maps[start:start + len(ks)], info["slice_shape"], mode).to(dtype)
        if a is not None:
            view[_rows(ks)] = chunk.detach().cpu().numpy()
            continue
        chunk = chunk.flip(flips) if flips else chunk
        for j, k in enumerate(ks):
            view.select(dim, _source_index(info, k)).copy_(chunk[j])
    meta = {k: v for k, v in info["meta"].items() if k != "intensity_normalisation"}  # the maps are not intensities
    return MetaTensor(out, affine=torch.as_tensor(info["affine"]), meta=meta)


def _info_from_slice(item: Any) -> tuple[int, dict] | None:
    """``(slice_index, info)`` recorded by :class:`VolumeToSlices` on a slice ``MetaTensor``."""
    for op in reversed(getattr(item, "applied_operations", []) or []):
        if op.get("class") == "VolumeToSlices":
            extra = op.get("extra_info", {})
            return int(extra["slice_index"]), extra["slice_info"]
    return None


class VolumeToSlices(InvertibleTransform):
    """``(C, X, Y, Z)`` volume -> list of ``MetaTensor`` slices ``(C, H, W)``: see :func:`volume_to_slices`.

    Each slice's metadata has ``slice_index`` (canonical index along the axis), ``slice_axis``
    and ``num_slices``, plus the volume's metadata (entries that are ``None`` dropped so a
    DataLoader can collate them); its affine maps ``(row, col, 0)`` to world RAS (see
    :func:`slice_affine`); the geometry for the inverse is pushed on ``applied_operations``.
    :meth:`inverse` takes the list back (maps derived from the slices may replace them as long as
    they keep the slices' ``applied_operations``).
    """

    def __init__(self, axis: str = "axial", orientation: str = "RAS", spatial_size: Sequence[int] | None = None,
                 mode: str = "bilinear", min_foreground: float = 0.01, fg_threshold: float = 0.05,
                 keep_all: bool = False, chunk_size: int = 32) -> None:
        self.axis, self.orientation, self.spatial_size, self.mode = axis, orientation, spatial_size, mode
        self.min_foreground, self.fg_threshold = min_foreground, fg_threshold
        self.keep_all, self.chunk_size = keep_all, chunk_size

    def slices(self, img: Any, indices: Sequence[int] | None = None, mode: str | None = None):
        """The function form: ``(slices (N, C, H, W), indices, info)``."""
        return volume_to_slices(img, self.axis, orientation=self.orientation, spatial_size=self.spatial_size,
                                mode=mode or self.mode, min_foreground=self.min_foreground, fg_threshold=self.fg_threshold,
                                keep_all=self.keep_all, indices=indices, chunk_size=self.chunk_size)

    def __call__(self, img: Any, indices: Sequence[int] | None = None, mode: str | None = None) -> list[MetaTensor]:
        """Args: img: ``(C, X, Y, Z)``. indices: take these slices instead of the foreground rule.
        Returns: list of ``MetaTensor`` ``(C, H, W)``."""
        img = _as_meta(img)
        stack, kept, info = self.slices(img, indices, mode)
        base = {k: v for k, v in info["meta"].items() if v is not None}
        out = []
        for j, k in enumerate(kept):
            meta = dict(base, slice_index=k, slice_axis=info["axis"], num_slices=info["num_slices"])
            item = MetaTensor(stack[j], affine=torch.as_tensor(slice_affine(info, k)), meta=meta,
                              applied_operations=list(img.applied_operations))
            self.push_transform(item, orig_size=info["spatial_shape"], extra_info={"slice_index": k, "slice_info": info})
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
        vol = slices_to_volume(maps, [int(op["slice_index"]) for op in ops], ops[0]["slice_info"], mode or self.mode)
        vol.applied_operations = list(items[0].applied_operations)
        return vol


class SlicesToVolume(Transform):
    """Per-slice 2D maps -> a volume on the original grid: see :func:`slices_to_volume`.

    Call with either the list of slice ``MetaTensor`` s from :class:`VolumeToSlices` (or maps that
    kept their metadata): indices and geometry are read from them; or with a tensor
    ``(N, C, H, W)``, its ``indices`` and a ``reference``: the ``info`` dict from
    :func:`volume_to_slices`, or the original volume ``MetaTensor`` (then ``axis`` and
    ``orientation`` must be the ones used for slicing).

    Args:
        axis, orientation: slicing geometry when ``reference`` is a volume.
        mode: "bilinear" (maps) or "nearest" (labels) for undoing a resize.
        fill: value of slices that were not given (skipped background).
    """

    def __init__(self, axis: str = "axial", orientation: str = "RAS", mode: str = "bilinear", fill: float = 0.0) -> None:
        self.axis, self.orientation, self.mode, self.fill = axis, orientation, mode, fill

    def __call__(self, slice_maps: Any, indices: Sequence[int] | None = None, reference: Any = None) -> MetaTensor:
        """Returns: ``MetaTensor`` ``(C, X, Y, Z)`` with the original shape and affine."""
        if isinstance(slice_maps, (list, tuple)):
            recorded = [_info_from_slice(m) for m in slice_maps]
            if indices is None:
                indices = [int(m.meta["slice_index"]) if r is None else r[0] for m, r in zip(slice_maps, recorded)]
            if reference is None and recorded and recorded[0] is not None:
                reference = recorded[0][1]
            if not slice_maps:
                raise input_error(None, "no slices to put back into a volume")
            slice_maps = torch.stack([torch.as_tensor(m) for m in slice_maps])
        if indices is None or reference is None:
            raise input_error(None, "SlicesToVolume needs the slice indices and a reference "
                                    "(the slicing info or the original volume)")
        info = reference if isinstance(reference, dict) else slice_info(_as_meta(reference), self.axis, self.orientation)
        return slices_to_volume(slice_maps, indices, info, self.mode, self.fill)
