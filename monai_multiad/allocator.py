"""CPU memory for the next batch: freed tensor memory kept in the process instead of given back to the OS.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc's serves a block larger than its
mmap threshold (128 KiB at first, adapting up to 32 MiB, and always above that) with freshly mapped
pages and unmaps them when the tensor is freed, and gives the top of its heap back to the OS beyond
twice that threshold. A network pass at batch 16 or 32 allocates and frees hundreds of MiB of
intermediate tensors, so each pass faults those pages in again and the kernel zeroes them: 122,000 to
134,000 page faults in each Lite0 network pass at batch 16 on 256 px images, about 45 % of its time
on one thread (``docs/results.md``, Speed, "CPU memory kept between batches").

:func:`keep_freed_memory` sets glibc's own tunables with ``mallopt``: no mapping of its own per block
(``M_MMAP_MAX`` 0: every block from the heap; glibc still maps one when the heap cannot grow) and no
trimming of the heap's top below 2 GiB (``M_TRIM_THRESHOLD``), what ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment does for a process started with it. (PyTorch's
performance tuning guide suggests a preloaded jemalloc or TCMalloc, which reuse memory so; this needs
no library and no launcher.) Lite0, one thread: the pipeline at batch 32 1.8x faster, a training step
1.1x, screening a cohort 1.6-1.7x; batch 1 unchanged, as nothing faults there once warm.

The cost: a process keeps the memory of its largest batch until it ends instead of giving it back
between batches, and over the first passes its heap grows somewhat beyond that peak (a freed block
does not always fit the next aligned request of its size), then stays. The Lite0 pipeline at batches
of 32 and 19 in turn, one thread: 1.27 GB resident between passes and a peak of 1.30 GB, against
0.66-0.71 GB between passes and a peak of 1.21 GB with glibc's default; screening 20 volumes, a peak
of 1.35 GB against 1.17 GB (``docs/results.md``).

``multiad`` (every command, each torchrun or spawned process too) and the bundles' configs call it
at start. It does nothing, and returns ``False``, outside glibc (macOS, Windows, musl), when
``MULTIAD_KEEP_FREED_MEMORY=0``, or when the environment already chooses the allocator or its
settings (``LD_PRELOAD`` of jemalloc, tcmalloc or mimalloc; ``MALLOC_*_`` variables; glibc
tunables): a user's own choice is kept.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

__all__ = ["keep_freed_memory", "kept_freed_memory"]

logger = logging.getLogger(__name__)

ENV = "MULTIAD_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest, 2 GiB
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")

_kept = False


def _reason_not_to() -> str | None:
    """Why the allocator is left as it is, or ``None``."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{ENV}={os.environ[ENV]}"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc's malloc"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _OTHER_ALLOCATORS):
        return f"LD_PRELOAD={preload}"
    chosen = [name for name in _MALLOC_ENV if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if chosen:
        return "malloc settings in the environment: " + ", ".join(chosen)
    return None


def keep_freed_memory() -> bool:
    """Keep freed CPU memory in this process for the next batch (see the module); once per process.
    Returns whether the setting is in force: ``False`` where it does not apply or was declined."""
    global _kept
    if _kept:
        return True
    reason = _reason_not_to()
    if reason is not None:
        logger.debug("C allocator left as it is: %s", reason)
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own C library: the malloc torch calls
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _kept


def kept_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` is in force in this process."""
    return _kept
