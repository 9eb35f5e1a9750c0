"""Baselines any image model must clear: a colour-histogram ridge, and the linear probe (baselines.probe).

`python -m biomass.baselines DATA_DIR --out submission.csv [--method linear_probe --experiment EXP]` fits on
DATA_DIR/train.csv and writes a submission for DATA_DIR/test.csv. The colour ridge's features: per-image HSV histograms (hue 16 bins, saturation 8, value 8, normalised) and the mean
and std of each RGB channel, from the image downscaled to 256 px wide; RidgeCV on standardised features, one model
for all five targets, predictions clipped at 0. It sees no NDVI or Height, like the test set.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from biomass.baselines.common import long_submission
from biomass.constants import TARGETS
from biomass.data.table import read_test, read_train
from biomass.errors import BiomassError, DataError
from biomass.rundir import RunDir


def colour_features(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_REDUCED_COLOR_4 | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise DataError(f"image {path}: cannot be decoded")
    bgr = cv2.resize(bgr, (256, max(1, round(256 * bgr.shape[0] / bgr.shape[1]))), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    hists = [cv2.calcHist([hsv], [c], None, [bins], [0, top]).ravel()
             for c, bins, top in ((0, 16, 180), (1, 8, 256), (2, 8, 256))]
    hist = np.concatenate(hists) / hsv[..., 0].size
    rgb = bgr[..., ::-1].reshape(-1, 3).astype(np.float64) / 255
    return np.concatenate([hist, rgb.mean(0), rgb.std(0)])


def fit_predict(root: Path, train_csv: str = "train.csv", test_csv: str = "test.csv") -> pd.DataFrame:
    train = read_train(root, train_csv)
    rows, images = read_test(root, test_csv)
    x = np.stack([colour_features(root / p) for p in train["image_path"]])
    xt = np.stack([colour_features(root / p) for p in images["image_path"]])
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 25)))
    model.fit(x, train[list(TARGETS)].to_numpy())
    return long_submission(rows, images["image_path"], np.clip(model.predict(xt), 0, None))


def versus_baselines(experiment: Path, work: Path, data: Path | None = None, n_train: int = 96, n_test: int = 96,
                 seed: int = 123, width: int = 2000, height: int = 1000, overrides: tuple[str, ...] = ()
                 ) -> dict[str, object]:
    """Train `experiment` on data it has never seen and score its submission beside the colour ridge's and the
    linear probe's (the experiment's own backbone, frozen) on the same split.

    Without `data`, a fresh synthetic dataset (real labels, Kaggle layout, cardboard borders on ~30% of images) is
    rendered into `work/data` with a seed the demo never uses. The experiment runs as a user runs it (`biomass.run`
    then `biomass.infer`, each its own process) with `data.root` pointed there; decoded images are cached in
    `work/cache`. Returns both scores, the margin and the experiment's CV figures.
    """
    from biomass.data.synthetic import generate
    from biomass.score import score_files

    work = Path(work)
    if data is None:
        data = generate(work / "data", n_train=n_train, n_test=n_test, seed=seed, width=width, height=height)
    data = Path(data).resolve()
    if not (data / "solution.csv").is_file():
        raise DataError(f"{data}: no solution.csv (the hidden test labels) to score against")
    start = time.perf_counter()
    fit_predict(data).to_csv(work / "ridge_submission.csv", index=False, float_format="%.6f")
    ridge_s = time.perf_counter() - start
    ridge = score_files(data / "solution.csv", work / "ridge_submission.csv")
    from biomass.baselines.probe import fit_predict_probe

    start = time.perf_counter()
    fit_predict_probe(experiment, data, overrides).to_csv(work / "probe_submission.csv", index=False,
                                                          float_format="%.6f")
    probe_s = time.perf_counter() - start
    probe = score_files(data / "solution.csv", work / "probe_submission.csv")

    run_dir, sub = work / "run", work / "submission.csv"
    env = {**os.environ, "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")}
    steps = {"train": [sys.executable, "-m", "biomass.run", str(experiment), f"data.root={data}",
                       f"data.cache_dir={work / 'cache'}", *overrides, "--run-dir", str(run_dir)],
             "infer": [sys.executable, "-m", "biomass.infer", str(run_dir), "--data", str(data), "--out", str(sub)]}
    seconds = {}
    for step, cmd in steps.items():
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds[step] = time.perf_counter() - start
        if proc.returncode:
            tail = "\n".join(proc.stdout.splitlines()[-15:])
            raise BiomassError(f"{step} of {experiment} failed (exit {proc.returncode}):\n{tail}")
    ours = score_files(data / "solution.csv", sub)
    metrics = RunDir(run_dir).metrics()
    return {"experiment": str(experiment), "data": str(data), "ridge": ridge["weighted_r2"],
            "probe": probe["weighted_r2"], "model": ours["weighted_r2"],
            "margin_ridge": ours["weighted_r2"] - ridge["weighted_r2"],
            "margin_probe": ours["weighted_r2"] - probe["weighted_r2"],
            "cv": metrics.get("cv/weighted_r2"), "cv_deployable": metrics.get("cv/weighted_r2_deployable"),
            "ridge_per_target": ridge["per_target"], "probe_per_target": probe["per_target"],
            "model_per_target": ours["per_target"],
            "seconds": {"ridge": ridge_s, "probe": probe_s, **seconds}, "test_rows": ours["rows"]}
