"""Exported graphs (TorchScript, ONNX, MONAI ``ckpt_export``) give the trained model's maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monai_multiad.config import RunConfig
from monai_multiad.export import (
    export_onnx,
    export_torchscript,
    network_def_config,
    save_state_dict,
)
from monai_multiad.networks import MultiAD
from monai_multiad.workflow import save_model

SIZE = 64
TOL = 1e-4


def _tiny() -> MultiAD:
    torch.manual_seed(0)
    model = MultiAD("resnet18", pretrained=False, discriminator_channels=(8,)).eval()
    model.fusion.set_statistics(torch.tensor([0.11, 0.23, 0.37, 0.52]), threshold=1.0)
    return model


@pytest.fixture(scope="module")
def model() -> MultiAD:
    return _tiny()


def _batch(n: int, channels: int = 3, size: int = SIZE) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(n))


def _max_diff(model: MultiAD, run, batches=(1, 2, 3)) -> float:
    """Max abs difference of maps and scores between ``model`` and ``run(x) -> (map, score)``."""
    worst = 0.0
    for n in batches:
        x = _batch(n, model.in_channels)
        with torch.no_grad():
            ref_map, ref_score = model(x)
        amap, score = run(x)
        assert tuple(amap.shape) == (n, 1, SIZE, SIZE) and tuple(score.shape) == (n,)
        worst = max(worst, float(np.abs(ref_map.numpy() - np.asarray(amap)).max()),
                    float(np.abs(ref_score.numpy() - np.asarray(score)).max()))
    return worst


def _ts_runner(path):
    ts = torch.jit.load(str(path))

    def run(x):
        with torch.no_grad():
            amap, score = ts(x)
        return amap.numpy(), score.numpy()

    return run


def test_torchscript_same_maps_any_batch(model, tmp_path):
    path = export_torchscript(model, tmp_path / "model.ts", image_size=SIZE)
    assert _max_diff(model, _ts_runner(path)) < TOL  # traced at batch 2; 1 and 3 work too
    assert model.check_inputs and model.discriminator is not None  # the model itself is untouched
    with pytest.raises(Exception, match=r"expected an image batch \(B, 3, 64, 64\)"):
        torch.jit.load(str(path))(_batch(2, size=2 * SIZE))  # the threshold holds at the exported size only
    extra = {"multiad.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["multiad.json"])
    assert meta["threshold"] == 1.0 and meta["inputs"]["image"]["shape"][2:] == [SIZE, SIZE]


def test_the_trace_follows_the_input_size(model, tmp_path):
    """Tracing records the map size as the input's size, not a constant (fusion.stage_anomaly_maps takes
    no int()): without the guard, another size gives the model's maps at that size."""
    traced = torch.jit.load(str(export_torchscript(model, tmp_path / "bare.ts", image_size=SIZE, guard=False)))
    x = _batch(1, size=SIZE + 32)
    with torch.no_grad():
        (amap, score), (ref_map, ref_score) = traced(x), model(x)
    assert amap.shape == (1, 1, SIZE + 32, SIZE + 32)
    assert float((amap - ref_map).abs().max()) < TOL and float((score - ref_score).abs().max()) < TOL


def test_onnx_same_maps_dynamic_batch(model, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is optional: pip install monai-multiad[onnx]")
    path = export_onnx(model, tmp_path / "model.onnx", image_size=SIZE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["anomaly_map", "score"]
    assert session.get_inputs()[0].shape[0] == "batch"
    assert _max_diff(model, lambda x: session.run(None, {"image": x.numpy()})) < TOL


def test_onnx_tiny_student_features(tmp_path):
    """An untrained Lite0-like case: feature norms far below eps where the legacy exporter's
    cosine (clamping |a|*|b|) differs from PyTorch's (clamping each norm)."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is optional: pip install monai-multiad[onnx]")
    model = _tiny()
    with torch.no_grad():
        for p in model.student.parameters():
            p.mul_(1e-3)
    path = export_onnx(model, tmp_path / "model.onnx", image_size=SIZE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert _max_diff(model, lambda x: session.run(None, {"image": x.numpy()}), batches=(2,)) < TOL


def test_ckpt_export_from_run_folder(model, tmp_path):
    """MONAI's ``ckpt_export`` builds ``network_def`` from a config, loads our state-dict file
    and traces: the .ts gives the model's maps."""
    from monai.bundle import ckpt_export

    cfg = RunConfig(backbone="resnet18", pretrained="none", discriminator=True, discriminator_channels=[8],
                    image_size=SIZE, memory_bank=0, segmentation_head_steps=0)  # the fixture's model
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_model(run_dir / "model.pt", model, cfg)
    assert network_def_config(run_dir) == network_def_config(model)

    ckpt = save_state_dict(run_dir, tmp_path / "model_state.pt")
    nested = save_state_dict(model, tmp_path / "model_nested.pt", key="model")
    config = tmp_path / "inference.json"
    config.write_text(json.dumps({"network_def": network_def_config(run_dir)}))
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps({"version": "0.1.0", "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 3, "spatial_shape": [SIZE, SIZE]}},
        "outputs": {"pred": {"type": "image", "num_channels": 1, "spatial_shape": [SIZE, SIZE]}}}}))
    out = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(out), ckpt_file=str(ckpt), meta_file=str(meta),
                config_file=str(config), use_trace=True, input_shape=[1, 3, SIZE, SIZE])
    assert _max_diff(model, _ts_runner(out), batches=(1, 3)) < TOL  # traced at batch 1; batch 3 runs too

    # the nested form {"model": state_dict} loads as ckpt_export does with --key_in_ckpt model
    from ignite.handlers import Checkpoint
    from monai.bundle import ConfigParser

    net = ConfigParser({"network_def": network_def_config(model)}).get_parsed_content("network_def")
    Checkpoint.load_objects(to_load={"model": net}, checkpoint=str(nested))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in net.state_dict().items())

    # a spectrally normalised discriminator has other parameters: the config names it, so they load strictly
    sn = MultiAD("resnet18", pretrained=False, discriminator_channels=(8,), discriminator_spectral_norm=True)
    assert network_def_config(sn)["discriminator_spectral_norm"] is True
    ConfigParser({"network_def": network_def_config(sn)}).get_parsed_content("network_def").load_state_dict(
        sn.state_dict())


def test_lite0_pretrained_export(tmp_path):
    """EfficientNet-Lite0 (static same padding, ReLU6) exports to TorchScript and ONNX."""
    torch.manual_seed(0)
    model = MultiAD("efficientnet_lite0", pretrained=True, discriminator_channels=(8,)).eval()
    model.fusion.set_statistics(torch.tensor([0.4, 0.6, 0.8, 0.9]), threshold=2.0)
    path = export_torchscript(model, tmp_path / "lite0.ts", image_size=SIZE)
    assert _max_diff(model, _ts_runner(path), batches=(1, 3)) < TOL
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is optional: pip install monai-multiad[onnx]")
    path = export_onnx(model, tmp_path / "lite0.onnx", image_size=SIZE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert _max_diff(model, lambda x: session.run(None, {"image": x.numpy()}), batches=(1, 3)) < TOL


def test_grayscale_model_exports(tmp_path):
    torch.manual_seed(0)
    model = MultiAD("resnet18", in_channels=1, pretrained=False, discriminator=False, sigma=0.0).eval()
    path = export_torchscript(model, tmp_path / "gray.ts", image_size=SIZE)
    assert _max_diff(model, _ts_runner(path), batches=(2,)) < TOL
    assert network_def_config(model)["in_channels"] == 1 and network_def_config(model)["sigma"] == 0.0
