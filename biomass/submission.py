"""Test-time inference: a completed run directory + Kaggle's test images -> submission.csv, through the chain.

The run directory is self-contained (config.yaml, fold checkpoints with their scalers): copy it to an offline
machine and run this there; the backbone weights file is not needed. With N processes each scores a shard of the
images (accelerate's split) and the predictions are gathered, so the file matches the single-process one.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from biomass.chain import Assignment, Chain, fold_weights, needs_boxes, require_finite
from biomass.constants import TARGETS
from biomass.data.source import load_test_images, load_train_data
from biomass.errors import BiomassError
from biomass.places import require_writable, write_csv_atomic
from biomass.rundir import RunDir
from biomass.stages import AUX, MAIN
from biomass.ttt import labelled_from
from biomass.ui import Progress, progress_enabled


def check_output(out: Path) -> Path:
    """`--out` must name a file in a writable folder: found before any model runs."""
    return require_writable(out, "--out", is_file=True).resolve()


def write_submission(run_dir: Path, data_dir: Path, out: Path, batch_size: int | None = None,
                     main_folds: list[int] | None = None, aux_folds: list[int] | None = None,
                     crops: Path | None = None) -> pd.DataFrame:
    """Predict every test image with every fold model (or the folds given) and write Kaggle's submission CSV.
    `crops`: the crop boxes file, where it cannot sit in the (read-only) data folder."""
    from biomass.engine.build import make_accelerator

    if batch_size is not None and batch_size < 1:
        raise BiomassError(f"--batch-size must be at least 1, got {batch_size}")
    run = RunDir(run_dir)
    cfg = run.completed()
    if crops is not None:  # an absolute data.crops: `root / crops` is the file itself, for test and training images
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"crops": str(Path(crops).resolve())})})
    out = check_output(out)
    if cfg.data.cache_dir is not None:
        require_writable(cfg.data.cache_dir, "data.cache_dir (from the run's config.yaml)")
    rows, images = load_test_images(cfg, Path(data_dir), needs_boxes(cfg))
    all_main = run.trained_folds(MAIN, cfg.main)
    main_folds = main_folds if main_folds is not None else all_main
    aux_folds = aux_folds if aux_folds is not None else (run.trained_folds(AUX, cfg.aux) if cfg.aux else None)
    weights = (fold_weights(cfg, run, main_folds) if len(main_folds) == len(all_main)
               else {k: 1.0 / len(main_folds) for k in main_folds})
    labelled = None
    if cfg.infer.ttt is not None:  # test-time training re-reads the run's training images from the same data root
        data = load_train_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": Path(data_dir)})}))
        labelled = labelled_from(cfg, data, run.fold_ids_of(MAIN, list(data.table["image_path"])), main_folds)

    accelerator = make_accelerator(cfg)
    start = time.time()
    with Progress(progress_enabled() and accelerator.is_main_process) as progress:
        n_ttt = len(main_folds) if cfg.infer.ttt is not None else 0
        task = progress.task("fold models", len(main_folds) + len(aux_folds or []) + n_ttt)
        chain = Chain(accelerator, run, cfg, weights, batch_size, in_memory=True, check_finite=True,
                      labelled=labelled, tick=lambda: progress.advance(task))
        pred, _ = chain.predict(images, Assignment.every_fold(main_folds, aux_folds, len(images)))
    seconds = time.time() - start
    require_finite(pred, "inference", images.image_paths, " after post-processing")
    by_image = dict(zip(images.image_paths, pred))
    col = {t: j for j, t in enumerate(TARGETS)}
    submission = pd.DataFrame({"sample_id": rows["sample_id"].to_numpy(),
                               "target": [by_image[p][col[t]] for p, t in zip(rows["image_path"],
                                                                               rows["target_name"])]})
    if accelerator.is_main_process:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(submission, out, index=False, float_format="%.6f")
        n_models = len(main_folds) * len(cfg.infer.tta) + len(aux_folds or [])
        accelerator.print(f"{len(images)} images x {n_models} model passes in {seconds:.1f} s "
                          f"({len(images) / max(seconds, 1e-9):.2f} images/s on {accelerator.num_processes} "
                          f"process(es)) -> {out}")
    accelerator.end_training()
    return submission
