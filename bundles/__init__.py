"""The MONAI bundles that ship with monai-multiad, installed as the package ``monai_multiad.bundles``.

In the repository they are the folder ``bundles/``: ``multiad_brain_mri/`` and ``multiad_industrial/``
(each ``configs/``, ``docs/README.md``, ``LICENSE``) and ``schema/`` (MONAI's metadata schema, for
offline checks). Installed, with ``pip install .`` or ``pip install -e .``, the same files are in
this package's folder, and ``multiad bundle path NAME`` (or ``python -m monai_multiad.bundles path
NAME``) prints a bundle's folder; its configs are then run from anywhere::

    B="$(multiad bundle path brain_mri)"
    python -m monai.bundle run --config_file "$B/configs/train.json" --bundle_root runs/brain \\
        --dataset_dir /data/brain_flair

(``--bundle_root`` is where these bundles write their outputs: ``models/``, ``eval/``.)
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["PREFIX", "ROOT", "bundle_names", "bundle_path", "listing", "main"]

#: the folder holding the bundles (and ``schema/``)
ROOT = Path(__file__).resolve().parent
#: what every bundle's folder name starts with; ``bundle_path`` also takes the name without it
PREFIX = "multiad_"


def bundle_names() -> list[str]:
    """The bundles here: the folders holding a ``configs/metadata.json``, by name."""
    return sorted(p.name for p in ROOT.iterdir() if (p / "configs" / "metadata.json").is_file())


def bundle_path(name: str) -> Path:
    """The folder of bundle ``name`` (``multiad_brain_mri``, or ``brain_mri`` without the prefix);
    a :class:`ValueError` naming the bundles there is for any other name."""
    names = bundle_names()
    for candidate in (name, PREFIX + name):
        if candidate in names:
            return ROOT / candidate
    short = ", ".join(n[len(PREFIX):] if n.startswith(PREFIX) else n for n in names)
    raise ValueError(f"no bundle named {name!r}: the bundles are {short} (also with the prefix {PREFIX})")


def listing() -> list[str]:
    """One line per bundle: ``name version folder``."""
    import json

    lines = []
    for name in bundle_names():
        meta = json.loads((ROOT / name / "configs" / "metadata.json").read_text())
        lines.append(f"{name} {meta.get('version', '?')} {ROOT / name}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m monai_multiad.bundles [list | path NAME]``: as ``multiad bundle``, without importing
    PyTorch or MONAI (quick in a shell's ``$(...)``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m monai_multiad.bundles",
                                     description="The MONAI bundles installed with monai-multiad.")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.add_parser("list", help="each bundle: name, version, folder (the default)")
    q = sub.add_parser("path", help="print a bundle's folder")
    q.add_argument("name", metavar="NAME", help="brain_mri or industrial (or multiad_brain_mri, multiad_industrial)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.action == "path":
        try:
            print(bundle_path(args.name))
        except ValueError as e:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return 2
        return 0
    print("\n".join(listing()))
    return 0
