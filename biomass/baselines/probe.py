"""The linear probe: frozen pretrained features of an experiment's backbone, pooled, and a ridge regression.

The standing baseline for a pretrained backbone (the first one a reviewer asks for): the experiment's main-stage
backbone with its weights file, the experiment's image size, layout, normalisation and pooling, in eval mode with no
augmentation; images framed as the inference chain frames them (uncropped unless `infer.crop: boxes`). On the
pooled features: standardisation, then ridge regression on the five targets, each target's alpha chosen by
leave-one-out CV on the training images only (sklearn's RidgeCV), predictions clipped at 0. It sees no NDVI or
Height, like the test set. Fine-tuning that does not beat this has distorted its features, not used them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

ALPHAS = np.logspace(-2, 5, 29)


def probe_features(cfg, root: Path, image_paths: list[str], batch_size: int = 16) -> np.ndarray:
    """(n, d) pooled features of the experiment's main-stage backbone (weights loaded, eval mode)."""
    import torch

    from biomass.chain import ChainSettings
    from biomass.data.source import ImageSet
    from biomass.data.table import check_images, read_crops
    from biomass.engine.build import build_stage_model
    from biomass.stages import MAIN

    stage = cfg.main
    crop = ChainSettings.of(cfg).crops(stage)
    sizes = check_images(root, image_paths, cfg.data.check_images)
    boxes = read_crops(root / cfg.data.crops, sizes) if crop else {}
    reader = ImageSet(root, list(image_paths), sizes, boxes).reader(stage.image.size, crop, stage.image.layout,
                                                                    None)
    model, _ = build_stage_model(MAIN, stage)
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(image_paths), batch_size):
            idx = range(start, min(start + batch_size, len(image_paths)))
            images = torch.from_numpy(np.stack([reader(i) for i in idx])).permute(0, 3, 1, 2)
            out.append(model.features(images).float().numpy())
    return np.concatenate(out)


def fit_predict_probe(experiment: Path, root: Path, overrides: tuple[str, ...] = ()) -> pd.DataFrame:
    """The probe fitted on `root`/train.csv, its submission for `root`/test.csv (Kaggle's long format)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from biomass.baselines import long_submission
    from biomass.config.load import load_experiment
    from biomass.constants import TARGETS
    from biomass.data.table import read_test, read_train

    cfg = load_experiment(experiment, [f"data.root={root}", *overrides]).config
    root = Path(root)
    train = read_train(root, cfg.data.train_csv)
    rows, images = read_test(root, cfg.data.test_csv)
    x = probe_features(cfg, root, list(train["image_path"]))
    xt = probe_features(cfg, root, list(images["image_path"]))
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS, alpha_per_target=True))
    model.fit(x, train[list(TARGETS)].to_numpy())
    return long_submission(rows, images, np.clip(model.predict(xt), 0, None))
