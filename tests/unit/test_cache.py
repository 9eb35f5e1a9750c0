"""The decoded-image cache: the JPEG reader's pixels, the same tensors for the same augmentation draw, invalidation,
reuse without decoding, pickling, one fill across concurrent callers, and training with it equal to without."""
from __future__ import annotations

import os
import pickle
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, npy_files

import biomass.data.cache as cache_mod
from biomass.data.cache import CachedReader, cache_path, cached_reader, make_reader
from biomass.data.images import ImageDataset, build_augment, jpeg_reader
from biomass.data.table import check_images
from biomass.errors import DataError

SIZE = (32, 48)  # (h, w); 200x100 sources, so whole images decode at reduced (1/2) resolution


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from biomass.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("cache") / "data", n_train=6, n_test=1, seed=3, width=200, height=100)


def image_set(root: Path):
    paths = sorted(str(p.relative_to(root)) for p in (root / "train").glob("*.jpg"))
    sizes = check_images(root, paths, "header")
    # Varied boxes, one image without: odd offsets, a box narrower than the target, one reduced-decode sized.
    boxes = {p: (3 + 7 * i, 2 + i, 200 - 11 * i, 97 - 3 * i) for i, p in enumerate(paths) if i != 2}
    boxes[paths[0]] = (10, 10, 40, 90)
    return paths, sizes, boxes


def gold_train_augment() -> list[dict]:
    return yaml.safe_load((REPO / "biomass" / "configs" / "gold.yaml").read_text())["main"]["augment"]["train"]


@pytest.mark.parametrize("layout", ["whole", "halves"])
@pytest.mark.parametrize("crop", [False, True])
def test_cached_reader_equals_jpeg_reader(data, tmp_path, layout, crop):
    paths, sizes, boxes = image_set(data)
    boxes = boxes if crop else None
    plain = jpeg_reader(data, paths, SIZE, boxes, sizes, layout)
    cached = cached_reader(tmp_path, data, paths, SIZE, boxes, sizes, layout, quiet=True)
    width = SIZE[1] * (2 if layout == "halves" else 1)
    assert len(cached) == len(paths) and cached.shape == (len(paths), SIZE[0], width, 3)
    for i in range(len(paths)):
        a, b = plain(i), cached(i)
        assert b.dtype == np.uint8 and b.shape == (SIZE[0], width, 3) and b.flags.writeable
        assert np.array_equal(a, b), (paths[i], layout, crop)


@pytest.mark.parametrize("layout", ["whole", "halves"])
def test_cached_and_uncached_datasets_give_the_same_tensors(data, tmp_path, layout):
    """Same (epoch, index) -> same augmentation draw -> identical tensors, whatever the order of access."""
    paths, sizes, boxes = image_set(data)
    n = len(paths)
    specs = gold_train_augment()
    tab = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    target = np.arange(n * 5, dtype=np.float32).reshape(n, 5)
    plain = ImageDataset(jpeg_reader(data, paths, SIZE, boxes, sizes, layout), n, tab, target, build_augment(specs),
                         seed=11)
    cached = ImageDataset(cached_reader(tmp_path, data, paths, SIZE, boxes, sizes, layout, quiet=True), n, tab,
                          target, build_augment(specs), seed=11)
    keys = list(range(3 * n))  # epochs 0, 1, 2
    from_plain = {k: plain[k] for k in keys}
    from_cached = {k: cached[k] for k in reversed(keys)}  # another order: draws depend on (seed, epoch, index) only
    for k in keys:
        a, b = from_plain[k], from_cached[k]
        assert set(a) == set(b) == {"image", "tabular", "target", "index"}
        assert a["image"].dtype == torch.uint8 and a["image"].shape == (3, SIZE[0], SIZE[1] * (1 + (layout ==
                                                                                                     "halves")))
        for name in a:
            assert torch.equal(a[name], b[name]), (k, name)
    # the augmentations really drew something: an image differs between epochs
    assert any(not torch.equal(from_plain[i]["image"], from_plain[i + n]["image"]) for i in range(n))


def _copy(data: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(data / "train", root / "train")
    return root


def test_touched_or_rewritten_source_gives_a_new_file_and_removes_the_old(data, tmp_path):
    root = _copy(data, tmp_path)
    paths, sizes, boxes = image_set(root)
    cache = tmp_path / "cache"
    first = cached_reader(cache, root, paths, SIZE, boxes, sizes, quiet=True)
    assert npy_files(cache) == [first.path]

    target = root / paths[1]
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    second = cached_reader(cache, root, paths, SIZE, boxes, sizes, quiet=True)
    assert second.path != first.path and npy_files(cache) == [second.path]
    assert second.path.name.split("-")[0] == first.path.name.split("-")[0]  # same slot, new key
    assert not list(cache.glob("*.tmp")) and not list(cache.glob("*.lock"))

    # rewritten: another picture, another file size -> the cache holds the new pixels
    other = cv2.imread(str(root / paths[0]), cv2.IMREAD_COLOR)
    ok, jpg = cv2.imencode(".jpg", other, [cv2.IMWRITE_JPEG_QUALITY, 60])
    assert ok and len(jpg) != st.st_size
    target.write_bytes(jpg.tobytes())
    third = cached_reader(cache, root, paths, SIZE, boxes, sizes, quiet=True)
    assert third.path not in (first.path, second.path) and npy_files(cache) == [third.path]
    assert np.array_equal(third(1), jpeg_reader(root, paths, SIZE, boxes, sizes)(1))
    assert not np.array_equal(third(1), jpeg_reader(data, paths, SIZE, boxes, sizes)(1))  # the old picture's

    # the superseded reader says so instead of reading a deleted file
    stale = pickle.loads(pickle.dumps(first))
    with pytest.raises(DataError, match="is gone"):
        stale(0)


def test_other_settings_give_other_files(data, tmp_path):
    paths, sizes, boxes = image_set(data)
    cache = tmp_path / "cache"
    base = cached_reader(cache, data, paths, SIZE, boxes, sizes, quiet=True).path
    variants = [cached_reader(cache, data, paths, (40, 40), boxes, sizes, quiet=True).path,
                cached_reader(cache, data, paths, SIZE, None, sizes, quiet=True).path,
                cached_reader(cache, data, paths, SIZE, boxes, sizes, "halves", quiet=True).path,
                cached_reader(cache, data, paths[:-1], SIZE, boxes, sizes, quiet=True).path]
    assert len({base, *variants}) == 5
    assert npy_files(cache) == sorted([base, *variants])  # other settings are other slots: nothing removed
    assert np.load(variants[0], mmap_mode="r").shape == (len(paths), 40, 40, 3)
    # the path is a pure function of the inputs
    assert cache_path(cache, data, paths, SIZE, boxes, sizes) == base


def test_second_call_reuses_the_file_without_decoding(data, tmp_path, monkeypatch, capsys):
    paths, sizes, boxes = image_set(data)
    first = cached_reader(tmp_path, data, paths, SIZE, boxes, sizes)
    assert "decoding 6 images" in capsys.readouterr().err
    mtime = first.path.stat().st_mtime_ns

    def no_fill(*args, **kwargs):
        raise AssertionError("the cache was filled again")

    monkeypatch.setattr(cache_mod, "fill", no_fill)
    monkeypatch.setattr(cache_mod.images, "jpeg_reader", no_fill)
    again = cached_reader(tmp_path, data, paths, SIZE, boxes, sizes)
    assert again.path == first.path and first.path.stat().st_mtime_ns == mtime
    assert capsys.readouterr().err == ""
    assert all(np.array_equal(first(i), again(i)) for i in range(len(paths)))


def test_concurrent_callers_fill_once(data, tmp_path, monkeypatch):
    """The lock: callers racing on an empty cache decode once; every one gets the complete file."""
    paths, sizes, boxes = image_set(data)
    calls = []
    real_fill = cache_mod.fill

    def counting_fill(*args, **kwargs):
        calls.append(1)
        real_fill(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "fill", counting_fill)
    readers, errors = [], []

    def call():
        try:
            readers.append(cached_reader(tmp_path, data, paths, SIZE, boxes, sizes, quiet=True))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1 and len({r.path for r in readers}) == 1
    plain = jpeg_reader(data, paths, SIZE, boxes, sizes)
    assert all(np.array_equal(readers[-1](i), plain(i)) for i in range(len(paths)))


def test_reader_pickles_without_its_array(data, tmp_path):
    paths, sizes, boxes = image_set(data)
    reader = cached_reader(tmp_path, data, paths, SIZE, boxes, sizes, quiet=True)
    first = reader(0)  # maps the file
    assert reader._array is not None
    blob = pickle.dumps(reader)
    assert len(blob) < 1000  # the array is 6 x 32 x 48 x 3 bytes; only the path and shape travel
    clone = pickle.loads(blob)
    assert isinstance(clone, CachedReader) and clone._array is None
    assert all(np.array_equal(clone(i), reader(i)) for i in range(len(paths)))
    assert np.array_equal(clone(0), first)
    out = clone(0)
    out[:] = 0  # a private copy: writing to it leaves the cache alone
    assert np.array_equal(clone(0), first)


def test_loader_workers_read_the_cache(data, tmp_path):
    """Two DataLoader worker processes, each mapping the file itself, give what one process gives."""
    from torch.utils.data import DataLoader

    paths, sizes, boxes = image_set(data)
    n = len(paths)
    reader = cached_reader(tmp_path, data, paths, SIZE, boxes, sizes, quiet=True)
    reader(0)  # mapped in the parent before the fork: the workers must not rely on it
    ds = ImageDataset(reader, n, np.zeros((n, 0), np.float32), None, build_augment(gold_train_augment()), seed=2)
    one = [b["image"] for b in DataLoader(ds, batch_size=2, num_workers=0)]
    two = [b["image"] for b in DataLoader(ds, batch_size=2, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(one, two)) and len(one) == len(two) == 3


def test_make_reader_without_a_cache_dir_reads_the_jpegs(data, tmp_path):
    paths, sizes, boxes = image_set(data)
    plain = make_reader(None, data, paths, SIZE, boxes, sizes)
    cached = make_reader(tmp_path / "c", data, paths, SIZE, boxes, sizes)
    assert not isinstance(plain, CachedReader) and isinstance(cached, CachedReader)
    assert not list((tmp_path).glob("*.npy")) and len(npy_files(tmp_path / "c")) == 1
    assert all(np.array_equal(plain(i), cached(i)) for i in range(len(paths)))
