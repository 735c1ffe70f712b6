"""Freed CPU memory kept for the next batch (``monai_multiad.allocator``): page faults, opt-outs, wiring.

Each case runs in a fresh interpreter: ``mallopt`` changes the whole process, once.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="keep_freed_memory sets glibc's malloc; this is not glibc")

# a 64 MiB CPU tensor made and freed 20 times, as a network pass makes and frees its large intermediates:
# the page faults of each of the last five rounds. By default glibc unmaps a block this large when it is
# freed, so every round faults its 16,384 pages in again; kept, the heap grows over the first rounds (up to
# ten here: an aligned request does not fit the block an earlier one left) and then serves every round
ROUNDS = textwrap.dedent("""
    import resource, sys, torch
    from monai_multiad import allocator
    applied = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
    faults = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(16 << 20)
        del x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, allocator.kept_freed_memory(), *faults[-5:])
""")


def _env(**extra: str) -> dict[str, str]:
    """This environment without any allocator choice of its own, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")
               and k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "MULTIAD_KEEP_FREED_MEMORY")}, **extra}


def _rounds(mode: str, **env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], env=_env(**env), capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


def test_kept_memory_is_not_faulted_in_again():
    applied, kept, *faults = _rounds("keep")
    assert (applied, kept) == ("True", "True")
    assert all(int(f) < 1000 for f in faults), faults  # a few pages of Python objects at most


def test_glibc_default_faults_every_round():
    # what the setting avoids: without it, each round maps and faults the tensor's pages anew
    applied, kept, *faults = _rounds("default")
    assert (applied, kept) == ("False", "False")
    assert all(int(f) >= 16000 for f in faults), faults


@pytest.mark.parametrize("env", [{"MULTIAD_KEEP_FREED_MEMORY": "0"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
                                 # the loader ignores a missing library (a warning); the check reads the variable
                                 {"LD_PRELOAD": "/nonexistent/libjemalloc.so.2"}],
                         ids=["opt-out", "malloc-env", "tunables", "jemalloc"])
def test_a_users_own_choice_is_kept(env):
    applied, kept, *faults = _rounds("keep", **env)
    assert (applied, kept) == ("False", "False")
    assert all(int(f) >= 16000 for f in faults), faults


def test_multiad_keeps_freed_memory_from_its_start(tmp_path):
    # the CLI applies it before any command runs: here a predict that ends at once on a missing run folder
    code = textwrap.dedent("""
        from monai_multiad import allocator, cli
        status = cli.main(["predict", "missing.png", "--run", "no_run", "--out", "out"])
        print(status, allocator.kept_freed_memory())
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert out.stdout.split() == ["2", "True"], out.stderr
    assert "no_run" in out.stderr
