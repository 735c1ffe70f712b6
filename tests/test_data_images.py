"""2D image reading (data.decoding), dataset layouts (data.layouts), the resizing dataset (data.images)
and the synthetic MVTec writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import monai_multiad.data
import monai_multiad.data.images
from monai_multiad.data.decoding import read_image, read_mask
from monai_multiad.data.images import AnomalyImageDataset, check_mask_size, check_masks, restore_size
from monai_multiad.data.layouts import (
    bmad_samples,
    detect_layout,
    folder_samples,
    list_images,
    mvtec_samples,
    samples_for,
    split_normals,
)
from monai_multiad.data.synthetic_images import make_texture, plant_defect, write_mvtec_dataset, write_png
from monai_multiad.errors import MultiADInputError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MAGNETIC_TILE = SHARED_DATA / "magnetic_tile"


def _rgb8(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _touch_png(path: Path, size=(16, 16), value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def _mask_png(path: Path, size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(size, np.uint8)
    m[4:8, 4:8] = 255
    Image.fromarray(m).save(path)
    return path


# ----------------------------------------------------------------------------- reading


def test_read_rgb_and_gray_8bit_png(tmp_path):
    rgb = _rgb8()
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    img = read_image(tmp_path / "rgb.png")
    assert img.dtype == np.float32 and img.shape == (3, 20, 30)
    np.testing.assert_allclose(img, np.moveaxis(rgb, -1, 0) / 255.0, atol=1e-6)

    gray = rgb[..., 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    img = read_image(tmp_path / "gray.png")
    assert img.shape == (1, 20, 30)
    np.testing.assert_allclose(img[0], gray / 255.0, atol=1e-6)
    assert 0.0 <= img.min() and img.max() <= 1.0


def test_read_16bit_png_gray_and_rgb(tmp_path):
    g = np.zeros((8, 9), np.uint16)
    g[0, 0] = 65535
    g[1, 1] = 32768
    Image.fromarray(g).save(tmp_path / "g16.png")
    img = read_image(tmp_path / "g16.png")
    assert img.shape == (1, 8, 9)
    assert img[0, 0, 0] == 1.0 and img[0, 2, 2] == 0.0
    assert img[0, 1, 1] == pytest.approx(32768 / 65535, abs=1e-6)  # full 16-bit precision

    rgb = np.zeros((8, 9, 3), np.uint16)
    rgb[0, 0] = 65535
    write_png(tmp_path / "rgb16.png", rgb)  # PIL cannot write 16-bit RGB
    img = read_image(tmp_path / "rgb16.png")
    assert img.shape == (3, 8, 9)
    assert np.all(img[:, 0, 0] == 1.0) and img[:, 1:, 1:].max() == 0.0


def test_read_jpeg_bmp_tiff(tmp_path):
    rgb = np.full((24, 32, 3), (200, 100, 50), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    img = read_image(tmp_path / "a.jpg")
    assert img.shape == (3, 24, 32)
    np.testing.assert_allclose(img.mean(axis=(1, 2)), np.array([200, 100, 50]) / 255.0, atol=0.03)

    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.JPEG")
    assert read_image(tmp_path / "g.JPEG").shape == (1, 24, 32)

    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    np.testing.assert_allclose(read_image(tmp_path / "a.bmp"), np.moveaxis(rgb, -1, 0) / 255.0, atol=1e-6)

    t16 = np.zeros((10, 11, 3), np.uint16)
    t16[2, 3] = (65535, 0, 65535)
    tifffile.imwrite(tmp_path / "rgb16.tif", t16)
    img = read_image(tmp_path / "rgb16.tif")
    assert img.shape == (3, 10, 11) and img[0, 2, 3] == 1.0 and img[1, 2, 3] == 0.0

    tifffile.imwrite(tmp_path / "g16.tiff", np.full((5, 6), 65535, np.uint16))
    img = read_image(tmp_path / "g16.tiff")
    assert img.shape == (1, 5, 6) and np.all(img == 1.0)

    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_allclose(read_image(tmp_path / "planar.tif"), np.moveaxis(rgb, -1, 0) / 255.0, atol=1e-6)

    # LZW needs imagecodecs in tifffile: PIL is the fallback
    Image.fromarray(rgb).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    np.testing.assert_allclose(read_image(tmp_path / "lzw.tif"), np.moveaxis(rgb, -1, 0) / 255.0, atol=1e-6)


def test_read_rgba_palette_and_channels(tmp_path):
    rgba = np.zeros((6, 7, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 10
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    img = read_image(tmp_path / "rgba.png")
    assert img.shape == (3, 6, 7) and np.all(img[0] == 1.0) and np.all(img[1:] == 0.0)

    pal = Image.fromarray(_rgb8(6, 7)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.save(tmp_path / "pal.png")
    img = read_image(tmp_path / "pal.png")
    np.testing.assert_allclose(img, np.moveaxis(np.array(pal.convert("RGB")), -1, 0) / 255.0, atol=1e-6)

    Image.fromarray(np.full((4, 5), 51, np.uint8)).save(tmp_path / "g.png")
    three = read_image(tmp_path / "g.png", channels=3)
    assert three.shape == (3, 4, 5) and np.all(three == three[:1])
    one = read_image(tmp_path / "rgba.png", channels=1)
    assert one.shape == (1, 6, 7)
    np.testing.assert_allclose(one, 0.299, atol=1e-6)  # luminance of pure red


def test_read_mask(tmp_path):
    m = np.zeros((5, 6), np.uint8)
    m[1, 2] = 1
    m[3, 4] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    assert mask.dtype == bool and mask.shape == (5, 6) and mask.sum() == 2

    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 3] = 255  # opaque alpha must not count
    rgba[0, 0, 2] = 7  # only the blue channel set
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    mask = read_mask(tmp_path / "rgba.png")
    assert mask.shape == (5, 6) and mask.sum() == 1 and mask[0, 0]


def test_bad_files_raise_naming_the_path(tmp_path):
    Image.fromarray(_rgb8(64, 64)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(MultiADInputError, match="cannot read image") as err:
        read_image(tmp_path / "cut.png")
    assert str(tmp_path / "cut.png") in str(err.value)

    Image.fromarray(_rgb8(64, 64)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(MultiADInputError, match="cannot read image") as err:
        read_image(tmp_path / "cut.jpg")
    assert str(tmp_path / "cut.jpg") in str(err.value)

    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    with pytest.raises(MultiADInputError, match="cannot read image") as err:
        read_mask(tmp_path / "junk.png")
    assert str(tmp_path / "junk.png") in str(err.value)

    (tmp_path / "junk.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(MultiADInputError, match="cannot read image") as err:
        read_image(tmp_path / "junk.tif")
    assert str(tmp_path / "junk.tif") in str(err.value)

    with pytest.raises(MultiADInputError, match="not found") as err:
        read_image(tmp_path / "missing.png")
    assert str(tmp_path / "missing.png") in str(err.value)


# ----------------------------------------------------------------------------- layouts


def test_mvtec_layout_from_synthetic(tmp_path):
    root = write_mvtec_dataset(tmp_path / "cat", n_train=6, n_test_good=3, n_test_defect=5, size=32, channels=1)
    assert detect_layout(root) == "mvtec"
    train = samples_for(root, "train")
    assert len(train) == 6 and all(s["label"] == 0 and s["mask"] is None and s["defect"] == "good" for s in train)
    assert [Path(s["image"]).name for s in train] == [f"{i:03d}.png" for i in range(6)]
    test = mvtec_samples(root, "test")
    assert set(test[0]) == {"image", "mask", "label", "defect", "name"}
    assert len(test) == 8
    good = [s for s in test if s["defect"] == "good"]
    bad = [s for s in test if s["label"] == 1]
    assert len(good) == 3 and all(s["label"] == 0 and s["mask"] is None for s in good)
    assert {s["defect"] for s in bad} == {"scratch", "blob"} and len(bad) == 5
    for s in bad:
        assert s["mask"] == str(root / "ground_truth" / s["defect"] / f"{Path(s['image']).stem}_mask.png")
        assert read_mask(s["mask"]).any()
    assert len({s["name"] for s in test}) == len(test)
    with pytest.raises(MultiADInputError, match="valid"):
        samples_for(root, "valid")


def test_mvtec_missing_mask_and_size_mismatch(tmp_path):
    root = write_mvtec_dataset(tmp_path / "cat", n_train=2, n_test_good=1, n_test_defect=2, size=32, channels=3)
    (root / "ground_truth" / "blob" / "000_mask.png").unlink()
    test = mvtec_samples(root, "test")
    blob = next(s for s in test if s["defect"] == "blob")
    assert blob["label"] == 1 and blob["mask"] is None
    item = AnomalyImageDataset([blob], image_size=16)[0]
    assert item["label"] == 1 and item["mask"].sum() == 0 and item["has_mask"] is False

    scratch = next(s for s in test if s["defect"] == "scratch")
    _mask_png(Path(scratch["mask"]), size=(20, 32))
    with pytest.raises(MultiADInputError) as err:
        AnomalyImageDataset([scratch], image_size=16)[0]
    msg = str(err.value)
    assert scratch["mask"] in msg and scratch["image"] in msg and "20x32" in msg and "32x32" in msg


def test_mask_of_same_aspect_ratio_is_resized_other_aspect_is_refused(tmp_path):
    root = write_mvtec_dataset(tmp_path / "cat", n_train=2, n_test_good=1, n_test_defect=1, size=32, channels=1)
    scratch = next(s for s in mvtec_samples(root, "test") if s["defect"] == "scratch")
    _mask_png(Path(scratch["mask"]), size=(16, 16))  # half resolution: resized with its image
    check_masks([scratch])
    item = AnomalyImageDataset([scratch], image_size=None)[0]
    assert item["mask"].shape == (1, 32, 32) and item["mask"].sum() == 64  # the 4x4 square, twice the size
    assert AnomalyImageDataset([scratch], image_size=8)[0]["mask"].shape == (1, 8, 8)
    check_mask_size((375, 500), (751, 1000), "m.png", "i.png")  # one mask pixel of rounding
    _mask_png(Path(scratch["mask"]), size=(32, 16))  # another aspect ratio: a wrong pairing
    for check in (lambda: check_masks([scratch]), lambda: AnomalyImageDataset([scratch], image_size=8)[0]):
        with pytest.raises(MultiADInputError) as err:
            check()
        msg = str(err.value)
        assert msg.startswith(scratch["mask"]) and scratch["image"] in msg and "32x16" in msg and "32x32" in msg


def _plain_folders(root: Path, n_good: int = 7, normal_test: bool = False) -> Path:
    for i in range(n_good):
        _touch_png(root / "good" / f"{i:02d}.png")
    for name in ("a.png", "b.png"):
        _touch_png(root / "crack" / name)
    _touch_png(root / "dent" / "c.png")
    _mask_png(root / "mask" / "crack" / "a_mask.png")
    if normal_test:
        _touch_png(root / "normal_test" / "n.png")
    return root


def test_plain_folder_layout(tmp_path):
    root = _plain_folders(tmp_path / "parts")
    assert detect_layout(root) == "folder"
    train, test = samples_for(root, "train"), samples_for(root, "test", "folder")
    assert [Path(s["image"]).name for s in train] == ["00.png", "01.png", "02.png", "03.png", "05.png", "06.png"]
    normals = [Path(s["image"]).name for s in test if s["label"] == 0]
    assert normals == ["04.png"]  # every fifth by name: kept out of training
    anomalous = {Path(s["image"]).name: s for s in test if s["label"] == 1}
    assert sorted(anomalous) == ["a.png", "b.png", "c.png"]
    assert anomalous["a.png"]["mask"].endswith("a_mask.png") and anomalous["b.png"]["mask"] is None
    assert anomalous["c.png"]["defect"] == "dent"

    with_normal_test = _plain_folders(tmp_path / "parts2", normal_test=True)
    assert len(samples_for(with_normal_test, "train")) == 7
    assert [Path(s["image"]).name for s in samples_for(with_normal_test, "test") if s["label"] == 0] == ["n.png"]
    with pytest.raises(MultiADInputError, match="valid"):
        samples_for(root, "valid")


def test_the_layout_given_is_the_layout_read(tmp_path):
    mvtec = write_mvtec_dataset(tmp_path / "cat", n_train=2, n_test_good=1, n_test_defect=2, size=16)
    assert len(samples_for(mvtec, "train", "mvtec")) == 2
    with pytest.raises(MultiADInputError) as err:
        samples_for(mvtec, "train", "folder")
    assert str(mvtec / "good") in str(err.value)
    with pytest.raises(MultiADInputError, match="valid folder not found"):
        samples_for(mvtec, "valid", "bmad")
    plain = _plain_folders(tmp_path / "parts")
    with pytest.raises(MultiADInputError) as err:
        samples_for(plain, "train", "mvtec")
    assert str(plain / "train" / "good") in str(err.value)
    with pytest.raises(MultiADInputError, match="unknown image layout"):
        samples_for(plain, "train", "volumes")


def test_folder_layout(tmp_path):
    normal, abnormal, masks = tmp_path / "ok", tmp_path / "defect", tmp_path / "masks"
    for name in ("b.png", "a.PNG", "c.JPG", ".hidden.png", "notes.txt"):
        if name.endswith(".txt"):
            normal.mkdir(exist_ok=True)
            (normal / name).write_text("x")
        else:
            _touch_png(normal / name)
    for name in ("x.png", "y.png", "z.bmp"):
        _touch_png(abnormal / name)
    _mask_png(masks / "x_mask.png")
    _mask_png(masks / "y.png")
    train = folder_samples(normal, split="train")
    assert [Path(s["image"]).name for s in train] == ["a.PNG", "b.png", "c.JPG"]
    test = folder_samples(normal, abnormal, masks, split="test")
    assert [s["label"] for s in test] == [0, 0, 0, 1, 1, 1]
    by = {Path(s["image"]).name: s for s in test}
    assert by["x.png"]["mask"] == str(masks / "x_mask.png")
    assert by["y.png"]["mask"] == str(masks / "y.png")
    assert by["z.bmp"]["mask"] is None and by["z.bmp"]["defect"] == "defect"
    assert list_images(normal) == [normal / "a.PNG", normal / "b.png", normal / "c.JPG"]


def _bmad(root: Path, img_level: bool = True):
    train = root / "train" / "good" / ("img" if img_level else "")
    for i in range(4):
        _touch_png(train / f"{i}.png")
    for split in ("valid", "test"):
        for i in range(2):
            _touch_png(root / split / "good" / "img" / f"g{i}.png")
            _touch_png(root / split / "good" / "label" / f"g{i}.png", value=0)
        for i in range(3):
            _touch_png(root / split / "Ungood" / "img" / f"u{i}.png")
        for i in range(2):  # u2 has no mask
            _mask_png(root / split / "Ungood" / "label" / f"u{i}.png")


@pytest.mark.parametrize("img_level", [True, False])
def test_bmad_layout(tmp_path, img_level):
    root = tmp_path / "brain"
    _bmad(root, img_level)
    assert detect_layout(root) == "bmad"
    train = samples_for(root, "train")
    assert len(train) == 4 and all(s["label"] == 0 for s in train)
    for split in ("valid", "test"):
        s = bmad_samples(root, split)
        assert [x["label"] for x in s] == [0, 0, 1, 1, 1]
        assert s[0]["mask"] is None  # good/label is ignored
        assert s[2]["mask"] == str(root / split / "Ungood" / "label" / "u0.png")
        assert s[4]["mask"] is None and s[4]["defect"] == "Ungood"
    ds = AnomalyImageDataset(bmad_samples(root, "test"), image_size=8, in_channels=1)
    assert ds[2]["mask"].sum() > 0 and ds[2]["image"].shape == (1, 8, 8)


def test_detect_layout_finds_volume_folders(tmp_path):
    """The one layout detector also knows volume folders, which the 2D sample lists refuse by name."""
    flat, nested, listed = tmp_path / "flat", tmp_path / "nested", tmp_path / "listed"
    for folder in (flat, nested / "case1", listed):
        folder.mkdir(parents=True)
    (flat / "case1.NII.GZ").write_bytes(b"")
    (nested / "case1" / "t1.nii").write_bytes(b"")
    (listed / "splits.json").write_text("{}")
    (listed / "train" / "good").mkdir(parents=True)  # splits.json wins over a 2D-looking folder
    assert [detect_layout(root) for root in (flat, nested, listed)] == ["volumes"] * 3
    with pytest.raises(MultiADInputError, match="folder of volumes") as err:
        samples_for(flat, "train")
    assert str(flat) in str(err.value)


def test_public_names_are_importable_from_the_package_and_images():
    for name in monai_multiad.data.images.__all__:
        assert getattr(monai_multiad.data, name) is getattr(monai_multiad.data.images, name)


def test_layout_errors_name_the_folder(tmp_path):
    with pytest.raises(MultiADInputError, match="not found") as err:
        detect_layout(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)

    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    with pytest.raises(MultiADInputError, match="unknown dataset layout") as err:
        samples_for(other, "train")
    msg = str(err.value)
    assert str(other) in msg and "MVTec" in msg and "BMAD" in msg and "images/" in msg

    empty = tmp_path / "cat"
    (empty / "train" / "good").mkdir(parents=True)
    (empty / "test" / "good").mkdir(parents=True)
    (empty / "train" / "good" / ".DS_Store").write_bytes(b"")
    assert detect_layout(empty) == "mvtec"
    with pytest.raises(MultiADInputError, match="no image files") as err:
        samples_for(empty, "train")
    assert str(empty / "train" / "good") in str(err.value)

    with pytest.raises(MultiADInputError, match="not found") as err:
        folder_samples(tmp_path / "missing_normals", split="train")
    assert str(tmp_path / "missing_normals") in str(err.value)

    with pytest.raises(MultiADInputError, match="split"):
        mvtec_samples(empty, "training")


# ----------------------------------------------------------------------------- dataset


def test_dataset_resizing_masks_and_cache(tmp_path):
    root = write_mvtec_dataset(tmp_path / "cat", n_train=2, n_test_good=1, n_test_defect=2, size=48, channels=3)
    test = mvtec_samples(root, "test")
    ds = AnomalyImageDataset(test, image_size=(20, 36), cache=True)
    item = ds[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 20, 36)
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["mask"].shape == (1, 20, 36)
    assert set(torch.unique(item["mask"]).tolist()) == {0.0, 1.0}  # nearest keeps it binary
    assert item["label"] == 1 and item["path"] == test[0]["image"]
    assert tuple(item["original_size"].tolist()) == (48, 48)
    again = ds[0]
    assert torch.equal(again["image"], item["image"]) and 0 in ds._cache
    again["image"].zero_()  # callers may modify items in place without touching the cache
    assert torch.equal(ds[0]["image"], item["image"])

    gray = AnomalyImageDataset(test, image_size=16, in_channels=1)[0]["image"]
    assert gray.shape == (1, 16, 16)

    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 20, 36) and batch["original_size"].shape == (3, 2)


def test_gray_image_repeated_to_rgb(tmp_path):
    Image.fromarray(np.full((30, 40), 200, np.uint8)).save(tmp_path / "g.png")
    s = folder_samples(tmp_path, split="train")
    img = AnomalyImageDataset(s, image_size=16, in_channels=3)[0]["image"]
    assert img.shape == (3, 16, 16)
    assert torch.allclose(img[0], img[1]) and torch.allclose(img, torch.full_like(img, 200 / 255), atol=1e-5)


def test_restore_size():
    m = torch.rand(1, 16, 16)
    out = restore_size(m, (50, 37))
    assert out.shape == (1, 50, 37)
    b = torch.rand(2, 1, 16, 16)
    assert restore_size(b, torch.tensor([40, 30])).shape == (2, 1, 40, 30)
    assert restore_size(b, torch.tensor([[40, 30], [40, 30]])).shape == (2, 1, 40, 30)
    outs = restore_size(b, torch.tensor([[40, 30], [12, 8]]))
    assert [tuple(o.shape) for o in outs] == [(1, 40, 30), (1, 12, 8)]
    const = restore_size(torch.full((1, 16, 16), 0.5), (7, 9))
    assert torch.allclose(const, torch.full((1, 7, 9), 0.5))
    assert restore_size(np.zeros((1, 4, 4), np.float32), (8, 8)).shape == (1, 8, 8)


def test_split_normals_deterministic():
    samples = [{"image": f"{i}.png", "label": 0} for i in range(20)] + [{"image": "bad.png", "label": 1}]
    train, val = split_normals(samples, fraction=0.25, seed=3)
    assert len(val) == 5 and len(train) == 16
    assert all(s["label"] == 0 for s in val)
    assert {s["image"] for s in train} | {s["image"] for s in val} == {s["image"] for s in samples}
    assert split_normals(samples, 0.25, 3) == (train, val)
    assert split_normals(samples, 0.25, 4)[1] != val
    assert split_normals(samples, 0.0)[1] == []
    assert len(split_normals(samples[:3], 0.1)[1]) == 1
    with pytest.raises(MultiADInputError):
        split_normals(samples, 1.0)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_texture_and_defect():
    t = make_texture(40, seed=1)
    assert t.shape == (40, 40) and t.dtype == np.float32 and 0 <= t.min() and t.max() <= 1
    assert np.array_equal(t, make_texture(40, seed=1)) and not np.array_equal(t, make_texture(40, seed=2))
    c = make_texture((24, 40), seed=1, channels=3)
    assert c.shape == (3, 24, 40)
    for kind in ("scratch", "blob"):
        img, mask = plant_defect(c, seed=5, kind=kind)
        assert img.shape == c.shape and mask.dtype == bool and mask.shape == (24, 40) and mask.any()
        assert np.abs(img - c)[:, mask].mean() > 0.1  # the defect is visible
        assert np.array_equal(img[:, ~mask], c[:, ~mask])


def test_write_mvtec_dataset_deterministic(tmp_path):
    # how long it takes is measured by benchmarks/synthetic_data.py, not asserted here
    a = write_mvtec_dataset(tmp_path / "a")
    b = write_mvtec_dataset(tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 40 + 10 + 10 + 10
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert read_image(a / "train" / "good" / "000.png").shape == (3, 64, 64)

    c = write_mvtec_dataset(tmp_path / "c", n_train=1, n_test_good=1, n_test_defect=1, size=32, channels=1, sixteen_bit=True)
    assert Image.open(c / "train" / "good" / "000.png").mode.startswith("I")
    img = read_image(c / "test" / "scratch" / "000.png")
    assert img.shape == (1, 32, 32) and 0 <= img.min() and img.max() <= 1


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason=f"real data folder {MAGNETIC_TILE} is absent")
def test_magnetic_tile_real_data():
    assert detect_layout(MAGNETIC_TILE) == "mvtec"
    train = samples_for(MAGNETIC_TILE, "train")
    test = samples_for(MAGNETIC_TILE, "test")
    assert len(train) == 800
    assert sum(s["label"] == 0 for s in test) == 152 and sum(s["label"] == 1 for s in test) == 392
    assert all(s["mask"] is not None for s in test if s["label"] == 1)
    sample = next(s for s in test if s["defect"] == "crack")
    image = read_image(sample["image"])
    mask = read_mask(sample["mask"])
    assert image.shape[0] == 1 and mask.shape == image.shape[1:] and mask.any()
    item = AnomalyImageDataset([sample])[0]
    assert item["image"].shape == (3, 256, 256) and item["mask"].sum() > 0
    assert tuple(item["original_size"].tolist()) == image.shape[1:]
    assert restore_size(item["mask"], item["original_size"]).shape[-2:] == image.shape[1:]
