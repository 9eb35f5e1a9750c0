"""The one MLflow module: two sweeps started together on a fresh SQLite store both create their runs (the store is
created under the one lock, whoever creates it), and every experiment biomass creates carries the experiment-kind
tag MLflow 3's UI reads to open it in its model-training view."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEMO, REPO

# One sweep's MLflow side as `biomass.ablate` builds it: the sweep run and the ablation's parent run.
SWEEP_RUNS = """
import sys
from pathlib import Path
from biomass.ablate.spec import load_ablation
from biomass.tracking.runs import SweepRuns

folder = Path(sys.argv[1])
ablation = load_ablation(Path(sys.argv[2]), Path(sys.argv[3]))
runs = SweepRuns([ablation], 1, folder, int(sys.argv[4]), "local", "sweep", {})
runs.finish([], "FINISHED")
runs.close()
print("created", runs.sweep_run_id)
"""


def env(uri: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri}


def start_two_sweeps(tmp_path: Path, parallel: int) -> tuple[list[subprocess.CompletedProcess], str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", SWEEP_RUNS, str(tmp_path / f"sweep{i}"),
                               str(REPO / "ablations" / "post_processing.yaml"), str(DEMO), str(parallel)],
                              env=env(uri), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path) for i in range(2)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done, uri


@pytest.mark.parametrize("attempt", range(5))
def test_two_sweeps_on_a_fresh_sqlite_store_both_start(tmp_path, attempt):
    from mlflow.tracking import MlflowClient

    done, uri = start_two_sweeps(tmp_path, parallel=1)
    for p in done:
        assert p.returncode == 0 and "created" in p.stdout, p.stderr[-1500:]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sweep")
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    assert sum(r.data.tags.get("role") == "sweep" for r in runs) == 2


@pytest.mark.slow
def test_two_parallel_sweeps_start_their_servers_on_one_fresh_store(tmp_path):
    """Each parallel sweep starts an `mlflow server` over the store; the servers create it in turn."""
    done, _ = start_two_sweeps(tmp_path, parallel=2)
    for p in done:
        assert p.returncode == 0 and "created" in p.stdout, p.stderr[-1500:]


def test_a_training_run_tags_its_experiment(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from biomass.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = Tracker(True)
    tracker.start("tagged", "run", {"a": 1}, {})
    tracker.end()
    found = MlflowClient(tracking_uri=uri).get_experiment_by_name("tagged")
    assert found.tags.get("mlflow.experimentKind") == "custom_model_development"
