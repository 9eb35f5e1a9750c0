"""Images: OpenCV decoding to RGB, crop boxes, resize-first loading, albumentations from the config, the dataset.

Order of work per image (see docs/BENCHMARKS.md): decode at reduced resolution when the target is at most half the
source, crop, resize to `image.size` (bilinear, as the seed's `A.Resize`), then augment the small uint8 image; it
stays uint8 until the device, where it is normalised. Every augmentation draw is a pure function of (seed, epoch,
image index), so a run is reproducible whatever the worker or process count, and a resumed run draws what the
uninterrupted one drew.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import biomass  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE before albumentations is imported)

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from biomass.data.augment import TRANSFORMS
from biomass.data.table import Box
from biomass.errors import ConfigError, DataError, suggest

# EXIF orientation is ignored everywhere (decode, crop boxes, cache, size checks): images are used as their pixels
# are stored, which is the frame `crops.csv` boxes and PIL's header size are in. OpenCV would otherwise rotate a
# photo whose EXIF says so, and a box in stored coordinates would cut the wrong region.
IGNORE_EXIF = cv2.IMREAD_IGNORE_ORIENTATION
_REDUCED = {f: flag | IGNORE_EXIF for f, flag in ((1, cv2.IMREAD_COLOR), (2, cv2.IMREAD_REDUCED_COLOR_2),
                                                   (4, cv2.IMREAD_REDUCED_COLOR_4), (8, cv2.IMREAD_REDUCED_COLOR_8))}

# The seed's A.Resize default: bilinear. With it an unaugmented image (validation, test) is bit-identical to the
# seed's, and it costs ~1 ms at 2000x1000 -> 800x800 where INTER_AREA costs ~6 ms (docs/BENCHMARKS.md, Loader design).
RESIZE = cv2.INTER_LINEAR

cv2.setNumThreads(1)  # one image per worker; OpenCV's own threads only fight the DataLoader workers


def reduce_factor(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    """Largest JPEG DCT scale (1, 2, 4, 8) that still leaves at least the target resolution on both axes."""
    factor = 1
    for f in (2, 4, 8):
        if src_hw[0] // f >= dst_hw[0] and src_hw[1] // f >= dst_hw[1]:
            factor = f
    return factor


def read_image(path: Path | str, size: tuple[int, int] | None = None, box: Box | None = None,
               src_hw: tuple[int, int] | None = None) -> np.ndarray:
    """RGB uint8 image, cropped to `box` (original pixel coordinates) and resized to `size` (height, width).

    With `src_hw` (the original size) known, the JPEG is decoded at the coarsest DCT scale that still covers `size`.
    Grayscale, RGBA and 16-bit files are converted to 8-bit RGB by OpenCV's colour decode.
    """
    factor = 1
    if size is not None and src_hw is not None:
        region = (box[3] - box[1], box[2] - box[0]) if box else src_hw
        factor = reduce_factor(region, size)
    bgr = cv2.imread(str(path), _REDUCED[factor])
    if bgr is None:
        raise DataError(f"image {path}: cannot be decoded")
    if box is not None:
        x0, y0, x1, y1 = (v // factor for v in box)
        bgr = bgr[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
    if size is not None and bgr.shape[:2] != tuple(size):
        bgr = cv2.resize(bgr, (size[1], size[0]), interpolation=RESIZE)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def build_augment(specs: Sequence[dict[str, Any]], key: str = "augment") -> A.Compose:
    """albumentations Compose from `[{name: HorizontalFlip, p: .5}, ...]`; bad names or arguments name the key."""
    transforms = []
    for i, spec in enumerate(specs):
        where = f"{key}[{i}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ConfigError(f"config key {where!r}: expected a mapping with the albumentations class `name`")
        name = spec["name"]
        cls = TRANSFORMS.get(name) or getattr(A, name, None)
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            options = [n for n in dir(A) if isinstance(getattr(A, n), type) and issubclass(getattr(A, n),
                                                                                            A.BasicTransform)]
            options += list(TRANSFORMS)
            raise ConfigError(f"config key '{where}.name': {name!r} is not an albumentations transform"
                              f"{suggest(name, options)}")
        if name in ("Resize", "Normalize", "ToTensorV2"):
            raise ConfigError(f"config key '{where}.name': {name} is done by the loader (image.size, image.mean/std);"
                              " leave it out of the augmentation list")
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        if name == "GaussNoise":
            cls = FastGaussNoise
        try:
            transforms.append(cls(**kwargs))
        except Exception as err:  # albumentations validates with pydantic; its message names the argument
            msg = " ".join(str(err).split())
            raise ConfigError(f"config key {where!r} ({name}): {msg}") from None
        unknown = getattr(transforms[-1], "invalid_args", None)  # albumentations only warns about these
        if unknown:
            raise ConfigError(f"config key {where!r} ({name}): unknown argument(s) {', '.join(map(repr, unknown))}")
    return A.Compose(transforms)


class FastGaussNoise(A.GaussNoise):
    """albumentations' GaussNoise, same arguments and same distribution, about 2x faster on uint8 images.

    albumentations draws float64 noise, converts it and adds in float; here the noise is drawn in float32 by a torch
    generator seeded from the transform's own random state (so the draw stays a function of seed, epoch and index)
    and added with one saturating OpenCV add, which rounds to the nearest integer. Other dtypes, shared (per_channel
    false) or reduced-resolution noise fall back to albumentations' implementation.
    """

    def _fast(self, image: np.ndarray) -> bool:
        return image.dtype == np.uint8 and image.ndim == 3 and self.per_channel and self.noise_scale_factor == 1

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        image = data["image"] if "image" in data else data["images"][0]
        if not self._fast(image):
            return super().get_params_dependent_on_data(params, data)
        sigma = self.py_random.uniform(*self.std_range) * 255.0  # the same draws, in the same order, as the parent
        mean = self.py_random.uniform(*self.mean_range) * 255.0
        gen = torch.Generator().manual_seed(int(self.random_generator.integers(0, 2**63 - 1)))
        noise = torch.empty(image.shape, dtype=torch.float32).normal_(mean, sigma, generator=gen)
        return {"noise_map": noise.numpy()}

    def apply(self, img: np.ndarray, noise_map: np.ndarray, **params: Any) -> np.ndarray:
        if self._fast(img) and noise_map.dtype == np.float32 and noise_map.shape == img.shape:
            return cv2.add(np.ascontiguousarray(img), noise_map, dtype=cv2.CV_8U)
        return super().apply(img, noise_map, **params)


def draw_seed(*parts: int) -> int:
    """A stable 32-bit seed from integers (no Python hash randomisation)."""
    digest = hashlib.blake2b(np.asarray(parts, dtype=np.int64).tobytes(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class EpochSampler(Sampler[int]):
    """Yields `epoch * n + index`: the dataset decodes the epoch, so augmentation draws depend only on
    (seed, epoch, index). Shuffled order is a function of (seed, epoch) alone, which makes resume exact."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = (np.random.default_rng(draw_seed(self.seed, self.epoch)).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        return iter((self.epoch * self.n + order).tolist())


Reader = Callable[[int], np.ndarray]


class ImageDataset(Dataset):
    """One item per image: uint8 CHW image, standardised tabular inputs and targets (float32), and its index.

    `reader(i)` returns image i already cropped and resized (from JPEG, or from the decoded-image cache).
    """

    def __init__(self, reader: Reader, n: int, tabular: np.ndarray, targets: np.ndarray | None,
                 augment: A.Compose, seed: int):
        self.reader, self.n, self.augment, self.seed = reader, n, augment, seed
        self.tabular = torch.as_tensor(np.asarray(tabular, dtype=np.float32))
        self.targets = None if targets is None else torch.as_tensor(np.asarray(targets, dtype=np.float32))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        epoch, index = divmod(int(key), self.n)
        image = self.reader(index)
        if self.augment.transforms:
            self.augment.set_random_seed(draw_seed(self.seed, epoch, index))
            image = self.augment(image=image)["image"]
        item = {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), "tabular":
                self.tabular[index], "index": torch.tensor(index)}
        if self.targets is not None:
            item["target"] = self.targets[index]
        return item


def jpeg_reader(root: Path, image_paths: Sequence[str], size: tuple[int, int],
                boxes: dict[str, Box] | None, sizes: dict[str, tuple[int, int]] | None,
                layout: str = "whole") -> Reader:
    """Reads image i from its JPEG: reduced decode, crop, resize to `size`.

    Layout `halves` (dual-image input): the left and right halves are each resized to `size` and placed side by
    side, an (H, 2W) image that the model splits into two views for its shared backbone.
    """
    root = Path(root)

    def read(i: int) -> np.ndarray:
        p = image_paths[i]
        box = boxes.get(p) if boxes else None
        src = sizes.get(p) if sizes else None
        if layout == "whole":
            return read_image(root / p, size, box, src)
        full = read_image(root / p, None, box, None)
        half = full.shape[1] // 2
        parts = [cv2.resize(full[:, s], (size[1], size[0]), interpolation=RESIZE)
                 for s in (slice(0, half), slice(half, None))]
        return np.concatenate(parts, axis=1)

    return read
