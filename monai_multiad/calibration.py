"""A decision threshold with a known false-positive rate, set on inputs known to be normal.

``multiad calibrate --run R NORMALS... --fpr 0.05`` scores normal scans (NIfTI files, DICOM series
folders: :func:`~monai_multiad.screening.screen_volume`) or normal 2D images
(:func:`~monai_multiad.inference.score_images`) and stores ``calibration.json`` in the run folder;
``screen`` and ``predict`` then flag with it and say so.

**The rule** (split-conformal): of ``n`` normal scores, the threshold is the ``k``-th smallest with
``k = ceil((n + 1) (1 - fpr))``; a score *above* it is flagged. At most ``n - k < n fpr`` of the
calibration normals exceed it, and a new normal exchangeable with them exceeds it with probability
at most ``(n + 1 - k) / (n + 1) <= fpr``. It needs ``k <= n``, that is ``n >= (1 - fpr) / fpr``
normals (19 for FPR 0.05, 9 for 0.1): fewer is an error (:func:`min_normals`).

**The interval**: a percentile bootstrap (``B = 2000`` resamples with replacement, seed 0) of the
whole procedure. Each resample sets its own threshold by the rule, and the fraction of the
calibration scores above that threshold is the FPR it achieves when the calibration set stands in
for the population of normals; the 2.5 and 97.5 percentiles (numpy's default interpolation) of
those fractions are the 95 % interval. (Holding the threshold fixed instead would only measure the
calibration set's own exceedances, at most ``fpr`` by construction: 0 for 19 normals at FPR 0.05.)
Slice scores are resampled by scan (every slice of a drawn scan together), because the slices of
one scan are not independent; the slice threshold's interval is therefore wider than a per-slice
bootstrap would say.

``calibration.json`` records the model file's SHA-256: a run trained again after calibrating falls
back to its uncalibrated threshold, and says why.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from monai_multiad.errors import MultiADInputError, input_error
from monai_multiad.inferers import CALIBRATION_FILE, DEFAULT_TOP_K, load_run, model_sha256

__all__ = ["min_normals", "threshold_rank", "threshold_at_fpr", "calibrate", "lesion_slices", "write_calibration"]

BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED, CONFIDENCE = 2000, 0, 0.95
_EPS = 1e-9  # (n + 1)(1 - fpr) is an integer more often than floating point says (20 * 0.95)


def _check_fpr(fpr: float) -> float:
    fpr = float(fpr)
    if not 0.0 < fpr < 1.0:
        raise MultiADInputError(f"--fpr must be between 0 and 1 (a false-positive rate such as 0.05), got {fpr:g}")
    return fpr


def threshold_rank(n: int, fpr: float) -> int:
    """``k = ceil((n + 1)(1 - fpr))``: the threshold is the k-th smallest of ``n`` normal scores."""
    return math.ceil((n + 1) * (1.0 - fpr) - _EPS)


def min_normals(fpr: float) -> int:
    """The fewest normals the rule needs at ``fpr``: ``k <= n`` holds from ``n = ceil((1 - fpr) / fpr)``."""
    return max(1, math.ceil((1.0 - _check_fpr(fpr)) / fpr - _EPS))


def _too_few(n: int, fpr: float, what: str) -> MultiADInputError:
    return MultiADInputError(f"{n} normal {what} cannot calibrate FPR {fpr:g}: at least {min_normals(fpr)} are "
                             f"needed (the threshold is the ceil((n+1)(1-fpr))-th smallest of n normal scores)")


def _kth(sorted_or_not: np.ndarray, k: int) -> float:
    return float(np.partition(sorted_or_not, k - 1)[k - 1])


def threshold_at_fpr(scores: Sequence[float], fpr: float, groups: Sequence[Any] | None = None,
                     n_boot: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED, what: str = "scans") -> dict:
    """The threshold of the rule above on ``scores`` (normals) and its bootstrap interval.

    Args:
        scores: normal scores (one per scan, slice or image).
        fpr: the false-positive rate wanted, in (0, 1).
        groups: optional group of each score (the scan of a slice): the bootstrap resamples groups.
        n_boot, seed: bootstrap resamples and the seed of ``numpy.random.default_rng``.
        what: the scores' unit in the too-few error ("scans", "slices", "images").

    Returns: ``threshold``, ``rank`` (k), ``n``, ``calibration_fpr`` (fraction of ``scores`` above the
    threshold), ``interval`` ([2.5, 97.5] percentiles of the bootstrap FPRs) and, with ``groups``,
    ``groups`` (how many).
    """
    fpr = _check_fpr(fpr)
    values = np.asarray(scores, dtype=np.float64).ravel()
    n = values.size
    if n < min_normals(fpr):
        raise _too_few(n, fpr, what)
    if not np.all(np.isfinite(values)):
        raise MultiADInputError(f"{int(np.sum(~np.isfinite(values)))} normal score(s) are not finite: the model "
                                "gives NaN or infinite scores; it cannot be calibrated")
    k = threshold_rank(n, fpr)
    threshold = _kth(values.copy(), k)
    ordered = np.sort(values)

    def above(t: np.ndarray) -> np.ndarray:  # fraction of the calibration scores above each threshold
        return (n - np.searchsorted(ordered, t, side="right")) / n

    rng = np.random.default_rng(seed)
    if groups is None:
        draws = rng.integers(0, n, size=(n_boot, n))
        boot = np.sort(values[draws], axis=1)[:, k - 1]
    else:
        labels = np.asarray(list(groups), dtype=object)
        if labels.size != n:
            raise ValueError(f"groups has {labels.size} entries for {n} scores")
        members = [np.flatnonzero(labels == g) for g in dict.fromkeys(labels.tolist())]
        draws = rng.integers(0, len(members), size=(n_boot, len(members)))
        boot = np.empty(n_boot)
        for b, row in enumerate(draws):
            resample = values[np.concatenate([members[g] for g in row])]
            boot[b] = _kth(resample, min(threshold_rank(resample.size, fpr), resample.size))
    lo, hi = np.percentile(above(boot), [50 * (1 - CONFIDENCE), 100 - 50 * (1 - CONFIDENCE)])
    out = {"threshold": threshold, "rank": k, "n": n, "calibration_fpr": float(above(np.array([threshold]))[0]),
           "interval": [float(lo), float(hi)]}
    if groups is not None:
        out["groups"] = len(members)
    return out



# ----------------------------------------------------------------------------- calibrating
def _split_inputs(inputs: Sequence[str | Path]) -> tuple[str, list[Path]]:
    """("volumes" | "images", the inputs expanded): NIfTI files, DICOM series folders and folders of NIfTI
    files (label volumes, ``*mask*``/``*label*``, left out) are volumes; image files and folders are images."""
    from monai_multiad.data.images import is_image, list_images
    from monai_multiad.data.volumes import LABEL_PATTERNS, holds_dicom, is_label, is_nifti

    volumes: list[Path] = []
    images: list[Path] = []
    for item in map(Path, inputs):
        if item.is_file():
            (volumes if is_nifti(item) or item.suffix.lower() == ".dcm" else images).append(item)
        elif item.is_dir():
            niftis = sorted(p for p in item.iterdir() if is_nifti(p) and not is_label(p.name, LABEL_PATTERNS))
            if niftis:
                volumes += niftis
            elif any(is_image(p) for p in item.iterdir()):
                images += list_images(item)
            elif holds_dicom(item):
                volumes.append(item)
            else:
                raise input_error(item, "holds no NIfTI volume, DICOM series or image to calibrate on")
        else:
            raise input_error(item, "no such file or folder")
    if volumes and images:
        raise MultiADInputError(f"the inputs mix volumes ({volumes[0]}) and 2D images ({images[0]}): calibrate on "
                                "one kind, the kind you will screen or predict on")
    found = volumes or images
    seen: dict[Path, Path] = {}
    for p in found:
        if p.resolve() in seen:
            raise input_error(p, f"given twice (also as {seen[p.resolve()]}): each normal must count once")
        seen[p.resolve()] = p
    return ("volumes" if volumes else "images"), found


def lesion_slices(label: str | Path, axis: str) -> set[int]:
    """Canonical indices of the slices where the label volume ``label`` is non-empty."""
    from monai_multiad.transforms.volume import labelled_slices, load_volume, slice_geometry

    lab = load_volume(label)
    return set(labelled_slices(lab.as_tensor(), slice_geometry(lab, axis)))


def calibrate(run_dir: str | Path, inputs: Sequence[str | Path], fpr: float, *, device: str = "auto",
              top_k: int = DEFAULT_TOP_K, modality: str | None = None, window: Any = None, batch_size: int = 32,
              labels: dict | None = None, level: str = "scan", progress: bool = False,
              n_boot: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """Score normal inputs with a run and return its calibration record (writes nothing:
    :func:`write_calibration` does).

    Volumes give a scan threshold (scan scores: the mean of the ``top_k`` highest slice scores) and a
    slice threshold (every screened slice); 2D images an image threshold. ``labels`` (volumes, from
    Python): scan path -> label volume; a scan whose label is non-empty is no normal scan, and only its
    slices outside the label calibrate the slice threshold. ``level="slice"`` calibrates the slice
    threshold only (scans with lesions somewhere, as in lgg_flair). Too few normals for ``fpr`` is a
    :class:`MultiADInputError`, raised before any scoring where the count is known.
    """
    from monai_multiad import __version__

    fpr = _check_fpr(fpr)
    if level not in ("scan", "slice"):
        raise ValueError(f"level must be 'scan' or 'slice', got {level!r}")
    kind, found = _split_inputs(inputs)
    labels = {Path(k).absolute(): v for k, v in (labels or {}).items()}
    unit = "scans" if kind == "volumes" else "images"
    if (kind == "images" or (level == "scan" and not labels)) and len(found) < min_normals(fpr):
        raise _too_few(len(found), fpr, unit)
    record: dict[str, Any] = {"fpr": fpr, "kind": kind,
                              "rule": "threshold = the k-th smallest of the n normal scores, k = ceil((n+1)(1-fpr)); "
                                      "a score above the threshold is flagged",
                              "bootstrap": {"samples": n_boot, "seed": seed, "confidence": CONFIDENCE,
                                            "method": "percentile bootstrap of the rule (slices resampled by scan)"}}
    if kind == "images":
        from monai_multiad.inference import score_images

        run = load_run(run_dir, device)
        cfg = run.config
        scores = []
        for r in score_images(run.model, cfg, found, run.device, images=False):
            if "error" in r:
                raise MultiADInputError(r["error"])
            scores.append(r["score"])
        record["image"] = threshold_at_fpr(scores, fpr, n_boot=n_boot, seed=seed, what="images")
        record.update(num_images=len(found), settings=run.image_settings())
    else:
        from tqdm.auto import tqdm

        from monai_multiad.screening import screen_volume

        run = load_run(run_dir, device)
        settings = run.settings(modality=modality, window=window, top_k=top_k)
        scan_scores, slice_scores, slice_groups = [], [], []
        bar = tqdm(found, desc="calibrating", unit="scan", disable=None if progress else True)
        for i, path in enumerate(bar):
            try:
                res = screen_volume(run, path, modality=settings.modality, window=settings.window,
                                    batch_size=batch_size, top_k=settings.top_k)
            except MultiADInputError:
                raise
            except Exception as e:  # noqa: BLE001 - a calibration set with a scan left out is not the one asked for
                raise input_error(path, f"cannot be screened ({type(e).__name__}: {e})") from e
            label = labels.get(Path(path).absolute())
            lesion = lesion_slices(label, run.axis) if label is not None else set()
            normal = {k: s for k, s in res.slice_scores.items() if k not in lesion}
            slice_scores += list(normal.values())
            slice_groups += [i] * len(normal)  # the bootstrap resamples scans, not slices
            if not lesion:
                scan_scores.append(res.scan_score)
        record["scan"] = threshold_at_fpr(scan_scores, fpr, n_boot=n_boot, seed=seed) if level == "scan" else None
        record["slice"] = threshold_at_fpr(slice_scores, fpr, groups=slice_groups, n_boot=n_boot, seed=seed,
                                           what="slices")
        record.update(num_scans=len(found), num_normal_scans=len(scan_scores), num_slices=len(slice_scores),
                      settings=settings.calibration_key())
    record.update(inputs=[str(Path(p).absolute()) for p in found], model_sha256=model_sha256(run_dir),
                  created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  package_version=__version__)
    return record


def write_calibration(run_dir: str | Path, record: dict) -> Path:
    """Write ``record`` to ``run_dir/calibration.json`` atomically (model.pt is not touched)."""
    from monai_multiad.outputs import write_json

    path = Path(run_dir) / CALIBRATION_FILE
    write_json(path, record)
    return path
