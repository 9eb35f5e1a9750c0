"""Inference-chain benchmark: images/s of biomass.submission on a run directory."""
from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from biomass.bench.common import machine

def infer_bench(run_dir: Path, data: Path, batch_size: int | None, repeats: int) -> dict[str, Any]:
    from biomass.rundir import RunDir
    from biomass.stages import AUX, MAIN
    from biomass.submission import write_submission

    run = RunDir(run_dir)
    cfg = run.completed()
    times, n_images = [], 0
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        for _ in range(repeats):
            start = time.perf_counter()
            sub = write_submission(run_dir.resolve(), data.resolve(), Path(tmp) / "submission.csv", batch_size)
            times.append(time.perf_counter() - start)
            n_images = sub["sample_id"].str.rsplit("__", n=1).str[0].nunique()
    n_main = len(run.trained_folds(MAIN, cfg.main))
    n_aux = len(run.trained_folds(AUX, cfg.aux)) if cfg.aux else 0
    seconds = statistics.median(times)
    return {"images_per_s": n_images / seconds, "seconds": seconds, "images": int(n_images),
            "model_passes_per_image": n_main * len(cfg.infer.tta) + n_aux,
            "settings": {"run_dir": str(run_dir), "data": str(data), "repeats": repeats, "batch_size":
                         batch_size or cfg.infer.batch_size, "size": list(cfg.main.image.size),
                         "backbone": cfg.main.model.backbone.get("model_name"), "num_workers": cfg.data.num_workers,
                         "runs_s": times, **machine()}}


