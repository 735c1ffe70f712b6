"""From a normalised volume to slice maps, slice scores and the scan score: :class:`VolumeSliceInferer`, a
MONAI ``Inferer`` in the spirit of ``monai.inferers.SliceInferer``, and :func:`scan_score`, the one rule that
turns slice scores into a scan's score (screening, volume evaluation and calibration all use it).

The volume is cut into canonical slices along the axis by a
:class:`~monai_multiad.transforms.VolumeToSlices` (every foreground slice: the rule the run's training slices
came from), run through the network ``batch_size`` slices at a time, and the per-slice maps are put back voxel
for voxel on the volume's own grid by a :class:`~monai_multiad.transforms.SlicesToVolume` (background slices
get 0).

* slice score: the network's image score of the slice (its map's maximum);
* **scan score: the mean of the ``top_k`` highest slice scores** (all slices when fewer), robust to one noisy
  slice yet sensitive to a lesion that spans a few slices; ties go to the lower slice index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from monai_multiad.errors import input_error
from monai_multiad.inferers.settings import DEFAULT_TOP_K
from monai_multiad.transforms.volume import SliceGeometry, SlicesToVolume, VolumeToSlices

__all__ = ["MONTAGE_SLICES", "RankedSlices", "SliceInference", "SliceMaps", "VolumeSliceInferer", "rank_slices",
           "scan_score"]

#: slices kept for a montage of the most anomalous ones (at least ``top_k``)
MONTAGE_SLICES = 6


def rank_slices(scores: Sequence[float], indices: Sequence[int]) -> list[int]:
    """Positions of the slices from the most anomalous down (ties: the lower slice index first): the order
    of the top slices, the montage and the scan score."""
    return sorted(range(len(indices)), key=lambda i: (-float(scores[i]), indices[i]))


class RankedSlices(NamedTuple):
    score: float  #: the scan score: the mean of the top_k highest slice scores
    order: list[int]  #: positions of all the slices, most anomalous first
    top: list[int]  #: the slice indices of the top_k, highest first


def scan_score(scores: Sequence[float], indices: Sequence[int], top_k: int = DEFAULT_TOP_K) -> RankedSlices:
    """A scan's score from its slice ``scores`` (slice ``indices`` alongside): the mean of the ``top_k``
    highest (all when fewer), with the ranking it came from."""
    if not len(scores):
        raise ValueError("a scan score needs at least one slice score")
    order = rank_slices(scores, indices)
    first = order[:max(1, int(top_k))]
    return RankedSlices(float(np.mean([float(scores[i]) for i in first])), order, [indices[i] for i in first])


@dataclass
class SliceMaps:
    """The network's output on the screened slices of a volume, before the maps go back on its grid."""

    geometry: SliceGeometry  #: where the slices lie in the volume
    slices: list[int]  #: canonical indices of the screened (foreground) slices
    maps: torch.Tensor  #: (N, 1, S, S) float32 on the CPU
    scores: torch.Tensor  #: (N,) float64 slice scores
    ranked: RankedSlices
    montage_slices: list[int] = field(default_factory=list)  #: the most anomalous slices, highest first
    montage_images: torch.Tensor | None = None  #: their (n, 1, S, S) images in [0, 1]
    montage_maps: torch.Tensor | None = None  #: their (n, 1, S, S) maps
    foreground_rule: str = ""

    @property
    def slice_scores(self) -> dict[int, float]:
        return {k: float(s) for k, s in zip(self.slices, self.scores.tolist())}


@dataclass
class SliceInference(SliceMaps):
    """:class:`SliceMaps` with the anomaly map on the volume's grid."""

    anomaly_map: MetaTensor | None = None  #: (1, X, Y, Z) with the volume's affine; 0 on background slices


class VolumeSliceInferer(Inferer):
    """Run a 2D anomaly network over a volume slice by slice and put its maps back on the volume's grid.

    Args:
        slice_axis: "axial", "coronal" or "sagittal" (canonical RAS slices).
        image_size: the slice side the network sees.
        batch_size: slices per forward pass: memory is one batch at model resolution, the map stack
            ``(N, 1, S, S)`` and the output volume; the volume is never copied at model resolution at once.
        top_k: scan score = mean of the ``top_k`` highest slice scores.
        amp: autocast the network (CUDA).
        progress: a progress bar over the batches.

    ``inferer(volume, network)`` (MONAI's ``Inferer`` call): the anomaly map(s) on the volume's grid, a
    ``MetaTensor`` of the input's shape, ``(1, X, Y, Z)`` or a batch ``(B, 1, X, Y, Z)``, whose ``meta`` holds
    ``scan_score``, ``top_slices`` and ``slice_scores``. :meth:`infer` gives everything at once
    (:class:`SliceInference`); :meth:`slice_maps` and :meth:`to_volume` are its two halves, so a caller can free
    the volume before the output volume is allocated.

    The network takes ``x (B, C, S, S)`` in [0, 1] and returns ``(maps (B, 1, S, S), scores (B,))``; a
    one-channel slice is repeated to its ``in_channels``; with ``slice_context`` 1 it sees each slice between its
    two neighbours as three channels (2.5D input: a network trained so).
    """

    def __init__(self, slice_axis: str = "axial", image_size: int = 256, batch_size: int = 32,
                 top_k: int = DEFAULT_TOP_K, amp: bool = False, progress: bool = False, slice_context: int = 0) -> None:
        super().__init__()
        if int(batch_size) < 1 or int(top_k) < 1:
            raise ValueError(f"batch_size and top_k must be at least 1, got {batch_size} and {top_k}")
        self.slice_axis, self.image_size, self.batch_size = slice_axis, int(image_size), int(batch_size)
        self.top_k, self.amp, self.progress = int(top_k), bool(amp), bool(progress)
        self.slice_context = int(slice_context)

    def _slicer(self) -> VolumeToSlices:
        size = self.image_size
        return VolumeToSlices(self.slice_axis, spatial_size=(size, size), chunk_size=self.batch_size,
                              context=self.slice_context)

    @torch.no_grad()
    def slice_maps(self, volume: MetaTensor, network: Any, device: Any = None) -> SliceMaps:
        """Maps and scores of the foreground slices of ``volume`` (normalised to [0, 1], ``(1, X, Y, Z)``),
        ranked, with the montage's slices. ``device``: where the network runs (default: its parameters')."""
        slicer = self._slicer()
        geometry, kept = slicer.select(volume)
        if not kept:
            raise input_error(volume.meta.get("filename_or_obj"), "no foreground slice: the volume is empty or "
                                                                  "constant after normalisation")
        if device is None:
            param = next(iter(network.parameters()), None) if hasattr(network, "parameters") else None
            device = param.device if param is not None else torch.device("cpu")
        device = torch.device(device)
        in_channels = int(getattr(network, "in_channels", 3))
        size = self.image_size
        maps = torch.empty((len(kept), 1, size, size), dtype=torch.float32)
        scores = torch.empty(len(kept), dtype=torch.float64)
        chunks = range(0, len(kept), self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="slices", unit="batch", leave=False)
        for start in chunks:
            ks = kept[start:start + self.batch_size]
            x, _, _ = slicer.slices(volume, ks)
            x = x.expand(-1, in_channels, -1, -1) if x.shape[1] != in_channels else x
            with torch.autocast(device.type, enabled=self.amp):
                amap, score = network(x.to(device))
            maps[start:start + len(ks)] = amap.float().cpu()
            scores[start:start + len(ks)] = score.double().cpu()
        ranked = scan_score(scores.tolist(), kept, self.top_k)
        shown = ranked.order[:max(self.top_k, MONTAGE_SLICES)]
        images, _, _ = slicer.slices(volume, [kept[i] for i in shown], context=0)  # the montage shows the slice
        return SliceMaps(geometry, kept, maps, scores, ranked, [kept[i] for i in shown], images, maps[shown],
                         slicer.foreground_rule)

    def to_volume(self, result: SliceMaps) -> SliceInference:
        """``result`` with its maps put back on the volume's grid (bilinear, 0 on background slices)."""
        amap = SlicesToVolume(mode="bilinear", fill=0.0, chunk_size=self.batch_size)(result.maps, result.slices,
                                                                                      result.geometry)
        return SliceInference(**{k: getattr(result, k) for k in result.__dataclass_fields__}, anomaly_map=amap)

    def infer(self, volume: MetaTensor, network: Any, device: Any = None) -> SliceInference:
        """:meth:`slice_maps` then :meth:`to_volume`."""
        return self.to_volume(self.slice_maps(volume, network, device))

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> MetaTensor:
        volumes = inputs if inputs.ndim == 5 else inputs[None]
        if volumes.ndim != 5 or volumes.shape[1] != 1:
            raise ValueError(f"expected a volume (1, X, Y, Z) or a batch (B, 1, X, Y, Z), got {tuple(inputs.shape)}")
        out = []
        for b in range(volumes.shape[0]):
            vol = volumes[b]
            vol = vol if isinstance(vol, MetaTensor) else MetaTensor(vol)
            res = self.infer(vol, network)
            amap = res.anomaly_map
            amap.meta.update(scan_score=res.ranked.score, top_slices=res.ranked.top,
                             slice_scores=res.slice_scores)
            out.append(amap)
        if inputs.ndim == 4:
            return out[0]
        from monai.data.utils import collate_meta_tensor

        return collate_meta_tensor(out)
