"""The two stages of the pipeline and every fact about them, in one place.

`main` maps an image (+ NDVI and Height) to the five biomass targets; `aux` maps an image to NDVI and Height, which
the test set lacks. Code asks the Stage (its targets, inputs, score, metric names, seed stream, config section)
instead of branching on the strings "main" and "aux".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from biomass.constants import TABULAR, TARGETS
from biomass.metrics import per_target_r2, weighted_r2

if TYPE_CHECKING:
    from biomass.config.schema import ExperimentConfig, StageConfig


@dataclass(frozen=True)
class Stage:
    name: str
    targets: tuple[str, ...]  # what the stage predicts, in output order
    inputs: tuple[str, ...]  # tabular inputs it reads next to the image
    score_metric: str  # the validation score's metric name: `val/<score_metric>`
    fold_metric: str  # per-fold best score: `fold/<fold_metric>`
    seed_offset: int  # a run's stage seed is seed * 100 + seed_offset: the stages draw from separate streams

    def config(self, cfg: ExperimentConfig) -> StageConfig | None:
        """This stage's config section (None: the experiment has no such stage)."""
        return getattr(cfg, self.name)

    def crops(self, cfg: ExperimentConfig, training: bool) -> bool:
        """Whether this stage's images are cropped to their boxes: in training as its `image.crop` says; in the
        chain (`training=False`) only when `infer.crop: boxes` frames each stage as it trained, too."""
        stage_cfg = self.config(cfg)
        return stage_cfg is not None and stage_cfg.image.crop and (training or cfg.infer.crop == "boxes")

    def seed(self, run_seed: int) -> int:
        return run_seed * 100 + self.seed_offset

    def score(self, y: np.ndarray, p: np.ndarray) -> dict[str, float]:
        """Validation metrics in original units: `score` (weighted R² for main, mean R² of NDVI/Height for aux)
        and `r2/<target>` per target."""
        per = per_target_r2(y, p, self.targets)
        out = {f"r2/{k}": v for k, v in per.items()}
        out["score"] = weighted_r2(y, p) if self.targets == TARGETS else float(np.mean(list(per.values())))
        return out


MAIN = Stage("main", TARGETS, TABULAR, "weighted_r2", "weighted_r2", 0)
AUX = Stage("aux", TABULAR, (), "mean_r2", "aux_mean_r2", 1)
STAGES: tuple[Stage, ...] = (MAIN, AUX)  # training order: the aux stage may start from a main checkpoint


def configured(cfg: ExperimentConfig) -> list[Stage]:
    """The stages this experiment trains, in training order."""
    return [s for s in STAGES if s.config(cfg) is not None]


def by_name(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)

