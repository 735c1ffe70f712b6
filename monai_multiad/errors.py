"""Errors that tell a user what to fix.

Every error the package raises for bad input is a :class:`ValueError` subclass whose message
names the file (where there is one), what was found and what is expected, in one line.
The CLI prints that line and exits with status 2 instead of showing a traceback. An output that
cannot be written (:class:`OutputWriteError`: a full disk, a quota) is one line and status 1.
"""

from __future__ import annotations

__all__ = ["MultiADInputError", "OutputWriteError", "WeightsError", "find_input_error", "input_error"]


class MultiADInputError(ValueError):
    """Bad user input: a file, folder, tensor or option that cannot be used as given."""


class OutputWriteError(OSError):
    """An output that could not be written (full disk, quota, file size limit, read-only or
    vanished folder). The message names the file and the reason; nothing half-written is left.
    The CLI prints it and exits with status 1."""


class WeightsError(MultiADInputError):
    """A weights or checkpoint file that cannot be loaded completely into the network."""


def input_error(path, problem: str) -> MultiADInputError:
    """Build a one-line error ``"<path>: <problem>"`` (``path`` may be ``None``)."""
    return MultiADInputError(f"{path}: {problem}" if path is not None else problem)


def find_input_error(exc: BaseException | None) -> MultiADInputError | None:
    """The :class:`MultiADInputError` behind ``exc`` (itself, or one that MONAI wrapped in its own
    errors: a transform's ``RuntimeError("applying transform ...")``, a config's instantiation error),
    or ``None``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MultiADInputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
