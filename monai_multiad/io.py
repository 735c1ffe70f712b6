"""Writing results safely: every output goes to a temporary name in the target folder and is
renamed into place when complete, so an interrupted run never leaves a half-written file; and
:func:`check_output_dir`, which refuses an output folder that cannot be used before any work starts."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from monai_multiad.errors import input_error

__all__ = ["atomic_path", "check_output_dir", "display_path", "write_json", "write_png", "write_text"]


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
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
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


def display_path(path: str | Path) -> str:
    """``path`` as a user reads it: relative to the working folder when inside it, else absolute."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
