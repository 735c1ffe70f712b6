"""Writing results safely: every output goes to a temporary name in the target folder and is
renamed into place when complete, so an interrupted run never leaves a half-written file, and a
write that fails (a full disk) is one :class:`~monai_multiad.errors.OutputWriteError` naming the
file; :func:`check_output_dir`, which refuses an output folder that cannot be used before any work
starts; and :func:`folder_lock`, which keeps two processes from writing into one folder."""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from monai_multiad.errors import OutputWriteError, input_error

__all__ = ["atomic_path", "check_output_dir", "display_path", "folder_lock", "write_error", "write_json", "write_png",
           "write_text"]

logger = logging.getLogger("monai_multiad")

# errors that mean "the storage cannot take this file", whatever wrote it
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.ENOENT, errno.EACCES}


def is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says a file could not be written: an ``OSError`` of the storage, or the
    ``RuntimeError`` that ``torch.save``'s zip writer raises for one."""
    if isinstance(exc, OutputWriteError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _WRITE_ERRNOS
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _TORCH_WRITE_FAILURES)


def _chain(exc: BaseException | None):
    """``exc`` and the exceptions it was raised from or during (torch.save's writer fails twice)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


# what torch.save's zip writer says when the file system took fewer bytes than it wrote
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "file write failed", "inline_container")


def write_error(path: str | Path, exc: BaseException) -> BaseException:
    """``exc`` as an :class:`OutputWriteError` naming ``path`` when it is a failed write, else ``exc``."""
    if isinstance(exc, OutputWriteError) or not is_write_failure(exc):
        return exc
    system = next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS), None)
    if system is not None:
        reason = os.strerror(system.errno)
    else:  # torch's writer does not always pass the system's reason on
        reason = "the file system took fewer bytes than were written: a full disk, a quota or a file size limit"
    return OutputWriteError(system.errno if system is not None else errno.EIO,
                            f"{display_path(path)}: could not be written ({reason}); nothing half-written was "
                            "left. Free some disk space or choose another output folder, then run again")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except Exception as e:
        error = write_error(path, e)
        if error is e:
            raise
        raise error from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=jsonable) + "\n")


def jsonable(o: Any) -> Any:
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, (np.ndarray,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")


def check_output_dir(path: str | Path, what: str = "output folder", inputs: tuple[str | Path, ...] = ()) -> Path:
    """Check, before any work, that ``path`` can be used as an output folder; return it absolute.

    Usable: an existing writable folder, or a path whose nearest existing parent is a writable
    folder (it is created later, by whoever writes there). Nothing is created here. Otherwise a
    one-line :class:`~monai_multiad.errors.MultiADInputError` ``"<path>: <what is wrong>"``, with
    ``path`` as given: an existing file, a parent that is a file, no write permission, or one of
    the ``inputs`` folders (outputs would be mixed into the data read).
    """
    if path is None or str(path).strip() == "":
        raise input_error(None, f"no {what} given")
    given = Path(path)
    absolute = given.absolute()
    if absolute.exists() and not absolute.is_dir():
        raise input_error(given, f"is a file: the {what} must be a folder (existing or new)")
    parent = absolute
    while not parent.exists():  # nearest existing ancestor (a dangling symlink counts as existing)
        if parent.is_symlink():
            raise input_error(given, f"cannot create the {what}: {parent} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise input_error(given, f"cannot create the {what}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise input_error(given, f"cannot write the {what}: no write permission in {parent}")
    for item in inputs:
        if item and str(item).strip() and Path(item).is_dir() and Path(item).resolve() == absolute.resolve():
            raise input_error(given, f"is an input folder: the {what} must be another folder, so that outputs "
                                     "do not mix with the data read")
    return absolute


LOCK_NAME = ".multiad.lock"


@contextmanager
def folder_lock(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold ``folder`` for one process while ``command`` writes there.

    A lock file ``.multiad.lock`` (pid, host, command, start time) is created exclusively; if
    another live process holds it, a :class:`MultiADInputError` names that process and nothing is
    written. A lock left by a process that no longer runs on this host (killed) is taken over with
    a warning. The lock is removed at the end, and so are ``folder`` and the parents this call created
    when nothing was written there (a command that fails on its input leaves nothing behind).
    """
    folder = Path(folder)
    created = [f for f in (folder, *folder.parents) if not f.exists()]  # the folders made here, deepest first
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
          "started": datetime.datetime.now().isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _read_lock(lock)
            if other is not None and other.get("host") == me["host"] and not _alive(other.get("pid")):
                logger.warning("%s: removing the lock of %s (pid %s), which no longer runs", display_path(folder),
                               other.get("command", "a process"), other.get("pid"))
                lock.unlink(missing_ok=True)
                continue
            who = (f"{other.get('command', 'multiad')} (pid {other.get('pid')} on {other.get('host')}, "
                   f"since {other.get('started')})") if other else "another process (its lock file is unreadable)"
            raise input_error(display_path(folder), f"in use by {who}: wait for it to finish or choose another "
                              f"folder; if no such process runs any more, delete {display_path(lock)}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise input_error(display_path(folder), f"could not take the lock {LOCK_NAME}")
    try:
        yield folder
    finally:
        if (_read_lock(lock) or {}).get("pid") == me["pid"]:
            lock.unlink(missing_ok=True)
        for made in created:
            try:
                made.rmdir()  # only when empty
            except OSError:
                break


def _read_lock(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # exists but not ours, or unreadable: assume held
    return True


def display_path(path: str | Path) -> str:
    """``path`` as a user reads it: relative to the working folder when inside it, else absolute."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
