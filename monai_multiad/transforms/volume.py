"""Medical volumes for a 2D model: load, scale intensities by modality, cut into slices and back.

Volumes are ``MetaTensor`` ``(C, X, Y, Z)`` (``C = 1`` from :class:`LoadVolume`) with a 4x4
voxel-to-world ``affine`` in RAS (MONAI's convention); slices are ``(N, C, H, W)``.
Dictionary forms are in :mod:`monai_multiad.transforms.volume_dict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, Transform

from monai_multiad.errors import input_error

__all__ = [
    "CT_WINDOWS", "LoadVolume", "ScaleIntensityByModality", "VolumeToSlices", "SlicesToVolume",
    "load_volume", "scale_intensity", "volume_to_slices", "slices_to_volume", "slice_info", "slice_affine",
    "slice_foreground",
]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_EXPECTED = "expected a .nii/.nii.gz file, a DICOM file or a folder holding one DICOM series"

# CT display windows as (level, width) in Hounsfield units; the window maps
# [level - width / 2, level + width / 2] linearly onto [0, 1]. Values are the standard ones
# listed by Radiopaedia, "Windowing (CT)" (head and neck, chest, abdomen, spine sections).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "temporal_bone": (600.0, 2800.0),
    "soft_tissue": (40.0, 400.0),  # head and neck soft tissues (W 350-400, L 20-60)
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (50.0, 400.0),  # abdominal soft tissues
    "liver": (30.0, 150.0),
    "bone": (400.0, 1800.0),
}


# ----------------------------------------------------------------------------- loading
def _check_shape(path, shape: Sequence[int], allow_single_slice: bool) -> tuple[int, ...]:
    """Spatial shape of a readable volume, or an error for 2D / 4D data."""
    shape = tuple(int(s) for s in shape)
    if any(s > 1 for s in shape[3:]):
        raise input_error(path, f"4D data (shape {shape}); expected one 3D volume: extract one time point or channel first")
    spatial = shape[:3]
    if len(spatial) < 3:
        raise input_error(path, f"2D image (shape {shape}, ndim {len(shape)}); "
                                "expected a 3D volume (X, Y, Z) with several slices")
    if sum(s > 1 for s in spatial) < 3 and not allow_single_slice:
        raise input_error(path, f"2D image: a single slice (shape {spatial}); expected a 3D volume with several slices")
    return spatial


def _check_affine(path, affine) -> np.ndarray:
    aff = np.asarray(affine, dtype=float)
    lin = aff[:3, :3]
    norms = np.linalg.norm(lin, axis=0)
    det = float(np.linalg.det(lin)) if np.all(np.isfinite(lin)) else float("nan")
    if not np.isfinite(det) or norms.min() < 1e-8 or abs(det) < 1e-6 * float(np.prod(norms)):
        raise input_error(path, f"singular affine (determinant {det:.3g}): the voxel-to-world matrix must be "
                                f"invertible; got {lin.round(4).tolist()}")
    return aff


def _meta(path, shape, affine, modality, fmt, **extra) -> dict:
    meta = {"filename_or_obj": str(path), "spatial_shape": np.asarray(shape), "original_affine": affine.copy(),
            "space": "RAS", "original_channel_dim": "no_channel", "modality": modality, "format": fmt}
    meta.update(extra)
    return meta


def _load_nifti(path: Path, dtype) -> MetaTensor:
    """NIfTI with nibabel, as MONAI's ``NibabelReader`` does (same voxels, affine and header metadata),
    but keeping the file's memory order (x fastest): slices along z are then contiguous blocks."""
    import nibabel as nib

    try:
        img = nib.load(str(path), mmap=False)
    except Exception as e:  # noqa: BLE001 - any nibabel failure is a bad file
        raise input_error(path, f"cannot read as NIfTI ({type(e).__name__}: {e})") from None
    shape = _check_shape(path, img.shape, allow_single_slice=False)
    affine = _check_affine(path, img.affine)
    try:
        arr = np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001
        raise input_error(path, f"cannot read the voxel data ({type(e).__name__}: {e})") from None
    arr = arr[(Ellipsis,) + (0,) * (arr.ndim - 3)].astype(dtype, copy=False)  # drop trailing size-1 dims
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        n_nan = int(np.isnan(arr).sum())
        raise input_error(path, f"{n_nan} NaN and {int((~np.isfinite(arr)).sum()) - n_nan} infinite voxel values "
                                f"(of {arr.size}); replace them (e.g. numpy.nan_to_num) before use")
    meta = {k: np.asarray(v) for k, v in img.header.items() if np.asarray(v).dtype.kind in "biuf"}  # as MONAI: numbers only
    meta.update(_meta(path, shape, affine, None, "nifti"))
    return MetaTensor(torch.from_numpy(arr[None]), affine=torch.as_tensor(affine), meta=meta)


def _sitk_to_volume(path, image, dtype, allow_single_slice, modality, fmt, **extra) -> MetaTensor:
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() > 1:
        raise input_error(path, f"{image.GetNumberOfComponentsPerPixel()}-component pixels (colour or vector image); "
                                "expected one grey value per voxel")
    size = tuple(image.GetSize())
    _check_shape(path, size, allow_single_slice)
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection(), float).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    affine = _check_affine(path, _LPS_TO_RAS @ lps)
    view = sitk.GetArrayViewFromImage(image)
    view = view.reshape(view.shape[-3:])  # size-1 leading (4th+) dimensions were checked above
    arr = view.transpose(2, 1, 0).astype(dtype)  # (z, y, x) -> (x, y, z), keeping x fastest in memory
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise input_error(path, f"{int(np.isnan(arr).sum())} NaN or infinite voxel values; replace them before use")
    meta = _meta(path, arr.shape, affine, modality, fmt, **extra)
    return MetaTensor(torch.from_numpy(arr[None]), affine=torch.as_tensor(affine), meta=meta)


def _is_dicom(p: Path) -> bool:
    from pydicom.misc import is_dicom

    try:
        return is_dicom(p)
    except OSError:
        return False


def _series_summary(groups: dict) -> str:
    parts = []
    for uid, hs in groups.items():
        h = hs[0]
        parts.append(f"{uid or '<no SeriesInstanceUID>'} '{h.get('SeriesDescription', '')}' "
                     f"({h.get('Modality', '?')}, {len(hs)} files)")
    return "; ".join(parts)


def _order_series(path: Path, headers: list) -> list:
    """Sort a series' slices along its normal and check for gaps and uneven spacing."""
    problems: list[str] = []
    nums = [h.get("InstanceNumber") for h in headers]
    if len(headers) > 1 and all(n is not None for n in nums):
        s = np.sort(np.asarray([int(n) for n in nums]))
        for a, b in zip(s[:-1], s[1:]):
            if b == a:
                problems.append(f"several images share InstanceNumber {a} (4D or multi-echo series?)")
            elif b > a + 1:
                problems.append(f"missing slices: InstanceNumber jumps from {a} to {b} ({b - a - 1} missing)")
    try:
        iop = np.asarray([[float(v) for v in h.ImageOrientationPatient] for h in headers])
        ipp = np.asarray([[float(v) for v in h.ImagePositionPatient] for h in headers])
    except (AttributeError, TypeError, ValueError):
        if len(headers) == 1:
            return headers
        raise input_error(path, "DICOM slices lack ImagePositionPatient / ImageOrientationPatient: "
                                "cannot order the slices") from None
    normal = np.cross(iop[0, :3], iop[0, 3:])
    if np.linalg.norm(normal) < 1e-3:
        raise input_error(path, f"singular affine: ImageOrientationPatient {iop[0].tolist()} has parallel or zero "
                                "row/column directions")
    if len(headers) == 1:
        return headers
    if np.abs(iop - iop[0]).max() > 1e-3:
        raise input_error(path, "slices have different ImageOrientationPatient; expected one 3D volume")
    if len({(int(h.Rows), int(h.Columns)) for h in headers}) > 1:
        raise input_error(path, "slices have different sizes (Rows x Columns); expected one 3D volume")
    pos = ipp @ (normal / np.linalg.norm(normal))
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    gaps = np.diff(pos)
    if (gaps < 1e-3).any():
        problems.append(f"4D data: {int((gaps < 1e-3).sum()) + 1} images share a slice position "
                        "(several time points or echoes?); expected one 3D volume")
    elif len(gaps):
        step = float(np.median(gaps))
        tol = max(0.01 * step, 1e-3)
        for a, b, g in zip(pos[:-1], pos[1:], gaps):
            k = int(round(g / step))
            if k >= 2 and abs(g - k * step) <= tol * k:
                problems.append(f"missing slices: gap in slice positions between {a:.3f} and {b:.3f} mm "
                                f"({k - 1} slice(s) missing at spacing {step:.4g} mm)")
            elif abs(g - step) > tol:
                problems.append(f"inconsistent spacing between slices: {g:.4g} mm between positions {a:.3f} and {b:.3f}, "
                                f"elsewhere {step:.4g} mm")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems) - 4} more)" if len(problems) > 4 else "")
        raise input_error(path, shown)
    return [headers[i] for i in order]


def _load_dicom(path: Path, files: list[Path], series_uid: str | None, dtype) -> MetaTensor:
    import pydicom
    import SimpleITK as sitk

    headers = []
    for f in files:
        try:
            h = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as e:  # noqa: BLE001
            raise input_error(f, f"unreadable DICOM file ({type(e).__name__}: {e})") from None
        if "Rows" in h and "Columns" in h:  # skip DICOMDIR, reports and other non-image objects
            h.filename = str(f)
            headers.append(h)
    if not headers:
        raise input_error(path, f"no DICOM images (only {len(files)} non-image DICOM objects); {_EXPECTED}")
    groups: dict[str, list] = {}
    for h in headers:
        groups.setdefault(str(h.get("SeriesInstanceUID", "")), []).append(h)
    if series_uid is not None:
        if series_uid not in groups:
            raise input_error(path, f"series_uid {series_uid!r} not found; series here: {_series_summary(groups)}")
        chosen = groups[series_uid]
    elif len(groups) > 1:
        raise input_error(path, f"several DICOM series ({len(groups)}): {_series_summary(groups)}; "
                                "pass series_uid= to choose one")
    else:
        chosen = next(iter(groups.values()))
    ordered = _order_series(path, chosen)
    first = ordered[0]
    try:
        if len(ordered) == 1:
            image = sitk.ReadImage(first.filename)
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames([h.filename for h in ordered])
            image = reader.Execute()
    except RuntimeError as e:
        raise input_error(path, f"SimpleITK cannot read the DICOM pixel data ({str(e).strip().splitlines()[-1]})") from None
    if int(first.get("NumberOfFrames", 1) or 1) > 1 and len(ordered) > 1:
        raise input_error(path, "a series of multi-frame DICOM files (4D data?); expected one 3D volume")
    return _sitk_to_volume(path, image, dtype, allow_single_slice=True, modality=first.get("Modality"), fmt="dicom",
                           series_uid=str(first.get("SeriesInstanceUID", "")),
                           series_description=str(first.get("SeriesDescription", "")))


def load_volume(path: str | Path, series_uid: str | None = None, dtype=np.float32) -> MetaTensor:
    """Read a volume: see :class:`LoadVolume`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise input_error(path, f"no such file or folder; {_EXPECTED}")
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise input_error(path, f"empty folder; {_EXPECTED}")
        dicoms = [f for f in files if _is_dicom(f)]
        if not dicoms:
            names = ", ".join(f.name for f in files[:3])
            raise input_error(path, f"no DICOM files in this folder ({len(files)} other files: {names}...); {_EXPECTED}")
        return _load_dicom(path, dicoms, series_uid, dtype)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return _load_nifti(path, dtype)
    if _is_dicom(path):
        return _load_dicom(path, [path], series_uid, dtype)
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise input_error(path, f"unreadable file format; {_EXPECTED}") from None
    return _sitk_to_volume(path, image, dtype, allow_single_slice=False, modality=None,
                           fmt=path.suffix.lstrip(".").lower())


class LoadVolume(Transform):
    """Load a 3D medical volume as a ``MetaTensor`` ``(1, X, Y, Z)`` with a RAS affine.

    NIfTI (``.nii``/``.nii.gz``) is read with nibabel exactly as MONAI's ``LoadImage`` with
    ``NibabelReader`` reads it (same voxels, affine and numeric header entries; a test checks this)
    but keeping the file's memory order (x fastest), so that axial slices are contiguous blocks;
    a DICOM series folder (or a single DICOM file) through SimpleITK, slices ordered by their
    position along the slice normal, rescale slope/intercept applied (CT in HU), the LPS
    geometry converted to RAS as MONAI's ``ITKReader`` does. Other files SimpleITK reads
    (``.mha``, ``.nrrd``) are accepted too.

    Metadata: ``filename_or_obj``, ``spatial_shape`` ``(X, Y, Z)``, ``original_affine``, ``space``
    ("RAS"), ``modality`` (DICOM Modality, ``None`` for NIfTI), ``format``; for DICOM also
    ``series_uid`` and ``series_description``.

    Errors (:class:`~monai_multiad.errors.MultiADInputError` "<path>: <problem>"): missing path;
    empty folder or no DICOM in it; several series (lists them; choose with ``series_uid``);
    2D image or a single slice (allowed only for a single-file DICOM, read as ``Z = 1``);
    4D data; DICOM with missing slices (InstanceNumber or position gaps), inconsistent slice
    spacing or mixed orientations; NaN/infinite values; a singular affine.

    Args:
        series_uid: SeriesInstanceUID to read from a folder holding several series.
        dtype: output dtype (float32).
    """

    def __init__(self, series_uid: str | None = None, dtype=np.float32) -> None:
        self.series_uid = series_uid
        self.dtype = dtype

    def __call__(self, path: str | Path, series_uid: str | None = None) -> MetaTensor:
        """Args: path: file or folder. series_uid: overrides the constructor's choice.
        Returns: ``MetaTensor`` ``(1, X, Y, Z)``."""
        return load_volume(path, series_uid if series_uid is not None else self.series_uid, self.dtype)


# ----------------------------------------------------------------------------- intensities
def _as_meta(img: Any) -> MetaTensor:
    if isinstance(img, MetaTensor):
        return img
    return MetaTensor(torch.as_tensor(np.asarray(img) if not isinstance(img, torch.Tensor) else img))


def scale_intensity(img: Any, mode: str = "mri", lower: float = 0.5, upper: float = 99.5,
                    window: Sequence[float] | None = None, preset: str | None = None) -> MetaTensor:
    """Scale a volume to float32 ``[0, 1]``: see :class:`ScaleIntensityByModality`."""
    img = _as_meta(img)
    x = img.as_tensor()
    mode = str(mode).lower()
    if mode == "ct":
        named = preset if window is None else None
        if window is None:
            if preset is None or preset not in CT_WINDOWS:
                raise input_error(None, f"mode='ct' needs window=(level, width) or preset= one of "
                                        f"{sorted(CT_WINDOWS)}; got preset={preset!r}")
            window = CT_WINDOWS[preset]
        level, width = float(window[0]), float(window[1])
        if width <= 0:
            raise input_error(None, f"CT window width must be > 0, got {width}")
        lo, hi = level - width / 2.0, level + width / 2.0
        name = f"ct window {named + ' ' if named else ''}(level {level:g}, width {width:g})"
    elif mode == "mri":
        if not 0.0 <= lower < upper <= 100.0:
            raise input_error(None, f"percentiles must satisfy 0 <= lower < upper <= 100, got ({lower}, {upper})")
        flat = np.ravel(x.detach().cpu().numpy(), order="K")  # memory order: a view, read sequentially
        fg = flat[flat != 0]
        if fg.size:
            lo, hi = (float(v) for v in np.percentile(fg, [lower, upper], overwrite_input=True))
        else:
            lo = hi = 0.0
        del fg
        name = f"mri percentiles {lower:g}-{upper:g} of non-zero voxels ({lo:.6g}, {hi:.6g})"
    elif mode == "minmax":
        lo, hi = float(x.min()), float(x.max())
        name = f"minmax ({lo:.6g}, {hi:.6g})"
    else:
        raise input_error(None, f"unknown intensity mode {mode!r}; expected 'mri', 'ct' or 'minmax'")
    if hi > lo:
        out = (x.float() - lo).div_(hi - lo).clamp_(0.0, 1.0)
    elif mode == "mri":  # constant foreground: keep it visible
        out = (x != 0).float()
    else:
        out = torch.zeros_like(x, dtype=torch.float32)
    meta = {k: v for k, v in img.meta.items() if k != "affine"}
    meta["intensity_normalisation"] = name
    return MetaTensor(out, affine=img.affine, meta=meta, applied_operations=list(img.applied_operations))


class ScaleIntensityByModality(Transform):
    """Map a volume's intensities to float32 ``[0, 1]`` (clipped) by modality.

    - ``"mri"``: the ``lower``/``upper`` percentiles (default 0.5, 99.5) of the volume's non-zero
      (foreground) voxels map to 0 / 1. A volume whose foreground is constant gives 1 on it.
    - ``"ct"``: a Hounsfield window ``window=(level, width)`` or ``preset`` from
      :data:`CT_WINDOWS`: ``level - width/2 -> 0``, ``level -> 0.5``, ``level + width/2 -> 1``.
    - ``"minmax"``: the volume's minimum and maximum map to 0 / 1 (a constant volume gives 0).

    The choice is recorded in ``meta["intensity_normalisation"]`` (e.g.
    ``"ct window liver (level 30, width 150)"``).

    Args:
        mode: "mri", "ct" or "minmax".
        lower, upper: percentiles for "mri".
        window: ``(level, width)`` in HU for "ct" (wins over ``preset``).
        preset: a name in :data:`CT_WINDOWS` for "ct".
    """

    def __init__(self, mode: str = "mri", lower: float = 0.5, upper: float = 99.5,
                 window: Sequence[float] | None = None, preset: str | None = None) -> None:
        self.mode, self.lower, self.upper, self.window, self.preset = mode, lower, upper, window, preset
        scale_intensity(torch.zeros(1, 2, 2, 2), mode, lower, upper, window, preset)  # validate options now

    def __call__(self, img: Any) -> MetaTensor:
        """Args: img: ``(C, X, Y, Z)`` (any shape works). Returns: float32 ``MetaTensor`` in ``[0, 1]``."""
        return scale_intensity(img, self.mode, self.lower, self.upper, self.window, self.preset)


# ----------------------------------------------------------------------------- slices
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
