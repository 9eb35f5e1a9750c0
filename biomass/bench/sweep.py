"""`python -m biomass.bench sweep`: the same 4 tiny children (a baseline and 3 loss variants of the demo at 32 px) as
one sweep at --parallel 1 and at --parallel 2, with the local executor and (when installed) Ray. Reports the wall-time
ratio and the per-child overhead: process start (the child's spawn to its run directory's config.yaml, written once
accelerate, torch and biomass are imported and the config validated) and, for Ray, task start (handed to Ray to the
child's spawn on a worker). MLflow is off: the sweep's tracking server is a fixed cost, not a per-child one."""
from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from biomass.bench.common import DEMO

TINY = ["main.image.size=[32,32]", "main.train.epochs=1", "main.train.batch_size=4", "data.num_workers=0",
        "main.model.backbone.model_name=resnet10t", "aux=null", "main.folds.splitter.n_splits=2",
        "tracking.mlflow=false"]
VARIANTS = {"mse": {"main.loss": {"name": "mse"}}, "log_cosh": {"main.loss": {"name": "log_cosh"}},
            "r2": {"main.loss": {"name": "r2"}}}


def _one(ablation: Path, data: Path, runs: Path, executor: str, parallel: int) -> dict[str, Any]:
    from biomass.ablate.sweep import ATTEMPTS, CHILDREN, SweepOptions, run_sweep

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the sweep's tables: keep stdout for --json
        failed = run_sweep([ablation], None, [f"data.root={data}", *TINY], 1, runs,
                           SweepOptions(executor=executor, parallel=parallel))
    wall = time.perf_counter() - start
    (sweep_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    process_start, task_start, child_s = [], [], []
    for folder in (sweep_dir / CHILDREN).iterdir():
        attempt = json.loads((folder / ATTEMPTS).read_text())[-1]
        process_start.append((folder / "run" / "config.yaml").stat().st_mtime - attempt["spawned"])
        task_start.append(attempt["queued_s"])
        child_s.append(attempt["duration_s"])
    out = {"wall_s": wall, "failed": failed, "children": len(child_s), "child_s_median": statistics.median(child_s),
           "process_start_s_median": statistics.median(process_start)}
    if executor == "ray":
        out["task_start_s_median"] = statistics.median(task_start)
    return out


def sweep_bench(work: Path, executors: list[str] | None = None) -> dict[str, Any]:
    from biomass.data.synthetic import generate

    if executors is None:
        executors = ["local"]
        with contextlib.suppress(ImportError):
            import ray  # noqa: F401

            executors.append("ray")
    data = generate(work / "data", n_train=12, n_test=4, seed=0, width=128, height=64)
    ablation = work / "bench_sweep.yaml"
    ablation.write_text(yaml.safe_dump({"name": "bench_sweep", "base": str(DEMO), "knobs": ["main.loss"],
                                        "variants": VARIANTS}))
    result: dict[str, Any] = {}
    for executor in executors:
        r = {p: _one(ablation, data, work / f"{executor}-{p}", executor, p) for p in (1, 2)}
        result[executor] = {"parallel_1": r[1], "parallel_2": r[2], "speedup": r[1]["wall_s"] / r[2]["wall_s"]}
    return result
