"""A run killed at any moment resumes to the same result; SIGTERM leaves a KILLED MLflow run and a resumable state."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DEMO, TINY, TINY_MAIN_ONLY

WITH_AUX = [*TINY, "aux.train.epochs=2"]  # both stages; an aux fold has a saved state mid-fold


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from biomass.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("d") / "demo", n_train=12, n_test=3, seed=2, width=96, height=48)


def start(run_dir: Path, data: Path, env: dict, overrides: list[str] = TINY_MAIN_ONLY) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "biomass.run", str(DEMO), f"data.root={data}", *overrides,
                             "--run-dir", str(run_dir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


def resume(run_dir: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "biomass.run", "--resume", str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_sigkill_mid_fold_then_resume_matches_uninterrupted(tmp_path, data):
    """SIGKILL mid aux fold 1 (main done, aux fold 0 done), then --resume: the oracle and the deployable CV, and
    every OOF file, equal an uninterrupted run's; MLflow continues the same run and children."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    whole = start(tmp_path / "whole", data, env, WITH_AUX)
    assert whole.wait(timeout=300) == 0, whole.stderr.read()[-2000:]

    killed = start(tmp_path / "killed", data, env, WITH_AUX)
    wait_for(tmp_path / "killed" / "state" / "aux" / "fold1" / "progress.json", killed)  # mid aux fold 1
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["status"] == "running"
    done = resume(tmp_path / "killed", env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "main fold 2: already complete" in done.stdout and "aux fold 0: already complete" in done.stdout

    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    for key in ("cv/weighted_r2", "cv/weighted_r2_deployable", "cv/aux_Height_Ave_cm_r2"):
        assert a[key] == b[key], key
    for name in ("oof.csv", "aux_oof.csv", "oof_deployable.csv"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name
    for done in sorted((tmp_path / "whole").glob("*/fold*/done.json")):  # every epoch's numbers
        again = tmp_path / "killed" / done.relative_to(tmp_path / "whole")
        assert json.loads(again.read_text())["history"] == json.loads(done.read_text())["history"], again
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["status"] == "completed"
    assert not (tmp_path / "killed" / "state").exists() or not any((tmp_path / "killed" / "state").rglob("*.json"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    parents = [r for r in runs if r.data.tags.get("run_dir") == str(tmp_path / "killed")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # continued, not duplicated
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == [f"{s}/fold{k}" for s in ("aux", "main") for k in range(3)]


def test_sigterm_ends_killed_and_resumable(tmp_path, data):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    proc = start(tmp_path / "r", data, env)
    wait_for(tmp_path / "r" / "state" / "main" / "fold0" / "progress.json", proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    status = json.loads((tmp_path / "r" / "run.json").read_text())
    assert status["status"] == "killed"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(status["mlflow_run_id"]).info.status == "KILLED"
    done = resume(tmp_path / "r", env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert client.get_run(status["mlflow_run_id"]).info.status == "FINISHED"
    again = resume(tmp_path / "r", env)
    assert again.returncode == 2 and "already completed" in again.stderr
