"""Where a volume's 2D slices lie: the record that maps a volume to canonical slices and back.

:func:`slice_geometry` reads it from a volume's affine (no voxels); :class:`SliceGeometry` is what
:func:`~monai_multiad.transforms.volume.volume_to_slices` returns, what
:class:`~monai_multiad.transforms.volume.VolumeToSlices` records on every slice and what
:func:`~monai_multiad.transforms.volume.slices_to_volume` needs to put maps back on the volume's grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from monai.data import MetaTensor

from monai_multiad.errors import input_error
from monai_multiad.transforms.loading import check_affine

__all__ = ["SLICE_AXES", "SliceGeometry", "slice_affine", "slice_geometry"]

#: slicing planes and the RAS world axis normal to each
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class SliceGeometry:
    """How a volume ``(C, X, Y, Z)`` is cut into canonical 2D slices along one axis (see :func:`slice_geometry`).

    The volume is viewed in canonical order: its array axes permuted and flipped, never resampled,
    so that they run along ``orientation``. Canonical axis ``m`` is array axis ``perm[m]``, reversed
    where ``flip[m]``. Slice ``k`` is canonical index ``k`` along ``slice_dim``; its rows and columns
    are the canonical axes ``plane_dims``. Immutable (the matrices are read-only arrays); equal only
    to itself.

    Attributes:
        axis: the plane of the slices: "axial", "coronal" or "sagittal".
        orientation: the canonical axis codes (nibabel's, e.g. "RAS").
        perm: ``(3,)`` the array axis of each canonical axis.
        flip: ``(3,)`` whether each canonical axis runs against its array axis.
        slice_dim: the canonical axis the slices are stacked along.
        plane_dims: the two other canonical axes: a slice's rows, then its columns.
        spatial_shape: ``(X, Y, Z)``, the volume's array shape without channels.
        num_slices: how many slices there are (the length of ``slice_dim``).
        slice_shape: ``(h, w)`` of a slice as cut, before any resize.
        spatial_size: ``(H, W)`` the slices are resized to, or ``None`` for ``slice_shape``.
        affine: the volume's 4x4 voxel-to-world (RAS) matrix.
        canonical_affine: the 4x4 matrix from canonical voxel indices to world RAS.
        meta: the volume's metadata without ``affine``: what the reassembled volume carries.
    """

    axis: str
    orientation: str
    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    slice_dim: int
    plane_dims: tuple[int, int]
    spatial_shape: tuple[int, int, int]
    num_slices: int
    slice_shape: tuple[int, int]
    spatial_size: tuple[int, int] | None
    affine: np.ndarray
    canonical_affine: np.ndarray
    meta: dict = field(repr=False)

    @property
    def output_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the slices as given out: ``spatial_size``, else ``slice_shape``."""
        return self.spatial_size or self.slice_shape

    @property
    def array_axis(self) -> int:
        """The volume's array axis (0, 1 or 2, channels not counted) the slices are stacked along."""
        return self.perm[self.slice_dim]

    @property
    def array_axis_flipped(self) -> bool:
        """Whether slice index ``k`` counts against that array axis."""
        return self.flip[self.slice_dim]

    def array_index(self, k: int) -> int:
        """The index along :attr:`array_axis` of canonical slice ``k``."""
        return self.num_slices - 1 - k if self.array_axis_flipped else k


def slice_geometry(volume: MetaTensor, axis: str = "axial", orientation: str = "RAS",
                   spatial_size: Sequence[int] | None = None) -> SliceGeometry:
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
    """
    import nibabel.orientations as nio

    path = volume.meta.get("filename_or_obj") if isinstance(volume, MetaTensor) else None
    if axis not in SLICE_AXES:
        raise input_error(path, f"unknown slice axis {axis!r}; expected one of {sorted(SLICE_AXES)}")
    codes = tuple(str(orientation).upper())
    try:
        target = nio.axcodes2ornt(codes)
    except Exception:  # noqa: BLE001
        target = np.zeros((0, 2))
    if len(codes) != 3 or sorted(target[:, 0].tolist()) != [0, 1, 2]:
        raise input_error(path, f"bad orientation {orientation!r}; expected 3 axis codes like 'RAS' or 'LPS'")
    if volume.ndim != 4:
        raise input_error(path, f"expected a volume (C, X, Y, Z), got shape {tuple(volume.shape)}")
    affine = check_affine(path, volume.affine.detach().cpu().numpy().astype(np.float64))  # a copy
    src = nio.io_orientation(affine)
    perm = tuple(int(np.flatnonzero(src[:, 0] == w)[0]) for w in target[:, 0])
    flip = tuple(bool(src[p, 1] != s) for p, s in zip(perm, target[:, 1]))
    shape = tuple(int(s) for s in volume.shape[1:])
    to_input = np.eye(4)  # canonical voxel -> input voxel
    to_input[:3, :3] = 0
    for m, (p, f) in enumerate(zip(perm, flip)):
        to_input[p, m] = -1.0 if f else 1.0
        to_input[p, 3] = shape[p] - 1 if f else 0
    sdim = int(np.flatnonzero(target[:, 0] == SLICE_AXES[axis])[0])
    plane = tuple(d for d in range(3) if d != sdim)
    cshape = [shape[p] for p in perm]
    return SliceGeometry(
        axis=axis, orientation="".join(codes), perm=perm, flip=flip, slice_dim=sdim, plane_dims=plane,
        spatial_shape=shape, num_slices=cshape[sdim], slice_shape=(cshape[plane[0]], cshape[plane[1]]),
        spatial_size=None if spatial_size is None else tuple(int(s) for s in spatial_size),
        affine=_read_only(affine), canonical_affine=_read_only(affine @ to_input),
        meta={k: v for k, v in getattr(volume, "meta", {}).items() if k != "affine"})


def slice_affine(geometry: SliceGeometry, index: int) -> np.ndarray:
    """4x4 matrix mapping ``(row, col, 0)`` of output slice ``index`` (after any resize) to world RAS."""
    h, w = geometry.slice_shape
    big_h, big_w = geometry.output_shape
    a, b = geometry.plane_dims
    scale = np.zeros((4, 4))
    scale[3, 3] = 1.0
    scale[a, 0], scale[a, 3] = h / big_h, 0.5 * h / big_h - 0.5
    scale[b, 1], scale[b, 3] = w / big_w, 0.5 * w / big_w - 0.5
    scale[geometry.slice_dim, 2], scale[geometry.slice_dim, 3] = 1.0, float(index)
    return geometry.canonical_affine @ scale

