"""Datasets: 2D images (:mod:`~monai_multiad.data.decoding` reads the files,
:mod:`~monai_multiad.data.layouts` finds a folder's layout and samples, :mod:`~monai_multiad.data.images`
is the resizing dataset) and volumes cut into slices (:mod:`~monai_multiad.data.volumes`).

The 2D image API (:data:`monai_multiad.data.images.__all__`) is importable from here, loaded on first use.
"""

from importlib import import_module


def __getattr__(name: str):
    images = import_module("monai_multiad.data.images")
    if name == "__all__":
        return list(images.__all__)
    if name in images.__all__:
        return getattr(images, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
