"""Export a trained Multi-AD network for deployment: TorchScript, ONNX, and a state-dict file for
MONAI bundles' ``ckpt_export``.

Every exported graph takes what the trained model takes, an image batch ``(B, C, H, W)`` float32
in [0, 1] (C = the run's ``in_channels``), and returns ``(anomaly_map (B, 1, H, W), score (B,))``
with the fusion statistics (``fusion.scale``, ``fusion.threshold``) baked in. The batch axis is
dynamic; the spatial size is the one exported at (``image_size``, the run's training size, at which
the fusion statistics and the threshold were fitted). The traced graph itself follows the input's
size (:func:`~monai_multiad.networks.fusion.stage_anomaly_maps` passes ``x.shape`` on without
``int()``, so tracing records it as a size, not a constant); the size is fixed on purpose: the
TorchScript file refuses other sizes (:class:`ShapeGuard`) and ONNX declares them fixed.

Notes on what had to be worked around (and why the exported graphs still equal the model):

* ``torch.jit.script`` fails on ``MultiAD.forward``'s train/eval return types, so this module's
  TorchScript file is traced (``torch.jit.trace``; traced at batch 2, the graph runs any batch size).
  The bundles' ``network_def`` (:func:`~monai_multiad.bundle_support.anomaly_map_network`, the map only)
  scripts, for MONAI's ``ckpt_export`` in its default form.
* The legacy (TorchScript-based) ONNX exporter is used (``dynamo=False``; the dynamo exporter
  needs ``onnxscript``). The fusion's Gaussian keeps its kernel as a buffer
  (:class:`~monai_multiad.networks.fusion.GaussianSmoothing`), so it exports as a constant.
* The legacy exporter's ``aten::cosine_similarity`` clamps ``|x1| * |x2|`` to ``eps`` while
  PyTorch clamps each norm separately; they differ where a feature norm is tiny (an untrained
  student's deep features). A faithful symbolic is registered for the duration of the export.
"""

from __future__ import annotations

import copy
import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from monai_multiad.networks import MultiAD

__all__ = [
    "ExportMismatchError",
    "ShapeGuard",
    "check_export",
    "export_onnx",
    "export_torchscript",
    "inference_copy",
    "network_def_config",
    "resolve_model",
    "save_state_dict",
]


def resolve_model(model_or_run: MultiAD | str | Path) -> MultiAD:
    """A :class:`MultiAD`, or the one in a run folder / ``model.pt`` (``run_folder.load_model``)."""
    if isinstance(model_or_run, MultiAD):
        return model_or_run
    from monai_multiad.run_folder import load_model

    return load_model(model_or_run, "cpu")[0]


def inference_copy(model: MultiAD) -> MultiAD:
    """A CPU copy for export: eval mode, no gradients, input checks off, no discriminator
    (inference never calls it). The original model is left untouched."""
    net = copy.deepcopy(model).cpu()
    net.check_inputs = False
    net.discriminator = None
    net.requires_grad_(False)
    return net.eval()


def _example(model: MultiAD, image_size: int, batch: int = 2) -> torch.Tensor:
    if image_size < MultiAD.min_size:
        raise ValueError(f"image_size must be at least {MultiAD.min_size}, got {image_size}")
    return torch.rand(batch, model.in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))


def _metadata(model: MultiAD, image_size: int) -> str:
    return json.dumps({
        "backbone": model.backbone,
        "inputs": {"image": {"shape": ["B", model.in_channels, image_size, image_size], "range": [0, 1]}},
        "outputs": {"anomaly_map": ["B", 1, image_size, image_size], "score": ["B"]},
        "threshold": float(model.fusion.threshold),
        "stage_scale": [float(s) for s in model.fusion.scale],
    })


class ShapeGuard(nn.Module):
    """Scripted around the traced network: a (B, C, H, W) input of another C, H or W is an error
    (the trace would run it, but the fusion statistics and threshold hold for the exported size only)."""

    def __init__(self, net: nn.Module, channels: int, size: int) -> None:
        super().__init__()
        self.net, self.channels, self.size = net, channels, size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[2] != self.size or x.shape[3] != self.size:
            raise ValueError(
                "expected an image batch (B, " + str(self.channels) + ", " + str(self.size) + ", " + str(self.size)
                + ") in [0, 1], got shape " + str(x.shape)
            )
        return self.net(x)


def export_torchscript(
    model_or_run: MultiAD | str | Path, path: str | Path, image_size: int = 256, guard: bool = True
) -> Path:
    """Trace the inference network to a TorchScript file; returns its path.

    ``torch.jit.load(path)(x)`` with ``x`` (B, C, image_size, image_size) in [0, 1] gives
    ``(anomaly_map, score)`` like the model, for any B. With ``guard`` (default) the traced graph
    is wrapped in a scripted :class:`ShapeGuard`, so another C, H or W raises an error instead of
    giving scores on another scale than the threshold's. The file also holds ``multiad.json`` (shapes,
    threshold; read with ``torch.jit.load(path, _extra_files={"multiad.json": ""})``).
    """
    model = inference_copy(resolve_model(model_or_run))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings (python values recorded as constants), jit deprecation
        module = torch.jit.trace(model, _example(model, image_size), check_trace=False)
        if guard:
            module = torch.jit.script(ShapeGuard(module, model.in_channels, image_size))
    torch.jit.save(module, str(path), _extra_files={"multiad.json": _metadata(model, image_size)})
    return path


def _cosine_similarity_symbolic(g, x1, x2, dim, eps):
    """``aten::cosine_similarity`` as PyTorch computes it: each norm clamped to ``eps``."""
    from torch.onnx import symbolic_helper as sh

    dim, eps = sh._get_const(dim, "i", "dim"), sh._get_const(eps, "f", "eps")
    axes = g.op("Constant", value_t=torch.tensor([dim], dtype=torch.long))
    eps_t = g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float))

    def unit(x):
        norm = g.op("Sqrt", g.op("ReduceSum", g.op("Mul", x, x), axes, keepdims_i=1))
        return g.op("Div", x, g.op("Max", norm, eps_t))

    return g.op("ReduceSum", g.op("Mul", unit(x1), unit(x2)), axes, keepdims_i=0)


@contextmanager
def _faithful_cosine(opset: int):
    torch.onnx.register_custom_op_symbolic("aten::cosine_similarity", _cosine_similarity_symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::cosine_similarity", opset)


def export_onnx(
    model_or_run: MultiAD | str | Path, path: str | Path, image_size: int = 256, opset: int = 17
) -> Path:
    """Export the inference network to ONNX (legacy exporter, ``opset`` >= 13); returns the path.

    Input ``"image"`` (B, C, image_size, image_size) float32 in [0, 1]; outputs
    ``"anomaly_map"`` (B, 1, H, W) and ``"score"`` (B,); B is a dynamic axis named ``"batch"``.
    Run it with onnxruntime (``pip install monai-multiad[onnx]``)::

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        anomaly_map, score = session.run(None, {"image": images})
    """
    if opset < 13:
        raise ValueError(f"opset must be at least 13 (ReduceSum with axes as input), got {opset}")
    model = inference_copy(resolve_model(model_or_run))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad(), _faithful_cosine(opset):
        warnings.simplefilter("ignore")  # tracer and legacy-exporter deprecation warnings
        torch.onnx.export(
            model,
            (_example(model, image_size),),
            str(path),
            input_names=["image"],
            output_names=["anomaly_map", "score"],
            dynamic_axes={"image": batch, "anomaly_map": batch, "score": batch},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return path


class ExportMismatchError(RuntimeError):
    """An exported file whose anomaly map or score differs from the model's (:func:`check_export`)."""


def check_export(
    model_or_run: MultiAD | str | Path, path: str | Path, fmt: str = "torchscript", image_size: int = 256,
    batch: int = 3, atol: float = 1e-4, rtol: float = 1e-4,
) -> float:
    """Run the exported file ``path`` (``fmt`` ``"torchscript"`` or ``"onnx"``, the latter with
    onnxruntime) and the model on the same seeded batch of ``batch`` images (by default 3, another size
    than the traced batch of 2) and return the largest absolute difference of their anomaly maps and
    scores; :class:`ExportMismatchError` when one is beyond ``atol + rtol * |model's value|``."""
    model = inference_copy(resolve_model(model_or_run))
    x = torch.rand(batch, model.in_channels, image_size, image_size, generator=torch.Generator().manual_seed(1))
    if fmt not in ("torchscript", "onnx"):
        raise ValueError(f"fmt must be 'torchscript' or 'onnx', got {fmt!r}")
    with torch.no_grad():
        expected = [t.numpy() for t in model(x)]
        try:
            if fmt == "torchscript":
                got = [t.numpy() for t in torch.jit.load(str(path))(x)]
            else:
                import onnxruntime

                options = onnxruntime.SessionOptions()
                options.log_severity_level = 4  # a failing graph is reported once, below, not also in the log
                session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                got = session.run(None, {"image": x.numpy()})
        except Exception as e:  # the graph itself fails (onnxruntime's errors are its own classes)
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1 if fmt == "torchscript" else 0]
            raise ExportMismatchError(f"the exported graph fails on a test batch of {batch} images of "
                                      f"{image_size} px, which the model scores: {first}") from e
    import numpy as np

    worst = 0.0
    for name, want, have in zip(("anomaly map", "score"), expected, got):
        have = np.asarray(have)
        if have.shape != want.shape:
            raise ExportMismatchError(f"the exported {name} has shape {tuple(have.shape)}, the model's "
                                      f"{tuple(want.shape)}")
        diff = np.abs(have - want)
        worst = max(worst, float(diff.max()))
        if not np.all(diff <= atol + rtol * np.abs(want)):
            raise ExportMismatchError(f"the exported {name} differs from the model's by up to {float(diff.max()):.3g} "
                                      f"on a test batch (tolerance {atol:g} + {rtol:g} x |value|)")
    return worst


def network_def_config(model_or_run: MultiAD | str | Path) -> dict:
    """The ``network_def`` entry of a MONAI bundle config building this network (``_target_``
    plus its constructor arguments, ``pretrained: false`` since the weights come from the
    checkpoint, ``check_inputs: false`` for tracing)."""
    if isinstance(model_or_run, MultiAD):
        m = model_or_run
        fusion = m.fusion
        kwargs = {
            "backbone": m.backbone,
            "in_channels": m.in_channels,
            "student_se": _student_se(m),
            "discriminator": m.discriminator is not None,
            "fusion_mode": fusion.mode,
            "fuse": fusion.fuse,
            "sigma": fusion.sigma,
            "stages": tuple(k for k in fusion.stages if k <= len(m.teacher.out_channels)),  # the bank's, head's follow
            "score_topk": fusion.score_topk,
            "feature_norm": m.feature_norm,
            "foreground": m.foreground is not None,
            "memory_bank": int(m.memory_bank.bank.shape[0]) if m.memory_bank is not None else 0,
            "segmentation_head": m.segmentation_head is not None,
        }
        if m.discriminator is not None:
            kwargs["discriminator_channels"] = _discriminator_channels(m)
            kwargs["discriminator_spectral_norm"] = nn.utils.parametrize.is_parametrized(m.discriminator.fc)
    else:
        from monai_multiad.run_folder import load_model

        kwargs = dict(load_model(model_or_run, "cpu")[1].model_kwargs())
        kwargs["discriminator_channels"] = list(kwargs["discriminator_channels"])
    return {"_target_": "monai_multiad.networks.MultiAD", **kwargs, "pretrained": False, "check_inputs": False}


def _student_se(model: MultiAD) -> bool:
    student = model.student  # SE-ResNet-50: the stem block; Lite0 / ResNet-18: the stage blocks
    return not isinstance(student.stem_se if hasattr(student, "stem_se") else student.se[0], nn.Identity)


def _discriminator_channels(model: MultiAD) -> list[int]:
    return [m.out_channels for m in model.discriminator.features if isinstance(m, nn.Conv2d)]


def save_state_dict(run_dir_or_model: MultiAD | str | Path, path: str | Path, key: str | None = None) -> Path:
    """Write ``model.state_dict()`` (teacher, student, discriminator, fusion buffers) for MONAI's
    ``ckpt_export`` / ``CheckpointLoader``; returns the path.

    ``ckpt_export`` builds ``network_def`` from the bundle config (``_target_:
    monai_multiad.networks.MultiAD`` with the run's model options, ``pretrained: false``; see
    :func:`network_def_config`) and loads this file with ``ignite.handlers.Checkpoint.load_objects``
    (strict): a plain state dict (``key=None``, the default, with ``--key_in_ckpt`` unset) or
    ``{key: state_dict}`` (pass ``--key_in_ckpt key``, e.g. ``"model"`` as MONAI's
    ``CheckpointSaver`` writes). With the bundles' ``network_def`` (the map only, which scripts) it runs in
    its default, scripted form::

        python -m monai.bundle ckpt_export network_def --filepath model.ts \\
            --ckpt_file model_state.pt --meta_file metadata.json --config_file inference.json

    (the command line needs MONAI's optional ``fire`` package; ``monai.bundle.ckpt_export(...)``
    with the same arguments does not); ``--use_trace True --input_shape "[1, 3, 256, 256]"`` traces
    instead. The file gives the model's maps for any batch size, without :func:`export_torchscript`'s
    :class:`ShapeGuard`.
    """
    model = resolve_model(run_dir_or_model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state if key is None else {key: state}, path)
    return path
