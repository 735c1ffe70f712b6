"""Synthetic 3D volumes (a brain-like phantom) and writers for NIfTI files and DICOM series.

Used by the tests and the demo: nothing here is real anatomy. Arrays are indexed ``(X, Y, Z)``
as nibabel and MONAI's ``LoadImage`` give them; affines are 4x4 voxel-to-world in RAS (NIfTI's
convention); DICOM geometry (``spacing``, ``origin``, ``direction``) is SimpleITK's, in LPS.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["make_phantom_volume", "write_nifti", "write_dicom_series", "itk_geometry_from_affine", "rotation_matrix",
           "make_affine"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def rotation_matrix(axis: Sequence[float], degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about ``axis`` (Rodrigues): oblique test geometries."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def make_affine(linear: np.ndarray, origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 voxel-to-world affine from a 3x3 linear part (directions times spacing) and an origin."""
    a = np.eye(4)
    a[:3, :3], a[:3, 3] = linear, origin
    return a


def make_phantom_volume(
    shape: Sequence[int] = (64, 64, 32),
    lesion: bool = True,
    affine: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid "brain" with smooth texture and, optionally, a bright spherical "lesion".

    The shapes are defined in world (RAS, mm) coordinates through ``affine``, so the brain is
    longest along the anterior-posterior axis and the lesion sits right-anterior-superior of the
    centre whatever the array order, flips or spacing are.

    Args:
        shape: array shape ``(X, Y, Z)``.
        lesion: add the lesion (label 1 inside it); without it the label is all zeros.
        affine: 4x4 voxel-to-world (RAS) matrix; identity when ``None``.
        seed: seed of the texture noise.

    Returns:
        ``(image, label)``: image float32 ``(X, Y, Z)``, background 0, brain about 400 +- 60,
        lesion about 800 (MR-like arbitrary units, integers survive a DICOM int16 round trip
        to within rounding); label uint8 ``(X, Y, Z)``.
    """
    from scipy.ndimage import gaussian_filter

    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must have 3 entries (X, Y, Z), got {shape}")
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
    rng = np.random.default_rng(seed)
    lin = aff[:3, :3]
    centre = (np.asarray(shape, float) - 1.0) / 2.0
    half = 0.5 * np.abs(lin) @ (np.asarray(shape, float) - 1.0)  # half extent along R, A, S (mm)
    half = np.maximum(half, 1e-6)
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1) - centre[:, None].astype(np.float32)
    world = (lin.astype(np.float32) @ grid).reshape((3,) + shape)  # mm from the centre, RAS
    radii = half * np.array([0.7, 0.85, 0.7])
    brain = sum((world[i] / radii[i]) ** 2 for i in range(3)) <= 1.0
    texture = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=2.0)
    texture /= max(float(texture.std()), 1e-6)
    image = np.where(brain, 400.0 + 60.0 * texture, 0.0).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    if lesion:
        c = half * np.array([0.3, 0.2, 0.25])
        r = 0.18 * float(half.min()) if half.min() > 1e-3 else 0.18 * float(half.max())
        inside = sum((world[i] - c[i]) ** 2 for i in range(3)) <= r**2
        image[inside] = 800.0 + 20.0 * texture[inside]
        label[inside] = 1
    return image, label


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``array`` (``(X, Y, Z)`` or any nibabel shape) as NIfTI-1 with ``affine`` (RAS).

    Args:
        path: output file (``.nii`` or ``.nii.gz``); parent folders are created.
        array: voxel data, stored with its own dtype.
        affine: 4x4 voxel-to-world matrix; identity when ``None``. A singular one (which has no
            qform) is stored in the sform alone, so tests can make such bad files.

    Returns:
        The path written.
    """
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            img = nib.Nifti1Image(np.asarray(array), aff)
    except nib.spatialimages.HeaderDataError:  # singular: no qform; keep it in the sform (bad test files)
        img = nib.Nifti1Image(np.asarray(array), None)
        img.header.set_qform(None, code=0)
    img.header.set_sform(aff, code=2)
    nib.save(img, str(path))
    return path


def itk_geometry_from_affine(affine: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """``(spacing, origin, direction)`` in SimpleITK's LPS convention for a RAS ``affine``.

    ``direction`` is the flattened row-major 3x3 matrix SimpleITK's ``SetDirection`` takes.
    """
    lps = _LPS_TO_RAS @ np.asarray(affine, dtype=float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return tuple(spacing.tolist()), tuple(lps[:3, 3].tolist()), tuple(direction.ravel().tolist())


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) for ``value``."""
    for digits in range(12, 3, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.3g}"


def write_dicom_series(
    folder: str | Path,
    array: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
    modality: str = "MR",
    series_uid: str | None = None,
    series_description: str = "synthetic",
    frame_of_reference_uid: str | None = None,
) -> list[Path]:
    """Write ``array`` as a DICOM series, one ``.dcm`` file per slice (``IM0001.dcm`` ...).

    As SimpleITK's "DicomSeriesFromArray" example does: each slice carries the series UID
    (0020|000e), instance number (0020|0013, from 1), image position (0020|0032), orientation
    (0020|0037), pixel spacing (0028|0030), slice thickness and modality (0008|0060).
    Pixels are int16. For ``modality="CT"`` the array is in Hounsfield units and is stored as
    ``HU + 1024`` with RescaleIntercept -1024 / RescaleSlope 1 (as scanners do), so a reader
    that applies the rescale gets HU back. Values are rounded to integers.

    Args:
        folder: output folder (created).
        array: ``(X, Y, Z)`` voxels; slice ``z`` is ``array[:, :, z]``.
        spacing, origin, direction: SimpleITK geometry (LPS); see :func:`itk_geometry_from_affine`.
        modality: "MR" or "CT" (any DICOM modality code is written as given).
        series_uid: SeriesInstanceUID; a new one when ``None``.
        series_description: SeriesDescription (0008|103e).
        frame_of_reference_uid: FrameOfReferenceUID (0020|0052), which every scanner series carries and
            derived objects (a DICOM anomaly map) share; a new one when ``None``.

    Returns:
        The files written, in slice order.
    """
    import pydicom.uid
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"array must be 3D (X, Y, Z), got shape {arr.shape}")
    modality = str(modality).upper()
    intercept = -1024.0 if modality == "CT" else 0.0
    # GDCM applies the inverse of the rescale tags when writing: give it the values (HU for CT)
    stored = np.clip(np.rint(arr), -32768, 32767 + intercept).astype(np.int16)
    img = sitk.GetImageFromArray(np.ascontiguousarray(stored.transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in direction])
    d = img.GetDirection()
    series_uid = series_uid or pydicom.uid.generate_uid()
    study_uid = pydicom.uid.generate_uid()
    now_date, now_time = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    tags = [
        ("0008|0021", now_date),
        ("0008|0031", now_time),
        ("0008|0008", "DERIVED\\SECONDARY"),
        ("0008|0060", modality),
        ("0008|103e", series_description),
        ("0020|000d", study_uid),
        ("0020|000e", series_uid),
        ("0020|0052", frame_of_reference_uid or pydicom.uid.generate_uid()),
        ("0020|0037", "\\".join(_ds(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))),
        ("0028|0030", f"{_ds(float(spacing[1]))}\\{_ds(float(spacing[0]))}"),
        ("0018|0050", _ds(float(spacing[2]))),
    ]
    if modality == "CT":
        tags += [("0028|1052", _ds(intercept)), ("0028|1053", "1"), ("0028|1054", "HU")]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for z in range(stored.shape[2]):
        sl = img[:, :, z]
        for tag, value in tags:
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0008|0018", pydicom.uid.generate_uid())
        sl.SetMetaData("0020|0013", str(z + 1))
        sl.SetMetaData("0020|0032", "\\".join(_ds(v) for v in img.TransformIndexToPhysicalPoint((0, 0, z))))
        out = folder / f"IM{z + 1:04d}.dcm"
        writer.SetFileName(str(out))
        writer.Execute(sl)
        files.append(out)
    return files
