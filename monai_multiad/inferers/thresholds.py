"""Decision thresholds and where they come from: the one place that says whether a run's calibration applies.

A :class:`Threshold` is a value, its ``source`` (``"calibrated"``, ``"uncalibrated"`` or ``"given"``) and a
sentence for the user. :func:`volume_thresholds` (scans and slices) and :func:`image_threshold` (2D images)
choose between the run's ``calibration.json`` (written by ``multiad calibrate``,
:mod:`monai_multiad.calibration`), used only when it was made for this ``model.pt`` with the same settings
(:meth:`~monai_multiad.inferers.settings.ScreeningSettings.calibration_key`), and the normal threshold fitted
at training. Screening, volume evaluation, prediction and the report read a threshold's source from here,
never re-derive it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CALIBRATION_FILE", "SOURCES", "Threshold", "image_threshold", "load_calibration", "model_sha256",
           "volume_thresholds"]

#: the values of :attr:`Threshold.source`
SOURCES = ("calibrated", "uncalibrated", "given")

CALIBRATION_FILE = "calibration.json"


@dataclass
class Threshold:
    """A decision threshold and where it comes from (``source``: calibrated, uncalibrated or given)."""

    value: float | None
    source: str
    description: str

    def __str__(self) -> str:
        value = "none" if self.value is None else f"{self.value:.4g}"
        return f"threshold {value} ({self.description})"


def model_sha256(run_dir: str | Path) -> str | None:
    path = Path(run_dir)
    path = path / "model.pt" if path.is_dir() else path
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_calibration(run_dir: str | Path | None) -> dict | None:
    """The run's ``calibration.json`` (``run_dir``: a run folder or its model.pt), or ``None`` when there
    is none. One made for another ``model.pt`` (trained again since) comes back with ``"stale": True``,
    one that cannot be read as ``{"unreadable": why}``: neither is used, and the threshold says why."""
    if run_dir is None:
        return None
    folder = Path(run_dir)
    folder = folder if folder.is_dir() else folder.parent
    try:
        record = json.loads((folder / CALIBRATION_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # not fatal: the run falls back to its uncalibrated threshold and says why
        return {"unreadable": f"{type(e).__name__}: {e}"}
    if record.get("model_sha256") != model_sha256(folder):
        record["stale"] = True
    return record


def _describe(part: dict, fpr: float, unit: str) -> str:
    lo, hi = part["interval"]
    of = f" of {part['groups']} scans" if part.get("groups") else ""
    return f"calibrated: FPR {fpr:g} [{lo:.3g}, {hi:.3g}] on {part['n']} normal {unit}{of}"


def _uncalibrated(value: float | None, quantile: float, unit: str, reason: str = "") -> Threshold:
    why = f"{reason}; " if reason else ""
    return Threshold(value, "uncalibrated", f"uncalibrated: {why}the {quantile:g} quantile of validation normal "
                                            f"{unit}; run 'multiad calibrate' for a known false-positive rate")


def _mismatch(record: dict, kind: str, settings: dict) -> str:
    """Why ``record`` does not apply to this use ('' when it does)."""
    if record.get("unreadable"):
        return f"{CALIBRATION_FILE} cannot be read ({record['unreadable']}); run 'multiad calibrate' again"
    if record.get("stale"):
        return f"{CALIBRATION_FILE} was made for an earlier model.pt"
    if record.get("kind") != kind:
        return f"{CALIBRATION_FILE} was made on {record.get('kind')}, not {kind}"
    made = record.get("settings", {})
    diff = [f"{k} {made.get(k)!r}, not {v!r}" for k, v in settings.items() if k in made and made[k] != v]
    return f"{CALIBRATION_FILE} was made with {', '.join(diff)}" if diff else ""


def volume_thresholds(record: dict | None, fallback: float | None, quantile: float, settings: dict,
                      given: float | None = None) -> tuple[Threshold, Threshold]:
    """(scan threshold, slice threshold) for screening with ``settings`` (top_k, modality, window,
    slice_axis, image_size): the calibrated ones where ``record`` has them for these settings, else
    ``fallback`` (the fusion's threshold fitted at training) for both; ``given`` overrides the scan's."""
    reason = _mismatch(record, "volumes", settings) if record else ""
    scan_settings = {k: v for k, v in settings.items() if k != "top_k"}  # top_k does not change slice scores
    slice_reason = _mismatch(record, "volumes", scan_settings) if record else ""
    fpr = (record or {}).get("fpr")
    if record and not reason and record.get("scan"):
        scan = Threshold(record["scan"]["threshold"], "calibrated", _describe(record["scan"], fpr, "scans"))
    else:
        scan = _uncalibrated(fallback, quantile, "slices", reason or ("calibrated at slice level only" if record
                                                                     else ""))
    if given is not None:
        scan = Threshold(float(given), "given", "given by the caller")
    if record and not slice_reason and record.get("slice"):
        part = record["slice"]
        slc = Threshold(part["threshold"], "calibrated", _describe(part, fpr, "slices"))
    else:
        slc = _uncalibrated(fallback, quantile, "slices", slice_reason)
    return scan, slc


def image_threshold(record: dict | None, fallback: float | None, quantile: float, settings: dict) -> Threshold:
    """The image threshold for ``predict``: the calibrated one, else the fusion's fitted at training."""
    reason = _mismatch(record, "images", settings) if record else ""
    if record and not reason and record.get("image"):
        return Threshold(record["image"]["threshold"], "calibrated", _describe(record["image"], record["fpr"],
                                                                                "images"))
    return _uncalibrated(fallback, quantile, "images", reason)
