"""biomass.data.images and table's image checks: decoding, EXIF, corrupt and truncated JPEGs, crops, resizing."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from helpers import smooth_rgb, write_jpeg

from biomass.data import images as images_mod
from biomass.data.images import read_image, reduce_factor
from biomass.data.table import check_images, read_crops, read_train
from biomass.errors import DataError

W, H = 64, 32  # the synthetic_root fixture's image size


# ------------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("mode", ["decode", "header"])
def test_check_images_returns_height_width(synthetic_root, mode):
    paths = read_train(synthetic_root)["image_path"].tolist()
    sizes = check_images(synthetic_root, paths, mode=mode, workers=2)
    assert sizes == {p: (H, W) for p in paths}


def test_check_images_non_square_orientation(tmp_path):
    write_jpeg(tmp_path / "a.jpg", smooth_rgb(48, 20))
    assert check_images(tmp_path, ["a.jpg"]) == {"a.jpg": (48, 20)}


@pytest.mark.parametrize("mode", ["decode", "header"])
def test_missing_image_file(synthetic_root, mode):
    with pytest.raises(DataError, match=r"image .*train/ID_nope\.jpg: file not found"):
        check_images(synthetic_root, ["train/ID_nope.jpg"], mode=mode)


def _copy_first_image(root: Path, tmp_path: Path) -> Path:
    src = root / read_train(root)["image_path"].iloc[0]
    return Path(shutil.copy(src, tmp_path / "img.jpg"))


@pytest.mark.parametrize("mode", ["decode", "header"])
def test_corrupt_image(tmp_path, mode):
    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert data[:2] != b"\xff\xd8"
    (tmp_path / "bad.jpg").write_bytes(data)
    with pytest.raises(DataError, match=r"bad\.jpg"):
        check_images(tmp_path, ["bad.jpg"], mode=mode)
    with pytest.raises(DataError, match=r"bad\.jpg: cannot be decoded"):
        read_image(tmp_path / "bad.jpg")


@pytest.mark.parametrize("mode", ["decode", "header"])
def test_truncated_jpeg(tmp_path, synthetic_root, mode):
    f = _copy_first_image(synthetic_root, tmp_path)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"img\.jpg: truncated JPEG"):
        check_images(tmp_path, ["img.jpg"], mode=mode)


def test_empty_image_file(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"zero\.jpg: file is empty"):
        check_images(tmp_path, ["zero.jpg"])


def test_grayscale_jpeg_becomes_rgb(tmp_path):
    gray = cv2.cvtColor(smooth_rgb(24, 40), cv2.COLOR_RGB2GRAY)
    ok, buf = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 100])
    (tmp_path / "g.jpg").write_bytes(buf.tobytes())
    assert cv2.imread(str(tmp_path / "g.jpg"), cv2.IMREAD_UNCHANGED).ndim == 2  # really a 1-channel file
    img = read_image(tmp_path / "g.jpg")
    assert img.shape == (24, 40, 3) and img.dtype == np.uint8
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    assert np.abs(img[..., 0].astype(int) - gray).mean() < 2
    assert check_images(tmp_path, ["g.jpg"]) == {"g.jpg": (24, 40)}


def test_rgba_png_becomes_rgb(tmp_path):
    rgb = smooth_rgb(20, 30, seed=1)
    alpha = np.random.default_rng(2).integers(0, 256, (20, 30, 1), dtype=np.uint8)
    bgra = np.concatenate([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), alpha], axis=2)
    assert cv2.imwrite(str(tmp_path / "a.png"), bgra)
    img = read_image(tmp_path / "a.png")
    assert img.shape == (20, 30, 3) and img.dtype == np.uint8
    assert np.array_equal(img, rgb)  # lossless: exact RGB values, in RGB order, alpha dropped
    assert read_image(tmp_path / "a.png", size=(10, 15)).shape == (10, 15, 3)


def test_read_image_is_rgb(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 250  # pure red
    img = read_image(write_jpeg(tmp_path / "red.jpg", rgb, 100))
    assert img[..., 0].mean() > 240 and img[..., 2].mean() < 15


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    return write_jpeg(tmp_path_factory.mktemp("big") / "big.jpg", smooth_rgb(256, 512), quality=92)


@pytest.mark.parametrize("size, factor", [((32, 64), 8), ((40, 100), 4), ((64, 128), 4), ((100, 200), 2),
                                          ((200, 300), 1)])
def test_reduced_decode_matches_full_decode(big_jpeg, monkeypatch, size, factor):
    assert reduce_factor((256, 512), size) == factor
    flags = []
    real_imread = cv2.imread
    monkeypatch.setattr(images_mod.cv2, "imread", lambda p, f=cv2.IMREAD_COLOR: flags.append(f) or real_imread(p, f))
    fast = read_image(big_jpeg, size, src_hw=(256, 512))
    assert flags == [images_mod._REDUCED[factor]]
    full = cv2.cvtColor(real_imread(str(big_jpeg), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    ref = cv2.resize(full, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    assert fast.shape == (*size, 3) and fast.dtype == np.uint8
    assert np.abs(fast.astype(float) - ref).mean() < 8


def test_reduce_factor_needs_both_axes():
    assert reduce_factor((1000, 2000), (800, 800)) == 1
    assert reduce_factor((1000, 2000), (500, 500)) == 2
    assert reduce_factor((1000, 2000), (125, 250)) == 8
    assert reduce_factor((1000, 2000), (126, 100)) == 4


def test_crop_box_applied(big_jpeg):
    box = (40, 24, 488, 232)  # x0, y0, x1, y1
    full = read_image(big_jpeg)
    crop = read_image(big_jpeg, box=box)
    assert np.array_equal(crop, full[24:232, 40:488])
    small = read_image(big_jpeg, (52, 112), box=box, src_hw=(256, 512))  # reduced decode (factor 4) + crop
    ref = cv2.resize(full[24:232, 40:488], (112, 52), interpolation=cv2.INTER_AREA)
    assert small.shape == (52, 112, 3) and np.abs(small.astype(float) - ref).mean() < 8


def test_read_crops(synthetic_root):
    paths = read_train(synthetic_root)["image_path"].tolist()
    sizes = check_images(synthetic_root, paths)
    boxes = read_crops(synthetic_root / "crops.csv", sizes)
    crops = pd.read_csv(synthetic_root / "crops.csv").set_index("image_path")
    assert set(boxes) == set(paths)  # test-image boxes skipped
    for p, b in boxes.items():
        assert b == tuple(int(v) for v in crops.loc[p, ["x0", "y0", "x1", "y1"]])


@pytest.mark.parametrize("box", [(0, 0, W + 1, H), (0, 0, W, H + 1), (-1, 0, 10, 10), (10, 5, 10, 20),
                                 (30, 20, 10, 25)])
def test_crop_box_outside_image(tmp_path, box):
    pd.DataFrame([("train/a.jpg", *box)], columns=["image_path", "x0", "y0", "x1", "y1"]).to_csv(
        tmp_path / "crops.csv", index=False)
    with pytest.raises(DataError, match=r"crops\.csv: crop box .* of image 'train/a\.jpg' is outside"):
        read_crops(tmp_path / "crops.csv", {"train/a.jpg": (H, W)})


def test_duplicate_crop_rows(tmp_path):
    rows = [("train/a.jpg", 0, 0, 10, 10), ("train/b.jpg", 0, 0, 5, 5), ("train/a.jpg", 1, 1, 9, 9)]
    pd.DataFrame(rows, columns=["image_path", "x0", "y0", "x1", "y1"]).to_csv(tmp_path / "crops.csv", index=False)
    with pytest.raises(DataError, match=r"crops\.csv: image 'train/a\.jpg' has more than one crop box"):
        read_crops(tmp_path / "crops.csv", {"train/a.jpg": (H, W), "train/b.jpg": (H, W)})


def test_crops_missing_column(tmp_path):
    pd.DataFrame({"image_path": ["a.jpg"], "x0": [0], "y0": [0], "x1": [3]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(DataError, match=r"c\.csv: missing column 'y1'"):
        read_crops(tmp_path / "c.csv", {})
