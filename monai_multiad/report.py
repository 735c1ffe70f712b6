"""A screening's report: :class:`ReportRow`, one row per scan, with one field list (:data:`REPORT_FIELDS`) for
``report.csv``, ``report.json``, each scan's ``result.json`` and ``report.html``."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from monai_multiad.outputs import write_json, write_text

__all__ = ["REPORT_FIELDS", "ReportRow", "write_report"]


@dataclass
class ReportRow:
    """What a screening says about one scan."""

    scan: str  #: the scan's path (a NIfTI file or a DICOM series folder)
    name: str  #: its output folder's name
    status: str = "ok"  #: "ok" or "failed"
    scan_score: float | None = None  #: the mean of the top-k slice scores
    anomalous: bool | None = None  #: scan_score > threshold (None: failed, or no threshold known)
    threshold: float | None = None  #: the threshold on the scan score
    num_slices: int | None = None  #: slices along the axis
    screened_slices: int | None = None  #: foreground slices scored
    top_slices: list[int] = field(default_factory=list)  #: the top-k slice indices, highest first
    map: str = ""  #: the anomaly map file
    seconds: float | None = None
    error: str = ""  #: why a failed scan failed, one line naming the file
    threshold_source: str = ""  #: where the threshold comes from, in words
    threshold_kind: str = ""  #: "calibrated", "uncalibrated" or "given" (:data:`~monai_multiad.inferers.thresholds.SOURCES`)
    slice_threshold: float | None = None  #: the threshold slices are marked against
    slice_threshold_source: str = ""
    dicom_map: str = ""  #: DICOM series only: the map as a DICOM Parametric Map
    dicom_seg: str = ""  #: DICOM series only: the flagged region as a DICOM Segmentation
    dicom_note: str = ""  #: DICOM series only: why a DICOM output was not written

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "ReportRow":
        """The row held in a mapping with these fields and possibly others (a scan's ``result.json``)."""
        return cls(**{k: record[k] for k in REPORT_FIELDS if k in record})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: the report's columns, in order
REPORT_FIELDS = tuple(f.name for f in fields(ReportRow))


def write_report(out_dir: str | Path, rows: Sequence[ReportRow | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Write ``out_dir/report.csv`` and ``report.json`` (atomically), one row per scan in order, with the
    columns :data:`REPORT_FIELDS`. Returns the rows as dicts."""
    as_dicts = [r.as_dict() if isinstance(r, ReportRow) else ReportRow.from_record(r).as_dict() for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(REPORT_FIELDS))
    writer.writeheader()
    for r in as_dicts:
        writer.writerow({**r, "top_slices": ";".join(map(str, r.get("top_slices") or []))})
    write_text(Path(out_dir) / "report.csv", buf.getvalue())
    write_json(Path(out_dir) / "report.json", as_dicts)
    return as_dicts
