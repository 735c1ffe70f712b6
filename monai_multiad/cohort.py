"""Screening a cohort: many scans with one run, resumable, and sharded over processes.

:func:`screen_paths` screens a list of scans (:func:`expand_scans` turns folders of cases and list
files into one), writes one output folder per scan (:func:`~monai_multiad.scan_outputs.screen_path`) and
``report.csv`` / ``report.json`` / ``report.html`` with one row per scan, in the list's order.

* **Resumable.** A scan's ``result.json`` is written last, atomically, once its other outputs are in
  place, and records what screened it (``screened_with``: the SHA-256 of the run's ``model.pt``, the
  settings and thresholds, the scan's path, size and modification time). A rerun into the same
  folder keeps a scan whose ``result.json`` says the same and whose files are all there (its report
  row is rebuilt from that record) and screens the others, so a killed job resumes where it was. A
  scan screened with another model, other settings or thresholds, or changed since, is screened
  again, and so is one that failed. Before a scan is (re)screened its old ``result.json`` is removed,
  so a record never vouches for outputs it did not see written.
* **Sharded.** Under ``ignite.distributed`` (``multiad screen --nproc N``, or torchrun: see
  :mod:`monai_multiad.distributed`) every process finds the same scans left to do and screens every
  N-th of them (rank r: the r-th, (r+N)-th, ...); the rows are gathered and rank 0 writes the one
  report, the same, row for row and in the same order, as one process writes. The output folder must
  be one that every process sees (on several nodes, a shared file system).
* **Overlapped** (``workers`` > 0): DataLoader processes read the next scans while one is screened, and
  a thread writes a scan's outputs while the next is screened; the report is the same.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import ignite.distributed as idist
import torch

from monai_multiad.errors import MultiADInputError, OutputWriteError, input_error
from monai_multiad.inferers import LoadedRun, load_run
from monai_multiad.outputs import display_path
from monai_multiad.report import ReportRow, write_report
from monai_multiad.scan_outputs import MAP_FORMATS, screen_path, unique_names, write_outputs
from monai_multiad.screening import screen_volume

__all__ = ["LIST_SUFFIXES", "expand_scans", "model_identity", "screen_paths"]

logger = logging.getLogger("monai_multiad")

#: a file argument with one of these suffixes is a list of scans, one path a line
LIST_SUFFIXES = (".txt", ".lst", ".list")


# ----------------------------------------------------------------------------- which scans
def _read_list(path: Path) -> list[Path]:
    """The scans a list file names: one path a line; blank lines and ``#`` comments skipped; a relative
    path is relative to the list file's folder."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise input_error(path, f"cannot read this list of scans ({type(e).__name__}: {e})") from None
    entries = [line.strip() for line in text.splitlines()]
    return [Path(os.path.abspath(path.parent / Path(e).expanduser())) for e in entries if e and not e.startswith("#")]


def _expand_folder(folder: Path) -> list[Path]:
    """A DICOM series folder is one scan; a folder of cases (``<case>.nii.gz``, ``<case>/<image>.nii.gz``,
    ``<case>/<DICOM series>``; label volumes left out, as in training: :func:`~monai_multiad.data.volumes.
    find_cases`) is its cases, sorted by name; anything else stays one scan, reported if it cannot be read."""
    from monai_multiad.data.volumes import any_dicom, find_cases

    if any_dicom(sorted(p for p in folder.iterdir() if p.is_file())):
        return [folder]
    cases = find_cases(folder)
    return [c.image for c in cases] or [folder]


def expand_scans(items: Sequence[str | Path], series_uid: str | None = None) -> list[Path]:
    """The scans to screen, in order: NIfTI files and DICOM series folders as given; a folder of cases
    expanded to its cases (:func:`_expand_folder`; not with ``series_uid``, which picks one series from a
    folder); a list file (:data:`LIST_SUFFIXES`) to the scans it names, each expanded in turn. A path
    that does not exist stays in the list and is reported as a failed scan."""
    out: list[Path] = []
    for item in map(Path, items):
        if item.is_file() and item.suffix.lower() in LIST_SUFFIXES:
            for entry in _read_list(item):
                out += _expand_folder(entry) if entry.is_dir() and series_uid is None else [entry]
        elif item.is_dir() and series_uid is None:
            out += _expand_folder(item)
        else:
            out.append(item)
    return out


# ----------------------------------------------------------------------------- what screened a scan
def model_identity(run: Any) -> str:
    """SHA-256 of a run's ``model.pt`` (``run``: the run folder or the file), or of a network's weights."""
    if isinstance(run, (str, Path)):
        from monai_multiad.inferers import model_sha256

        digest = model_sha256(run)
        if digest is not None:
            return digest
        raise input_error(run, "no model.pt here (expected a run folder written by 'multiad train')")
    return load_run(run).identity()


def _scan_stamp(path: Path) -> dict:
    """Size and modification time of a scan file (of every file below a DICOM folder): a changed scan
    is screened again."""
    try:
        if path.is_dir():
            stats = [p.stat() for p in path.rglob("*") if p.is_file()]
            return {"files": len(stats), "bytes": sum(s.st_size for s in stats),
                    "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}
        s = path.stat()
        return {"bytes": s.st_size, "mtime_ns": s.st_mtime_ns}
    except OSError:
        return {}


def _as_json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), so that records compare equal."""
    from monai_multiad.outputs import jsonable

    return json.loads(json.dumps(obj, default=jsonable))


def finished_row(folder: Path, screened_with: dict) -> dict | None:
    """The report row of a scan already screened into ``folder`` as ``screened_with`` says, rebuilt from
    its ``result.json``; ``None`` when it has to be screened (no record, another model or settings, a
    failed scan, a file missing)."""
    try:
        record = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("status") != "ok" or record.get("screened_with") != screened_with:
        return None
    files = [*(record.get("files") or {}).values(), record.get("dicom_map"), record.get("dicom_seg")]
    if not all(Path(f).is_file() for f in files if f):
        return None
    return ReportRow.from_record(record).as_dict()


# ----------------------------------------------------------------------------- screening them
def _message(e: BaseException) -> str:
    """A failed scan's ``error``: one line, naming the file where the error does."""
    if isinstance(e, OutputWriteError):
        msg = e.strerror or str(e)  # names the file that could not be written
    else:
        msg = str(e) if isinstance(e, MultiADInputError) else f"{type(e).__name__}: {e}"
    return msg.splitlines()[0] if msg else ""


def _clear(folder: Path, map_format: str) -> None:
    """Before a scan is (re)screened: its old ``result.json`` vouches for nothing now, and the half-written
    files (:func:`monai_multiad.outputs.atomic_path`'s hidden names) of a screening that was killed go, and so
    does a map of the other format (an earlier screening's, which would not be replaced)."""
    if folder.is_dir():
        (folder / "result.json").unlink(missing_ok=True)
        for other in MAP_FORMATS:
            if other != map_format:
                (folder / f"anomaly_map.{other}").unlink(missing_ok=True)
        for temporary in folder.glob(".*"):
            if temporary.is_file():
                temporary.unlink()


class _ScanReader(torch.utils.data.Dataset):
    """Scans read in DataLoader worker processes: ``(volume, "")``, or ``(None, error)`` for one that
    cannot be read (the error :func:`_message` gives, so the report says what one process says)."""

    def __init__(self, scans: Sequence[Path], series_uid: str | None) -> None:
        self.scans, self.series_uid = list(scans), series_uid

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, i: int):
        from monai_multiad.transforms.volume import load_volume

        try:
            return load_volume(self.scans[i], series_uid=self.series_uid), ""
        except Exception as e:  # noqa: BLE001 - reported as the scan's failure
            return None, _message(e) or type(e).__name__


def _as_is(item):
    return item


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


def _screen_share(run: LoadedRun, scans: list[Path], names: list[str], records: list[dict], mine: list[int],
                  out_dir: Path, failed: dict, bar, workers: int, map_format: str, **options) -> dict[int, dict]:
    """Rows of the scans ``mine`` (indices), screened in order. ``workers`` 0: each read, screened and
    written in turn. Otherwise the next scans are read in ``workers`` DataLoader processes while this one
    is screened, and a writer thread writes each scan's outputs while the next is screened (one write
    at a time: memory holds at most two scans' results)."""
    rows: dict[int, dict] = {}

    def failed_row(i: int, t0: float, e: BaseException) -> dict:
        return ReportRow(str(scans[i]), names[i], "failed", seconds=round(time.perf_counter() - t0, 3),
                         error=_message(e), **failed).as_dict()

    def done(i: int, row: dict) -> None:
        rows[i] = row
        bar.update(1)

    series_uid = options.get("series_uid")
    if workers < 1:
        for i in mine:
            bar.set_postfix_str(names[i])
            t0 = time.perf_counter()
            try:
                _clear(out_dir / names[i], map_format)
                row = screen_path(run, scans[i], out_dir, name=names[i], screened_with=records[i],
                                            map_format=map_format, **options)
            except Exception as e:  # noqa: BLE001 - one bad scan must not stop the batch; its error is reported
                row = failed_row(i, t0, e)
            done(i, row)
        return rows
    from concurrent.futures import ThreadPoolExecutor

    from torch.utils.data import DataLoader

    loader = DataLoader(_ScanReader([scans[i] for i in mine], series_uid), batch_size=None, num_workers=workers,
                        collate_fn=_as_is, prefetch_factor=1, worker_init_fn=_one_thread)
    options = {k: v for k, v in options.items() if k != "series_uid"}
    pending = None  # (index, start, future) of the write in progress

    def settle() -> None:
        i, t0, future = pending
        try:
            row = future.result()
        except Exception as e:  # noqa: BLE001 - an output that could not be written fails this scan only
            row = failed_row(i, t0, e)
        done(i, row)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="multiad-writer") as writer:
        for i, (volume, error) in zip(mine, loader):
            bar.set_postfix_str(names[i])
            t0 = time.perf_counter()
            try:
                _clear(out_dir / names[i], map_format)
                if error:
                    raise MultiADInputError(error)
                result = screen_volume(run, volume, series_uid=series_uid, **options)
            except Exception as e:  # noqa: BLE001 - one bad scan must not stop the batch; its error is reported
                done(i, failed_row(i, t0, e))
                continue
            finally:
                del volume
            if pending is not None:
                settle()
            pending = (i, t0, writer.submit(write_outputs, result, scans[i], out_dir / names[i],
                                            series_uid=series_uid, screened_with=records[i], map_format=map_format,
                                            started=t0))
            del result
        if pending is not None:
            settle()
    return rows


def screen_paths(run: Any, scans: Sequence[str | Path], out_dir: str | Path, device: str = "auto",
                 modality: str | None = None, window: Any = None, series_uid: str | None = None,
                 batch_size: int = 32, top_k: int | None = None, progress: bool = True, resume: bool = True,
                 workers: int = 0, map_format: str = "nii.gz", **kwargs) -> list[dict]:
    """Screen several scans with one run (loaded once): one output folder per scan, and
    ``out_dir/report.csv`` + ``report.json`` with one row per scan in the order of ``scans``, and
    ``report.html`` to open (:mod:`monai_multiad.report_html`). A scan that cannot be read or screened
    gets ``status "failed"`` and its ``error``; the others go on.

    ``resume``: keep the scans already screened into ``out_dir`` with this model, these settings and
    thresholds (see the module docstring); ``False`` screens every scan again. ``progress``: a bar with
    the time left on stderr (rank 0; not when stderr is not a terminal). ``workers``: DataLoader
    processes reading the next scans while one is screened, and a thread writing outputs meanwhile (0:
    all in turn, in this process). ``map_format``: ``"nii.gz"`` or ``"nii"``
    (:data:`~monai_multiad.scan_outputs.MAP_FORMATS`). In an ``ignite.distributed`` group every rank calls
    this with the same arguments and screens its share; rank 0 writes the report. Every rank returns
    all the rows. ``kwargs`` go to :func:`~monai_multiad.screening.screen_volume` (axis, image_size,
    threshold)."""
    from tqdm.auto import tqdm

    if workers < 0:
        raise MultiADInputError(f"workers must be 0 or more, got {workers}")
    if map_format not in MAP_FORMATS:
        raise MultiADInputError(f"map format {map_format!r}: expected one of {', '.join(MAP_FORMATS)}")
    out_dir = Path(out_dir).absolute()  # the report names files that are found from anywhere
    loaded = load_run(run, device)
    scans = [Path(s) for s in scans]
    names = unique_names(scans)
    settings = loaded.settings(modality=modality, window=window, slice_axis=kwargs.pop("axis", None),
                               image_size=kwargs.pop("image_size", None), top_k=top_k)
    scan_thr, slice_thr = loaded.volume_thresholds(settings, kwargs.get("threshold"))
    failed = {"threshold": scan_thr.value, "threshold_source": scan_thr.description,
              "threshold_kind": scan_thr.source, "slice_threshold": slice_thr.value,
              "slice_threshold_source": slice_thr.description}
    record = _as_json({"model_sha256": loaded.identity(),
                       **settings.calibration_key(), "series_uid": series_uid, "map_format": map_format,
                       **{k: v for k, v in failed.items() if k != "threshold_kind"}})
    records = [{**record, "scan": str(s), "scan_file": _scan_stamp(s)} for s in scans]
    rank, world = idist.get_rank(), idist.get_world_size()
    rows: dict[int, dict] = {}
    if resume:
        for i, (name, record) in enumerate(zip(names, records)):
            row = finished_row(out_dir / name, record)
            if row is not None:
                rows[i] = row
    todo = [i for i in range(len(scans)) if i not in rows]
    if world > 1:
        idist.barrier()  # every rank has seen what was finished before any rank writes
    if rows and rank == 0:
        logger.info("%s: %d of %d scans were already screened there with this model and these settings: kept "
                    "(their result.json; --rescreen screens them again); screening the other %d",
                    display_path(out_dir), len(rows), len(scans), len(todo))
    mine = todo[rank::world]
    desc = "screening" if world == 1 else f"screening (rank 0: {len(mine)} of {len(todo)})"
    bar = tqdm(total=len(mine), desc=desc, unit="scan", disable=None if progress and rank == 0 else True)
    screened = _screen_share(loaded, scans, names, records, mine, out_dir, failed, bar, workers, map_format,
                             series_uid=series_uid, modality=settings.modality, window=settings.window,
                             axis=settings.slice_axis, image_size=settings.image_size, batch_size=batch_size,
                             top_k=settings.top_k, **kwargs)
    bar.close()
    for part in (idist.all_gather(screened) if world > 1 else [screened]):
        rows.update(part)
    ordered = [rows[i] for i in range(len(scans))]
    if rank == 0:
        write_report(out_dir, ordered)
        from monai_multiad.report_html import write_report_html  # report.html: the page to open, after csv/json

        write_report_html(out_dir, ordered, run if isinstance(run, (str, Path)) else None)
    return ordered
