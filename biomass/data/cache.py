"""Decoded-image cache: every image cropped and resized once, kept as one memory-mapped uint8 `.npy` per key.

`make_reader(cfg.data.cache_dir, ...)` is what training and inference call: without a cache folder it is the plain
JPEG reader; with one it returns a `CachedReader` over `<cache_dir>/<slot>-<key>.npy`, an array of shape
(n, H, W', 3) (W' = W, or 2W for layout `halves`) holding exactly what the JPEG reader returns for each image.

- Key: a hash of the cache format version, OpenCV's version, the resize method, the target size and layout, and for
  every image its path, file size, mtime_ns, crop box and known original size. Touching or rewriting an image, or
  changing a setting, gives a new key and so a new file; the previous file of the same slot (same image list and
  settings) is deleted when its replacement is complete.
- Filled up front, once: the first process takes an exclusive lock on `<file>.lock` (fcntl), decodes with a thread
  pool (OpenCV releases the GIL) into a temporary name and renames it into place (atomic); every other process
  (DDP ranks, concurrent runs) blocks on the lock, then finds the file complete and only opens it.
- The reader pickles without its array: each DataLoader worker or process maps the file itself, read-only, on first
  use, and the page cache is shared between them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from biomass.data import images
from biomass.data.images import Reader
from biomass.data.table import Box
from biomass.places import atomic

FORMAT_VERSION = 1


def _settings(size: tuple[int, int], layout: str) -> dict:
    return {"format": FORMAT_VERSION, "opencv": cv2.__version__, "resize": int(images.RESIZE),
            "size": [int(v) for v in size], "layout": layout}


def _entries(root: Path, image_paths: Sequence[str], boxes: dict[str, Box] | None,
             sizes: dict[str, tuple[int, int]] | None) -> list[list]:
    out = []
    for p in image_paths:
        box = boxes.get(p) if boxes else None
        src = sizes.get(p) if sizes else None
        out.append([str(p), None if box is None else [int(v) for v in box], None if src is None else
                    [int(v) for v in src]])
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()


def cache_path(cache_dir: Path, root: Path, image_paths: Sequence[str], size: tuple[int, int],
               boxes: dict[str, Box] | None, sizes: dict[str, tuple[int, int]] | None, layout: str = "whole") -> Path:
    """`<cache_dir>/<slot>-<key>.npy`: slot names the image list and settings, key adds every file's size and
    mtime_ns, so a changed source gives a new file in the same slot."""
    root = Path(root).resolve()
    settings = _settings(size, layout)
    entries = _entries(root, image_paths, boxes, sizes)
    slot = _digest([str(root), settings, entries])[:16]
    stats = []
    for p in image_paths:
        st = os.stat(root / p)
        stats.append([st.st_size, st.st_mtime_ns])
    key = _digest([slot, stats])[:16]
    h, w = size
    return Path(cache_dir) / f"{slot}-{key}-{len(entries)}x{h}x{w}-{layout}.npy"


def _shape(n: int, size: tuple[int, int], layout: str) -> tuple[int, int, int, int]:
    return (n, int(size[0]), int(size[1]) * (2 if layout == "halves" else 1), 3)


def _valid(path: Path, shape: tuple[int, ...]) -> bool:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == shape and arr.dtype == np.uint8


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive inter-process lock on `path` (POSIX fcntl; elsewhere no lock: fills may then run twice, but the
    atomic rename keeps every reader correct)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def decode_into(out: np.ndarray, reader: Reader, workers: int | None = None) -> None:
    """out[i] = reader(i) for every i, on a thread pool (OpenCV releases the GIL while it decodes)."""
    def one(i: int) -> None:
        img = reader(i)
        if img.shape != out.shape[1:]:
            raise RuntimeError(f"decoded image {i} has shape {img.shape}, expected {out.shape[1:]}")
        out[i] = img

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(out.shape[0])))


def fill(path: Path, reader: Reader, shape: tuple[int, int, int, int], workers: int | None = None) -> None:
    """Decode every image with `reader` into a new `.npy` at `path` (temp name, then an atomic rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        decode_into(out, reader, workers)
        out.flush()
        del out


class MemoryReader:
    """Every image decoded once into memory (inference passes each image through every fold model)."""

    def __init__(self, reader: Reader, n: int, workers: int | None = None):
        first = reader(0)
        self.array = np.empty((n, *first.shape), dtype=np.uint8)
        decode_into(self.array, reader, workers)

    def __len__(self) -> int:
        return self.array.shape[0]

    def __call__(self, i: int) -> np.ndarray:
        return np.array(self.array[int(i)])


class CachedReader:
    """`reader(i)`: image i from the cache file, a fresh writable uint8 (H, W', 3) array.

    The memory map is opened lazily in each process (and dropped when pickled), so DataLoader workers under fork or
    spawn each map the file themselves.
    """

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.path, self.shape = Path(path), tuple(shape)
        self._array: np.ndarray | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "shape": self.shape, "_array": None, "_pid": None}

    @property
    def array(self) -> np.ndarray:
        if self._array is None or self._pid != os.getpid():
            if not self.path.is_file():
                from biomass.errors import DataError

                raise DataError(f"decoded-image cache {self.path} is gone: deleted, or superseded because its source "
                                "images changed while this run was using it")
            self._array = np.load(self.path, mmap_mode="r")
            self._pid = os.getpid()
        return self._array

    def __len__(self) -> int:
        return self.shape[0]

    def __call__(self, i: int) -> np.ndarray:
        return np.array(self.array[int(i)])


def cached_reader(cache_dir: Path, root: Path, image_paths: Sequence[str], size: tuple[int, int],
                  boxes: dict[str, Box] | None, sizes: dict[str, tuple[int, int]] | None,
                  layout: str = "whole", workers: int | None = None, quiet: bool = False) -> CachedReader:
    """The cache of these images and settings, filled now if no complete file exists (once across processes)."""
    image_paths = list(image_paths)
    path = cache_path(cache_dir, root, image_paths, size, boxes, sizes, layout)
    shape = _shape(len(image_paths), size, layout)
    if not _valid(path, shape):
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.with_name(path.name + ".lock")):
            if not _valid(path, shape):  # another process may have filled it while we waited
                if not quiet:
                    print(f"decoded-image cache: decoding {shape[0]} images into {path} "
                          f"({np.prod(shape) / 2**20:.0f} MiB)", file=sys.stderr)
                fill(path, images.jpeg_reader(root, image_paths, size, boxes, sizes, layout), shape, workers)
                slot = path.name.split("-", 1)[0]
                for old in path.parent.glob(f"{slot}-*.npy"):  # superseded versions of this slot
                    if old != path:
                        with contextlib.suppress(FileNotFoundError):
                            old.unlink()
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + ".lock").unlink()
    return CachedReader(path, shape)


def make_reader(cache_dir: Path | None, root: Path, image_paths: Sequence[str], size: tuple[int, int],
                boxes: dict[str, Box] | None, sizes: dict[str, tuple[int, int]] | None,
                layout: str = "whole") -> Reader:
    """The image reader for a stage: cached (`data.cache_dir` set) or straight from the JPEGs."""
    if cache_dir is None:
        return images.jpeg_reader(root, image_paths, size, boxes, sizes, layout)
    return cached_reader(Path(cache_dir), root, image_paths, size, boxes, sizes, layout)
