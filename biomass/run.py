"""Cross-validated training: `accelerate launch -m biomass.run EXPERIMENT [key=value ...] [--run-dir DIR]`.

Also `python -m biomass.run ...` (one process). `--dry-run` validates the experiment (and the data, when present) and
prints the resolved config. Trains the configured stages (main, then aux) fold by fold into one run directory:

  config.yaml  folds.csv  main/fold<k>/best.{safetensors,json}  aux/fold<k>/...  oof.csv  [oof_deployable.csv]
  metrics.json  plots/  run.json (status: running | completed | failed)
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from biomass.config import Experiment, ExperimentConfig, load_experiment, to_yaml
from biomass.constants import TABULAR, TARGETS, sample_id
from biomass.data.table import Box, check_images, read_crops, read_train
from biomass.errors import BiomassError, ConfigError, DataError, run_cli

STATUS_FILE = "run.json"
FORMAT_VERSION = 1


@dataclass
class TrainData:
    root: Path
    table: pd.DataFrame
    sizes: dict[str, tuple[int, int]]
    boxes: dict[str, Box]


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


def load_train_data(cfg: ExperimentConfig) -> TrainData:
    """Read and check everything before the first training step: tables, every image, crop boxes."""
    root = cfg.data.root
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist (or is not a directory)")
    table = read_train(root, cfg.data.train_csv)
    sizes = check_images(root, table["image_path"], cfg.data.check_images)
    needs_crops = cfg.main.image.crop or (cfg.aux is not None and cfg.aux.image.crop)
    boxes: dict[str, Box] = {}
    if needs_crops:
        if not cfg.data.crops:
            raise ConfigError("image.crop is true but data.crops names no crop file")
        boxes = read_crops(root / cfg.data.crops, sizes)
    return TrainData(root, table, sizes, boxes)


def check_models(cfg: ExperimentConfig, dry_run: bool = False) -> list[str]:
    """Build every stage's model on the meta device (no memory, no initialisation) and match each backbone weights
    file by tensor names and shapes, so that `--dry-run` reports an unknown timm model, a component that does not fit
    its backbone or a weights file for another model. (Training finds the same when it builds fold 0's model, after
    the data checks, and records the run as failed.) In a dry run a weights file that is not there is noted
    (returned) rather than an error, as a missing data.root is."""
    import torch

    from biomass.engine import build_stage_model
    from biomass.models.backbones import load_weights

    notes = []
    for name in ("main", "aux"):
        stage = getattr(cfg, name)
        if stage is None:
            continue
        try:
            with torch.device("meta"):
                model, _ = build_stage_model(name, stage, load_weights=False)
            bb = stage.model.backbone
            if bb["name"] == "timm" and bb.get("weights"):
                weights = Path(bb["weights"])
                if dry_run and not weights.is_file():
                    notes.append(f"{name}.model.backbone.weights {weights} not found; not checked")
                    continue
                load_weights(model.backbone.model, weights, bb.get("strict", True), bb["model_name"],
                             shapes_only=True)
        except ConfigError as err:  # the builders name `model.backbone...`; say which stage
            msg = str(err)
            raise ConfigError(f"{name}.{msg}" if msg.startswith("model.") else f"{name} stage: {msg}") from None
        except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device: training's build checks
            continue
    return notes


def _progress_enabled() -> bool:
    return sys.stdout.isatty() and not os.environ.get("CI")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biomass.run", description="Train an experiment with K-fold CV.")
    parser.add_argument("experiment", type=Path, nargs="?", help="experiment YAML (not with --resume)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")
    parser.add_argument("--run-dir", type=Path, help="output directory (default runs/<name>/<timestamp>)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved config; train nothing")
    parser.add_argument("--force", action="store_true", help="write into an existing --run-dir")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    parser.add_argument("--parent-run-id", help="log as a nested MLflow child of this run (used by biomass.ablate)")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="extra MLflow tag")
    args = parser.parse_intermixed_args(argv)
    if args.resume is not None:
        from biomass.train import resume_experiment

        resume_experiment(args.resume.resolve())
        return 0
    if args.experiment is None:
        parser.error("an experiment YAML is required")
    if "=" in str(args.experiment):
        raise ConfigError(f"the first argument must be the experiment file, got the override {args.experiment}")
    exp = load_experiment(args.experiment, args.overrides)
    cfg = exp.config

    if args.dry_run:
        print(to_yaml(cfg), end="")
        for note in check_models(cfg, dry_run=True):
            print(f"# {note}")
        if cfg.data.root.is_dir():
            data = load_train_data(cfg)
            print(f"# data: {len(data.table)} train images in {cfg.data.root} checked ({cfg.data.check_images})"
                  f"{f', {len(data.boxes)} crop boxes' if data.boxes else ''}")
        else:
            generated = cfg.data.demo is not None and not exp.from_cli("data.root")
            note = " (the demo data is generated there on first use)" if generated else \
                "; training stops here until it exists"
            print(f"# data: {cfg.data.root} not found; not checked{note}")
        return 0

    from biomass.train import train_experiment

    tags = {}
    for item in args.tag:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--tag {item!r} is not KEY=VALUE")
        tags[key] = value
    train_experiment(exp, run_dir=args.run_dir, force=args.force, parent_run_id=args.parent_run_id, tags=tags)
    return 0


# What a run writes into its directory. `--force` removes these first: a fold's done.json or saved state left by an
# earlier run would otherwise be taken for this run's and skip or resume that fold.
RUN_OUTPUTS = (STATUS_FILE, "config.yaml", "folds.csv", "oof.csv", "oof_deployable.csv", "aux_oof.csv", "metrics.json",
               "plots", "main", "aux", "state")


def new_run_dir(cfg: ExperimentConfig, run_dir: Path | None, force: bool) -> Path:
    if run_dir is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / cfg.name / stamp
    run_dir = run_dir.resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise BiomassError(f"--run-dir {run_dir} is a file, not a directory")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise BiomassError(f"run directory {run_dir} already exists; pass --force to overwrite it, or "
                               f"--resume {run_dir} to continue an interrupted run")
        import shutil

        for name in RUN_OUTPUTS:  # only what a run writes: other files in the folder are left alone
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def long_format(image_ids: pd.Series, values: np.ndarray, names=TARGETS) -> pd.DataFrame:
    """Wide (n_images, n_targets) -> Kaggle's long `sample_id,target`."""
    rows = [(sample_id(i, t), float(values[r, j])) for r, i in enumerate(image_ids) for j, t in enumerate(names)]
    return pd.DataFrame(rows, columns=["sample_id", "target"])


def elapsed(start: float) -> str:
    return str(dt.timedelta(seconds=round(time.time() - start)))


__all__ = ["TABULAR", "TrainData", "check_models", "ensure_demo_data", "load_train_data", "long_format", "main",
           "new_run_dir"]


if __name__ == "__main__":
    run_cli(main)
