"""Images in, network input out, on the network's device; anomaly maps back at each image's own size.

:class:`DevicePreprocessor` takes decoded images as they come from the file
(:func:`~monai_multiad.data.images.read_image_array`: ``(H, W, C)`` uint8, uint16, int16, float...,
at the source size) and does on the model's device what :func:`~monai_multiad.data.images.read_image`
and :func:`~monai_multiad.data.images.resize_image` do on the CPU: scale to [0, 1] by the dtype's
maximum, gray <-> RGB, bilinear anti-aliased resize, clamp. Only the source bytes cross the bus
(a uint8 image is a quarter of its float32 copy), staged in one page-locked buffer that is reused
from call to call and copied without blocking on CUDA. Images of one shape and dtype are converted
and resized together, in one kernel each. The same operations, in the same order, run on the CPU
when the device is the CPU, so the maps are those of the CPU path (``tests/test_preprocess_device.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from monai_multiad.data.images import LUMA, size_hw, to_unit_float

__all__ = ["DevicePreprocessor"]

# dtypes that cross the bus as they are (uint16 as int16 bits, widened on the device)
_SENT_AS_IS = {np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.int32),
               np.dtype(np.bool_), np.dtype(np.float16), np.dtype(np.float32)}
_ALIGN = 64  # bytes between images in the staging buffer
_CPU_CHUNK_BYTES = 4 << 20  # float32 source bytes converted and resized at once on the CPU (about a core's L2)


def _halves(source: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether ``source`` (H, W) is exactly twice ``size`` on both axes (and ``size`` at least 2 x 2)."""
    return min(size) >= 2 and source == (2 * size[0], 2 * size[1])


def _halve_sums(x: torch.Tensor, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """8 x ``F.interpolate(..., mode="bilinear", align_corners=False, antialias=True)`` from 2m to m along
    ``dim``, written out: at scale 2 its triangle filter has four taps, 8 x output i = x[2i-1] + x[2i+2] +
    3 (x[2i] + x[2i+1]), and three at the ends, renormalised: (3, 3, 1) x 8 / 7 (PyTorch's ``aa``
    weights, ``support = 2``). Three full passes of plain adds: ``t = x[2i] + x[2i+1]`` (into ``out``
    when given: the layout of the result), ``c = x[2i-1] + x[2i+2]``, ``y = c + 3 t``; the ends,
    ``3 t[0] + x[2]`` and ``3 t[m-1] + x[2m-3]``, times 8/7. On integer values (bytes) every interior
    sum is exact, so a single division by 64 x the dtype's maximum after both axes gives the resize to
    float rounding (2 ulp at 0-255, ``tests/test_preprocess_device.py``), read in the source's own
    channels-last layout (no reordering copy of the source bytes first): a 512 px uint8 RGB image,
    both axes and the scaling, in 0.52 ms on one thread, against 0.76 for the same taps with a
    scaling pass per axis (an interleaved timing, one thread)."""
    m = x.shape[dim] // 2
    pairs = x.unflatten(dim, (m, 2))
    even, odd = pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)  # x[2i], x[2i + 1]
    y = torch.add(even, odd, out=out) if out is not None else torch.add(even, odd)
    if m > 2:
        inner = y.narrow(dim, 1, m - 2)
        cross = torch.add(odd.narrow(dim, 0, m - 2), even.narrow(dim, 2, m - 2), out=torch.empty_like(inner))
        torch.add(cross, inner, alpha=3, out=inner)
        # both ends in one op: rows 0 and m - 1 of y (step m - 1), rows 2 and 2m - 3 of x (step 2m - 5)
        ends = y[(slice(None),) * dim + (slice(0, None, m - 1),)]
        torch.add(x[(slice(None),) * dim + (slice(2, 2 * m - 2, 2 * m - 5),)], ends, alpha=3, out=ends).mul_(8.0 / 7.0)
    else:
        for i, j in ((0, 2), (1, 1)):
            end = y.narrow(dim, i, 1)
            torch.add(x.narrow(dim, j, 1), end, alpha=3, out=end).mul_(8.0 / 7.0)
    return y


class _PinnedStaging:
    """One page-locked host buffer, grown when a batch needs more, never allocated per call. Before it
    is overwritten, the copy of the previous call is waited for (a CUDA event). ``pin=False`` (tests
    on machines without CUDA) stages in ordinary memory."""

    def __init__(self, pin: bool = True) -> None:
        self.pin = pin
        self.buffer: torch.Tensor | None = None
        self.event = None

    def take(self, nbytes: int) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, pin_memory=self.pin)
        return self.buffer

    def done(self, device: torch.device) -> None:
        if device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(device))


class DevicePreprocessor:
    """Source images -> ``(B, in_channels, *image_size)`` float32 in [0, 1] on ``device``; maps -> source size.

    Args:
        image_size: the network's input size, int or (H, W).
        in_channels: 1 or 3 (gray <-> RGB as :func:`~monai_multiad.data.images.to_channels`), or
            ``None`` to keep each image's own (then all images of a call must agree).
        device: where the network runs.
        pin_memory: stage host copies in page-locked memory (default: on CUDA).

    Integer images are divided by their dtype's maximum (uint8 / 255, uint16 / 65535; signed ones
    clipped at 0), floats have NaN set to 0 and are clipped to [0, 1], as
    :func:`~monai_multiad.data.images.read_image` does. uint32 and 64-bit images, rare, are scaled
    on the CPU and sent as float32.
    """

    def __init__(self, image_size, in_channels: int | None, device: torch.device | str,
                 pin_memory: bool | None = None) -> None:
        self.size = size_hw(image_size)
        self.in_channels = in_channels
        self.device = torch.device(device)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        self._luma = torch.as_tensor(LUMA, device=self.device)  # built once
        self._staging = _PinnedStaging() if self.pin_memory else None

    # ------------------------------------------------------------------ host -> device

    @staticmethod
    def _sendable(arr: np.ndarray) -> np.ndarray:
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.dtype in _SENT_AS_IS:
            return arr
        if arr.dtype == np.float64:
            return arr.astype(np.float32)  # read_image's own first step
        return to_unit_float(arr)  # uint32, int64, uint64: scaled here, sent as float32 in [0, 1]

    def _upload(self, groups: list[list[np.ndarray]]) -> list[torch.Tensor]:
        """Each group of equally shaped arrays -> one ``(n, H, W, C)`` tensor on the device (uint16 as
        int16: the same bits, in a dtype every torch kernel knows)."""
        groups = [[a.view(np.int16) if a.dtype == np.uint16 else a for a in g] for g in groups]
        if self._staging is None:
            out = []
            for g in groups:
                t = torch.from_numpy(np.ascontiguousarray(g[0])[None] if len(g) == 1 else np.stack(g))
                out.append(t.to(self.device, non_blocking=True))
            return out
        sizes = [len(g) * g[0].nbytes for g in groups]
        offsets = np.cumsum([0] + [-(-n // _ALIGN) * _ALIGN for n in sizes])
        buf = self._staging.take(int(offsets[-1]))
        views = []
        for g, off, n in zip(groups, offsets, sizes):
            view = buf[int(off): int(off) + n].view(torch.from_numpy(g[0][:0]).dtype).view(len(g), *g[0].shape)
            np.stack(g, out=view.numpy())  # the only host copy: into the pinned buffer
            views.append(view)
        end = int(offsets[-1])
        on_device = buf[:end].to(self.device, non_blocking=True)  # one transfer for the whole batch
        self._staging.done(self.device)
        return [on_device[int(off): int(off) + n].view(v.dtype).view(v.shape)
                for v, off, n in zip(views, offsets, sizes)]

    # ------------------------------------------------------------------ on the device

    def _unit(self, t: torch.Tensor, dtype: np.dtype, contiguous: bool = True) -> tuple[torch.Tensor, float]:
        """(n, H, W, C) as sent -> (float32 (n, C, H, W), divisor): ``x / divisor`` is ``images.to_unit_float``'s
        [0, 1] image. Unsigned images are divided after the resize (on a quarter of the pixels at 2x
        down; resize and gray <-> RGB are linear, so only float rounding, ~1e-7, tells the two apart);
        signed and float ones are scaled and clipped first, as clipping does not commute with resizing.
        ``contiguous=False`` keeps the source's channels-last strides (no copy of the bytes)."""
        t = t.permute(0, 3, 1, 2)
        if contiguous:
            t = t.contiguous()  # source bytes, before they grow to float32
        if dtype == np.uint16:  # sent as int16
            return t.to(torch.int32).bitwise_and_(0xFFFF).float(), 65535.0
        if dtype == np.bool_ or dtype.kind == "u":
            return t.float(), float(np.iinfo(dtype).max) if dtype.kind == "u" else 1.0
        if dtype.kind == "i":
            return t.float().div_(float(np.iinfo(dtype).max)).clamp_(0.0, 1.0), 1.0
        return torch.nan_to_num(t.float(), nan=0.0).clamp_(0.0, 1.0), 1.0

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        c, want = x.shape[1], self.in_channels
        if want is None or c == want:
            return x
        if c == 1 and want == 3:
            return x.repeat(1, 3, 1, 1)
        if c == 3 and want == 1:
            return torch.tensordot(self._luma, x, dims=([0], [1]))[:, None]
        raise ValueError(f"cannot convert an image with {c} channels to {want} channels")

    def _convert(self, t: torch.Tensor, dtype: np.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """(n, H, W, C) images of one shape and dtype as sent -> (n, in_channels, *size) float32 in [0, 1].
        ``out`` (n, in_channels, *size), optional: where the exact 2x resize writes, when the channels
        need no change after it (then the result is ``out``; otherwise a new tensor)."""
        halve = _halves(tuple(t.shape[1:3]), self.size)
        x, divisor = self._unit(t, dtype, contiguous=not halve)
        if x.shape[1] == 3:  # RGB -> gray before resizing, gray -> RGB after: the same values, less work
            x = self._channels(x)
        if halve:  # exactly 2x down: the same antialiased bilinear resize, as four-tap sums (64 x, scaled below)
            n, c, h, w = x.shape
            if out is None or tuple(out.shape) != (n, c, h // 2, w // 2) or out.dtype != x.dtype:
                out = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, device=x.device)
            x = _halve_sums(_halve_sums(x, 2), 3, out=out)
            divisor *= 64.0
        elif tuple(x.shape[-2:]) != self.size:  # a same-size antialiased resize is the identity
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        if divisor != 1.0:
            x = x.div_(divisor)
        return self._channels(x.clamp_(0.0, 1.0))

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``(H, W, C)`` or ``(H, W)`` arrays (sizes and dtypes may differ) -> the network's input batch."""
        arrays = [self._sendable(a) for a in images]
        if not arrays:
            raise ValueError("no images to preprocess")
        keys: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            keys.setdefault((a.shape, a.dtype.str), []).append(i)
        groups = list(keys.values())
        if self.device.type == "cpu" and self._staging is None:
            return self._on_cpu(arrays, groups)
        sent = self._upload([[arrays[i] for i in idx] for idx in groups])  # one transfer (staged) or one per group
        out = None
        for idx, t in zip(groups, sent):  # each group whole: one kernel per step on the device
            x = self._convert(t, arrays[idx[0]].dtype)
            if len(groups) == 1:
                return x
            if out is None:
                out = torch.empty((len(arrays), x.shape[1], *self.size), dtype=x.dtype, device=self.device)
            out.index_copy_(0, torch.tensor(idx, device=self.device), x)
        return out

    def _on_cpu(self, arrays: list[np.ndarray], groups: list[list[int]]) -> torch.Tensor:
        """:meth:`__call__` on the CPU: a few images at a time, so that each one's float copy and resize
        stay in the core's cache (a 512 px RGB image is 3 MiB as float32), each chunk read from its own
        arrays (no stacked copy of the whole batch; one image is not copied at all) and, for an exact 2x
        resize, written straight into its rows of the batch (no copy of the result): the same operations
        on fewer images at once."""
        channels = self.in_channels if self.in_channels is not None else int(arrays[0].shape[2])
        out = None
        for idx in groups:
            step = max(1, _CPU_CHUNK_BYTES // (4 * arrays[idx[0]].size))
            for start in range(0, len(idx), step):
                part = idx[start: start + step]
                (t,) = self._upload([[arrays[i] for i in part]])
                if out is None:
                    out = torch.empty((len(arrays), channels, *self.size), dtype=torch.float32)
                rows = part == list(range(part[0], part[0] + len(part)))  # consecutive: a slice of the batch
                x = self._convert(t, arrays[part[0]].dtype, out=out[part[0]: part[0] + len(part)] if rows else None)
                if len(part) == len(arrays):  # the whole batch in one chunk
                    return x
                if rows:
                    if x.data_ptr() != out[part[0]].data_ptr():
                        out[part[0]: part[0] + len(part)].copy_(x)
                else:
                    out.index_copy_(0, torch.tensor(part), x)
        return out

    # ------------------------------------------------------------------ device -> host

    @torch.no_grad()
    def restore(self, maps: torch.Tensor, sizes: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """``(B, 1, h, w)`` maps on the device -> one float32 ``(H_i, W_i)`` numpy map per image, resized
        (bilinear, anti-aliased when shrinking, as :func:`~monai_multiad.data.images.restore_size`) on
        the device and brought back in one copy."""
        sizes = [(int(h), int(w)) for h, w in sizes]
        if len(sizes) != maps.shape[0]:
            raise ValueError(f"{len(sizes)} sizes for {maps.shape[0]} maps")
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, hw in enumerate(sizes):
            by_size.setdefault(hw, []).append(i)
        flat: list[torch.Tensor | None] = [None] * len(sizes)
        for hw, idx in by_size.items():
            m = (maps if len(by_size) == 1 else torch.cat([maps[i: i + 1] for i in idx])).float()
            if tuple(m.shape[-2:]) != hw:
                m = F.interpolate(m, size=hw, mode="bilinear", align_corners=False, antialias=True)
            for j, i in enumerate(idx):
                flat[i] = m[j, 0].reshape(-1)
        host = torch.cat(flat).cpu().numpy() if len(flat) > 1 else flat[0].cpu().numpy()
        ends = np.cumsum([h * w for h, w in sizes])
        return [part.reshape(hw) for part, hw in zip(np.split(host, ends[:-1]), sizes)]
