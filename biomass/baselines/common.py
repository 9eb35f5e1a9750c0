"""What the baselines share: predictions per image as Kaggle's long submission."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from biomass.constants import TARGETS


def long_submission(rows: pd.DataFrame, image_paths: Sequence[str], pred: np.ndarray) -> pd.DataFrame:
    """Per-image predictions (image_paths x TARGETS) as Kaggle's long submission for test.csv's rows."""
    by_image = {p: dict(zip(TARGETS, row)) for p, row in zip(image_paths, pred)}
    return pd.DataFrame({"sample_id": rows["sample_id"],
                         "target": [by_image[p][t] for p, t in zip(rows["image_path"], rows["target_name"])]})
