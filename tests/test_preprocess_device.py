"""Device-side preprocessing (``monai_multiad.data.preprocess``) gives the maps and scores of the CPU path.

The reference is the CPU pipeline ``predict`` used before: ``read_image`` (float32 [0, 1] at the
source size, channels converted) -> ``resize_image`` -> the network, one image at a time ->
``restore_size`` on the CPU. The device path sends the file's own dtype at its own size, scales,
converts and resizes on the device, batches images through the network and restores the maps there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

from monai_multiad.config import RunConfig
from monai_multiad.data.images import read_image, read_image_array, resize_image, restore_size
from monai_multiad.data.preprocess import DevicePreprocessor, _PinnedStaging
from monai_multiad.data.synthetic_images import make_texture, write_png
from monai_multiad.errors import MultiADInputError
from monai_multiad.inference import score_images
from monai_multiad.networks import MultiAD

SIZE = 64
TOL = 1e-5
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _tiny_model(in_channels: int) -> MultiAD:
    torch.manual_seed(0)
    model = MultiAD("resnet18", in_channels=in_channels, pretrained=False, discriminator=False)
    model.fusion.set_statistics(torch.tensor([0.02, 0.05, 0.1, 0.2]), threshold=1.0)
    return model.eval()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    """One file of each kind a user brings: 8-bit RGB and gray, 16-bit gray and RGB, float TIFF (with
    a NaN), JPEG; larger, smaller and equal to the network's size; and a broken file among them."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)

    def tex(h, w, channels, seed):  # float [0, 1], (H, W) or (H, W, 3)
        t = make_texture((h, w), seed=seed, channels=channels)
        return t if channels == 1 else np.moveaxis(t, 0, -1)

    Image.fromarray((tex(96, 80, 3, 1) * 255).astype(np.uint8)).save(d / "a_rgb8.png")
    Image.fromarray((tex(70, 75, 1, 2) * 255).astype(np.uint8)).save(d / "b_gray8.png")
    Image.fromarray((tex(64, 64, 1, 3) * 65535).astype(np.uint16)).save(d / "c_gray16.png")  # the network's size
    write_png(d / "d_rgb16.png", (tex(50, 41, 3, 4) * 65535).astype(np.uint16))  # upsampled on the way in
    f = tex(80, 96, 1, 5) * 1.2 - 0.1  # clipped at 0 and 1
    f[3, 4] = np.nan
    tifffile.imwrite(d / "e_float.tif", f.astype(np.float32))
    (d / "f_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(d / "g_rgb8.jpg", quality=90)
    Image.fromarray((tex(96, 80, 3, 6) * 255).astype(np.uint8)).save(d / "h_rgb8.png")  # same shape as a_rgb8
    # exactly twice the network's size: the written-out 2x antialiased resize (preprocess._halve_sums)
    Image.fromarray((tex(2 * SIZE, 2 * SIZE, 3, 7) * 255).astype(np.uint8)).save(d / "i_rgb8_2x.png")
    Image.fromarray((tex(2 * SIZE, 2 * SIZE, 1, 8) * 65535).astype(np.uint16)).save(d / "j_gray16_2x.png")
    f2 = tex(2 * SIZE, 2 * SIZE, 1, 9) * 1.2 - 0.1
    tifffile.imwrite(d / "k_float_2x.tif", f2.astype(np.float32))
    return sorted(d.iterdir())


@torch.no_grad()
def _cpu_reference(model: MultiAD, path: Path, in_channels: int):
    """The CPU path of ``predict`` before device-side preprocessing, one image at a time."""
    image = read_image(path, channels=in_channels)
    x = resize_image(torch.from_numpy(image), (SIZE, SIZE))[None]
    amap, score = model(x.clamp(0, 1))
    return np.asarray(restore_size(amap[0], image.shape[-2:]))[0], float(score[0]), image


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_device_path_gives_the_cpu_maps_and_scores(image_files, in_channels, device):
    model = _tiny_model(in_channels)
    cfg = RunConfig(image_size=SIZE, in_channels=in_channels, batch_size=3)
    results = list(score_images(model.to(device), cfg, image_files, device))
    model.cpu()
    assert [Path(r["path"]) for r in results] == image_files  # in order, the broken file in its place
    for path, r in zip(image_files, results):
        if path.name == "f_broken.png":
            assert "error" in r and "f_broken.png" in r["error"]
            continue
        ref_map, ref_score, ref_image = _cpu_reference(model, path, in_channels)
        assert r["map"].shape == ref_map.shape == ref_image.shape[-2:], path.name
        np.testing.assert_allclose(r["map"], ref_map, rtol=0, atol=TOL, err_msg=path.name)
        assert r["score"] == pytest.approx(ref_score, abs=TOL), path.name
        np.testing.assert_array_equal(r["image"], ref_image)
        assert ref_map.max() > 0.1  # maps that are not trivially equal


@pytest.mark.parametrize("staged", [False, True])
def test_network_input_equals_read_and_resize(image_files, staged):
    """The batch given to the network equals ``read_image`` + ``resize_image`` + clamp, image by image,
    whether the bytes go straight to the device or through the (here unpinned) staging buffer."""
    files = [p for p in image_files if p.name != "f_broken.png"]
    arrays = [read_image_array(p) for p in files]
    for channels in (1, 3):
        prep = DevicePreprocessor(SIZE, channels, "cpu")
        if staged:
            prep._staging = _PinnedStaging(pin=False)
        for _ in range(2):  # the staging buffer is reused on the second call
            x = prep(arrays)
            assert x.shape == (len(files), channels, SIZE, SIZE) and x.dtype == torch.float32
            for i, p in enumerate(files):
                ref = resize_image(torch.from_numpy(read_image(p, channels=channels)), (SIZE, SIZE)).clamp(0, 1)
                torch.testing.assert_close(x[i], ref, rtol=0, atol=1e-6, msg=p.name)


def test_every_dtype_is_scaled_as_read_image_scales_it():
    from monai_multiad.data.images import unit_image

    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 255, (40, 36, 1), dtype=np.uint8), rng.integers(0, 65535, (40, 36, 1), dtype=np.uint16),
              rng.integers(-32768, 32767, (40, 36, 1), dtype=np.int16),
              rng.integers(-9, 9, (40, 36, 1)).astype(np.int8),
              rng.integers(0, 2**31 - 1, (40, 36, 1), dtype=np.int32), rng.random((40, 36, 1)) > 0.5,
              rng.integers(0, 2**32 - 1, (40, 36, 1), dtype=np.uint32),
              (rng.random((40, 36, 1)) * 1.4 - 0.2).astype(np.float16), rng.random((40, 36, 1)) * 1.4 - 0.2]
    prep = DevicePreprocessor((40, 36), 1, "cpu")  # the source size: no resize, the scaling alone
    x = prep(arrays)
    for i, a in enumerate(arrays):
        np.testing.assert_allclose(x[i].numpy(), unit_image(a, 1), rtol=0, atol=1e-6, err_msg=str(a.dtype))


def test_maps_restored_on_the_device_equal_restore_size():
    prep = DevicePreprocessor(SIZE, 3, "cpu")
    maps = torch.rand(3, 1, SIZE, SIZE)
    sizes = [(100, 90), (SIZE, SIZE), (30, 20)]
    for m, out, hw in zip(maps, prep.restore(maps, sizes), sizes):
        np.testing.assert_allclose(out, restore_size(m, hw)[0].numpy(), rtol=0, atol=1e-7)
    with pytest.raises(ValueError):
        prep.restore(maps, sizes[:2])


def test_unreadable_file_is_reported_not_raised(image_files, tmp_path):
    model = _tiny_model(3)
    only_broken = [p for p in image_files if p.name == "f_broken.png"]
    (r,) = score_images(model, RunConfig(image_size=SIZE, in_channels=3), only_broken, "cpu")
    assert set(r) == {"path", "error"}
    with pytest.raises(MultiADInputError):
        read_image_array(only_broken[0])


def test_exact_2x_resize_is_taken_when_the_source_is_twice_the_size():
    """The preprocessor takes the written-out 2x resize exactly when the source is twice the size (the
    resize itself: the next test)."""
    from monai_multiad.data.preprocess import _halves

    assert _halves((512, 512), (256, 256)) and _halves((8, 6), (4, 3))
    assert not _halves((512, 510), (256, 256)) and not _halves((2, 2), (1, 1)) and not _halves((256, 256), (256, 256))


@pytest.mark.parametrize("shape", [(2, 3, 512, 512), (1, 3, 8, 6), (3, 1, 4, 100), (2, 3, 130, 62), (1, 2, 6, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_exact_2x_resize_as_plain_sums_is_the_antialiased_bilinear_resize(shape, channels_last):
    """``_halve_sums`` (8 x the 2x resize along an axis, the preprocessor's path) on both axes, divided by 64, equals
    ``F.interpolate(bilinear, antialias=True)`` to 2x down on 0-255 values (2 ulp), also where an axis halves
    to 2 or 3 (the ends' own taps), whatever the layout, and writes the layout it is given."""
    from monai_multiad.data.preprocess import _halve_sums

    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, shape).astype(np.float32))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    half = (shape[2] // 2, shape[3] // 2)
    ref = F.interpolate(x, size=half, mode="bilinear", align_corners=False, antialias=True)
    out = torch.empty(shape[0], shape[1], *half)
    y = _halve_sums(_halve_sums(x, 2), 3, out=out)
    assert y.data_ptr() == out.data_ptr() and y.is_contiguous()
    torch.testing.assert_close(y / 64, ref, rtol=0, atol=4e-5)
    exact = F.interpolate(x.double(), size=half, mode="bilinear", align_corners=False, antialias=True)
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert torch.equal((y / 64)[interior].double(), exact[interior])  # integer sums: the interior is exact


@pytest.mark.parametrize("channels", [1, 3, None])
def test_cpu_batch_of_interleaved_shapes_equals_image_by_image(channels):
    """On the CPU each chunk is converted from its own arrays and, for an exact 2x resize, written into its rows
    of the batch: with shapes and dtypes interleaved (groups whose images are not consecutive), chunks of
    one or several images, every row is the image converted alone."""
    from monai_multiad.data import preprocess

    rng = np.random.default_rng(3)
    c = 3 if channels is None else channels
    arrays = [rng.integers(0, 256, (64, 64, c), dtype=np.uint8), rng.integers(0, 256, (40, 48, c), dtype=np.uint8),
              rng.integers(0, 256, (64, 64, c), dtype=np.uint8), rng.integers(0, 65536, (64, 64, c), dtype=np.uint16),
              rng.integers(0, 256, (64, 64, c), dtype=np.uint8), rng.integers(0, 256, (64, 64, c), dtype=np.uint8)]
    prep = DevicePreprocessor(32, channels, "cpu")
    alone = torch.cat([prep([a]) for a in arrays])
    for chunk in (preprocess._CPU_CHUNK_BYTES, 1, 2 * 64 * 64 * c * 4):
        preprocess._CPU_CHUNK_BYTES, saved = chunk, preprocess._CPU_CHUNK_BYTES
        try:
            torch.testing.assert_close(prep(arrays), alone, rtol=0, atol=0)
            torch.testing.assert_close(prep(arrays[4:]), alone[4:], rtol=0, atol=0)  # consecutive: written in place
        finally:
            preprocess._CPU_CHUNK_BYTES = saved


def test_cpu_chunks_give_the_whole_batch_at_once(image_files, monkeypatch):
    """On the CPU images are converted a few at a time (to stay in cache); any chunk size gives the same batch."""
    from monai_multiad.data import preprocess

    files = [p for p in image_files if p.name != "f_broken.png"]
    arrays = [read_image_array(p) for p in files] + [np.random.default_rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8)
                                                       for _ in range(5)]  # one group of six 2x images
    whole = DevicePreprocessor(SIZE, 3, "cpu")(arrays)
    for chunk in (1, 2 * 128 * 128 * 3 * 4):  # one image at a time; two of the 2x ones at a time
        monkeypatch.setattr(preprocess, "_CPU_CHUNK_BYTES", chunk)
        torch.testing.assert_close(DevicePreprocessor(SIZE, 3, "cpu")(arrays), whole, rtol=0, atol=0)
        torch.testing.assert_close(DevicePreprocessor(SIZE, 3, "cpu")(arrays[-5:]), whole[-5:], rtol=0, atol=0)
