"""Loading a medical volume: a NIfTI file or a DICOM series folder -> ``MetaTensor`` (1, X, Y, Z)
with a RAS affine, or an error naming the file and the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Transform

from monai_multiad.errors import input_error

__all__ = ["LoadVolume", "load_volume"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_EXPECTED = "expected a .nii/.nii.gz file, a DICOM file or a folder holding one DICOM series"

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


def check_affine(path, affine) -> np.ndarray:
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
    affine = check_affine(path, img.affine)
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
    affine = check_affine(path, _LPS_TO_RAS @ lps)
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
