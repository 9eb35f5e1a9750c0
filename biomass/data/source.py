"""Where a run's images and labels come from: the checked training table, the test images, the demo data.

`ImageSet` is what the model-facing code reads images through: a root, the image paths in order, their original
sizes and (when known) crop boxes, and `reader(size, crop, layout, cache_dir)` for one stage's framing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from biomass.config.load import Experiment
from biomass.config.schema import ExperimentConfig
from biomass.data.images import Reader
from biomass.data.table import Box, check_images, read_crops, read_test, read_train
from biomass.errors import ConfigError, DataError
from biomass.stages import Stage, configured


@dataclass
class ImageSet:
    root: Path
    image_paths: list[str]
    sizes: dict[str, tuple[int, int]]
    boxes: dict[str, Box] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_paths)

    def reader(self, size: tuple[int, int], crop: bool, layout: str, cache_dir: Path | None) -> Reader:
        """Image i of the set cropped (when `crop`) and resized, from the JPEGs or the decoded-image cache."""
        from biomass.data.cache import make_reader

        if crop and not self.boxes:
            raise ConfigError("image crop requested but no crop boxes were loaded")
        return make_reader(cache_dir, self.root, self.image_paths, tuple(size), self.boxes if crop else None,
                           self.sizes, layout)

    def stage_reader(self, cfg: ExperimentConfig, stage: Stage, training: bool) -> Reader:
        """The images framed for a stage (its crop, size and layout): as it trains, or as the chain reads them."""
        stage_cfg = stage.config(cfg)
        return self.reader(stage_cfg.image.size, stage.crops(cfg, training), stage_cfg.image.layout,
                           cfg.data.cache_dir)


@dataclass
class TrainData:
    table: pd.DataFrame  # one row per image (biomass.data.table.read_train)
    images: ImageSet

    @property
    def root(self) -> Path:
        return self.images.root


def needs_crops(cfg: ExperimentConfig) -> bool:
    """Whether any stage trains on cropped images."""
    return any(s.crops(cfg, training=True) for s in configured(cfg))


def _crop_file(cfg: ExperimentConfig, root: Path) -> Path:
    if not cfg.data.crops:
        raise ConfigError("image.crop is true (or infer.crop is boxes) but data.crops names no crop file")
    path = root / cfg.data.crops
    if not path.is_file():
        raise DataError(f"{path}: crop boxes file not found; the real data has no boxes: make them with "
                        f"`python -m biomass.crops detect {root}` (or set image.crop=false; at inference on a "
                        "read-only data folder, `--out FILE` there and `biomass.infer --crops FILE`)")
    return path


def load_train_data(cfg: ExperimentConfig) -> TrainData:
    """Read and check everything before the first training step: tables, every image, crop boxes."""
    root = cfg.data.root
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist (or is not a directory)")
    table = read_train(root, cfg.data.train_csv, cfg.data.allow_outside_root)
    sizes = check_images(root, table["image_path"], cfg.data.check_images)
    boxes = read_crops(_crop_file(cfg, root), sizes) if needs_crops(cfg) else {}
    return TrainData(table, ImageSet(root, list(table["image_path"]), sizes, boxes))


def load_test_images(cfg: ExperimentConfig, root: Path, need_boxes: bool) -> tuple[pd.DataFrame, ImageSet]:
    """test.csv's rows and its images, checked; with `need_boxes` (inference frames test images as training
    framed them), a crop box for every test image."""
    if not root.is_dir():
        raise DataError(f"--data {root} does not exist")
    rows, images = read_test(root, cfg.data.test_csv, cfg.data.allow_outside_root)
    sizes = check_images(root, images["image_path"], cfg.data.check_images)
    boxes = read_crops(_crop_file(cfg, root), sizes) if need_boxes else {}
    if need_boxes:
        missing = [p for p in images["image_path"] if p not in boxes]
        if missing:
            raise DataError(f"{root / cfg.data.crops}: no crop box for test image {missing[0]!r}; run "
                            f"`python -m biomass.crops detect {root}`")
    return rows, ImageSet(root, list(images["image_path"]), sizes, boxes)


def ensure_demo_data(exp: Experiment) -> None:
    """Generate the demo dataset into the experiment's own default `data.root` on first use. A root given on the
    command line is never generated into: a missing one is an error."""
    data = exp.config.data
    if data.root.exists() or data.demo is None or exp.from_cli("data.root"):
        return
    from biomass.data.synthetic import generate

    print(f"demo data: generating {data.demo.n_train} train + {data.demo.n_test} test images into {data.root}")
    generate(data.root, n_train=data.demo.n_train, n_test=data.demo.n_test, seed=data.demo.seed,
             width=data.demo.width, height=data.demo.height)
