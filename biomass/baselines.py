"""A colour-histogram ridge regression: the floor any image model must clear.

`python -m biomass.baselines DATA_DIR --out submission.csv` fits on DATA_DIR/train.csv and writes a submission for
DATA_DIR/test.csv. Features: per-image HSV histograms (hue 16 bins, saturation 8, value 8, normalised) and the mean
and std of each RGB channel, from the image downscaled to 256 px wide; RidgeCV on standardised features, one model
for all five targets, predictions clipped at 0. It sees no NDVI or Height, like the test set.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from biomass.constants import TARGETS, sample_id
from biomass.data.table import read_test, read_train
from biomass.errors import DataError, run_cli


def colour_features(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_REDUCED_COLOR_4)
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
    pred = np.clip(model.predict(xt), 0, None)
    by_image = {p: dict(zip(TARGETS, row)) for p, row in zip(images["image_path"], pred)}
    return pd.DataFrame({"sample_id": rows["sample_id"],
                         "target": [by_image[p][t] for p, t in zip(rows["image_path"], rows["target_name"])]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biomass.baselines", description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, default=Path("baseline_submission.csv"))
    args = parser.parse_args(argv)
    fit_predict(args.data).to_csv(args.out, index=False, float_format="%.6f")
    print(f"colour-histogram ridge -> {args.out}")
    return 0


__all__ = ["colour_features", "fit_predict", "sample_id"]

if __name__ == "__main__":
    run_cli(main)
