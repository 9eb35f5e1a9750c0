"""The real gold architecture end to end on this machine: `vit_huge_plus_patch16_dinov3` (840 M parameters, random
init, no weights file) through `biomass.run` with all 5 + 5 folds, one epoch each, at 64 px on rendered data, then
`biomass.infer`, whose peak memory must stay near two models' weights (fold models load one at a time).

Slow (about 15-30 minutes on 2 cores): `python -m pytest -m slow tests/system/test_gold_smoke.py`. The same
commands are in README ("Gold on a laptop"); docs/BENCHMARKS.md records a run's time and peak RSS.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from helpers import REPO

GOLD = REPO / "experiments" / "gold.yaml"
SMOKE = ["main.model.backbone.weights=null", "main.image.size=[64,64]", "aux.image.size=[64,64]",
         "main.train.epochs=1", "aux.train.epochs=1", "data.num_workers=0", "tracking.mlflow=false"]
VIT_H_PLUS_BYTES = 840.5e6 * 4  # one fp32 ViT-H+ (parameters)


def peak_rss_of(cmd: list[str], env: dict[str, str]) -> tuple[int, int]:
    """(exit code, peak RSS in bytes) of a command run as the only child of a fresh Python process."""
    probe = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, stdout=subprocess.PIPE, text=True)
    return proc.returncode, int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_gold_vit_h_plus_trains_and_infers_on_a_cpu(tmp_path):
    from biomass.data.synthetic import generate

    data = generate(tmp_path / "data", n_train=12, n_test=4, seed=3, width=256, height=128)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = tmp_path / "run"
    rc, train_rss = peak_rss_of([sys.executable, "-m", "biomass.run", str(GOLD), f"data.root={data}", *SMOKE,
                                 "--run-dir", str(run)], env)
    assert rc == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["cv/images_scored"] == 12 and "cv/weighted_r2_deployable" in metrics
    assert sorted(metrics["folds"]["main"]) == sorted(metrics["folds"]["aux"]) == ["0", "1", "2", "3", "4"]
    sub = tmp_path / "submission.csv"
    rc, infer_rss = peak_rss_of([sys.executable, "-m", "biomass.infer", str(run), "--data", str(data), "--out",
                                 str(sub)], env)
    assert rc == 0
    assert len(pd.read_csv(sub)) == 4 * 5
    # Fold-at-a-time: one model resident while its checkpoint is read (two models' weights) plus the runtime; all
    # ten resident would be ~34 GB.
    assert infer_rss < 2.8 * VIT_H_PLUS_BYTES, f"inference peak RSS {infer_rss / 2**30:.1f} GiB"
    print(f"\ngold smoke: train peak RSS {train_rss / 2**30:.1f} GiB, infer peak RSS {infer_rss / 2**30:.1f} GiB")
