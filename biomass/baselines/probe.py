"""The linear probe: frozen pretrained features of an experiment's backbone, pooled, and a ridge regression.

The standing baseline for a pretrained backbone (the first one a reviewer asks for): the experiment's main-stage
backbone with its weights file, the experiment's image size, layout, normalisation and pooling, in eval mode with no
augmentation; images framed as the inference chain frames them (uncropped unless `infer.crop: boxes`). On the
pooled features: standardisation, then ridge regression on the five targets, its alpha chosen by 5-fold CV of the
competition's weighted R2 on the training images only (sklearn's GridSearchCV), predictions clipped at 0.
(Leave-one-out RidgeCV picked alphas of 0.01 on 96 images of 1280 features and scored 0.3 below this on unseen
images.) It sees no NDVI or
Height, like the test set. Fine-tuning that does not beat this has distorted its features, not used them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

ALPHAS = np.logspace(-1, 6, 29)
INNER_FOLDS = 5


def fit_ridge(x: np.ndarray, y: np.ndarray):
    """Standardise + ridge, alpha by inner K-fold CV of the weighted R2 (the score the probe is judged by)."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from biomass.metrics import weighted_r2

    search = GridSearchCV(make_pipeline(StandardScaler(), Ridge()), {"ridge__alpha": ALPHAS},
                          scoring=make_scorer(weighted_r2), cv=KFold(INNER_FOLDS, shuffle=True, random_state=0))
    return search.fit(x, y)


def probe_features(model, reader, n: int, batch_size: int = 16) -> np.ndarray:
    """(n, d) pooled features of images 0..n-1 of `reader` through `model` (a stage model in eval mode)."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            images = torch.from_numpy(np.stack([reader(i) for i in range(start, min(start + batch_size, n))]))
            out.append(model.features(images.permute(0, 3, 1, 2)).float().numpy())
    return np.concatenate(out)


def fit_predict_probe(experiment: Path, root: Path, overrides: tuple[str, ...] = ()) -> pd.DataFrame:
    """The probe fitted on `root`/train.csv, its submission for `root`/test.csv (Kaggle's long format). Tables,
    images and crop boxes are read and checked as a run and inference read them; images are framed as the chain
    frames the main stage's."""
    from biomass.baselines.common import long_submission
    from biomass.chain import needs_boxes
    from biomass.config.load import load_experiment
    from biomass.constants import TARGETS
    from biomass.data.source import load_test_images, load_train_data
    from biomass.engine.build import build_stage_model
    from biomass.stages import MAIN

    cfg = load_experiment(experiment, [f"data.root={root}", *overrides]).config
    train = load_train_data(cfg)
    rows, test = load_test_images(cfg, Path(root), needs_boxes(cfg))
    model = build_stage_model(MAIN, cfg.main)[0].eval()  # the backbone with its weights file; built once
    x = probe_features(model, train.images.stage_reader(cfg, MAIN, training=False), len(train.images))
    xt = probe_features(model, test.stage_reader(cfg, MAIN, training=False), len(test))
    ridge = fit_ridge(x, train.table[list(TARGETS)].to_numpy())
    return long_submission(rows, test.image_paths, np.clip(ridge.predict(xt), 0, None))
