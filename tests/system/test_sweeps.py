"""Sweeps and ablations that really train (tiny, on a CPU; all slow): an ablation end to end under MLflow (SQLite,
and a real `mlflow server`), and a sweep killed with SIGKILL and resumed ending with the table of one never killed."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import DEMO, REPO, only_folder

LOG_TARGETS = REPO / "ablations" / "log_targets.yaml"
TINY_ONE_EPOCH = ["main.image.size=[32,32]", "aux.image.size=[32,32]", "main.train.epochs=1", "aux.train.epochs=1",
                  "main.train.batch_size=4", "aux.train.batch_size=4", "data.num_workers=0",
                  "main.model.backbone.model_name=resnet10t", "aux.model.backbone.model_name=resnet10t"]


def _ablate(args: list[str], uri: str, cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    # PYTHONPATH: this checkout's biomass, not an installed one, in the sweep and in its children
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CI": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "biomass.ablate", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _parent_and_children(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "ablation"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def _check_parent(client, parent, name: str, knobs: str) -> None:
    tags = parent.data.tags
    assert tags["ablation"] == name and tags["knobs"] == knobs and tags["base"] == str(DEMO)
    assert tags.get("git.commit")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.csv", "comparison.md", "deltas.png", "runs.csv"} <= artifacts
    local = Path(client.download_artifacts(parent.info.run_id, "comparison.md"))
    assert "| variant |" in local.read_text()


@pytest.mark.slow
def test_ablation_end_to_end_sqlite(tiny_data, tmp_path):
    """Fast: main stage only (aux=null), a variant that completes and one that crashes; the crash is contained."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "claim": "end-to-end test", "base": str(DEMO),
        "knobs": ["main.loss", "main.model.backbone.model_name"],
        "variants": {"mse": {"main.loss": {"name": "mse"}},
                     "broken": {"main.model.backbone.model_name": "no_such_timm_model"}}}))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    proc = _ablate([str(path), "--runs-dir", str(tmp_path / "runs"), f"data.root={tiny_data}", *TINY_ONE_EPOCH, "aux=null",
                    "main.folds.splitter.n_splits=2"], uri, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one run failed: the others still ran and reported
    assert "no_such_timm_model" in proc.stdout and "1 run failed" in proc.stderr
    (sweep_dir,) = (tmp_path / "runs").iterdir()  # layout: RUNS_DIR/<timestamp>/<ablation>/ (was <ablation>/<ts>)
    out_dir = sweep_dir / "tiny"
    rows = {r["variant"]: r for r in json.loads((out_dir / "summary.json").read_text())["rows"]}
    assert rows["baseline"]["status"] == rows["mse"]["status"] == "completed"
    assert rows["broken"]["status"].startswith("failed") and "no_such_timm_model" in rows["broken"]["status"]
    assert rows["mse"]["deployable"] is None and rows["mse"]["ranked_by"] == "oracle"
    assert "no deployable CV" in (out_dir / "comparison.md").read_text()

    client, parent, children = _parent_and_children(uri, "tiny")
    assert parent.info.status == "FINISHED"
    _check_parent(client, parent, "tiny", "main.loss, main.model.backbone.model_name")
    assert parent.data.metrics["delta/mse/weighted_r2"] == pytest.approx(rows["mse"]["delta_oracle"])
    by_variant = {c.data.tags["variant"]: c for c in children}
    # the broken model is refused by the model check before the child creates its run directory or MLflow run
    assert set(by_variant) == {"baseline", "mse"}
    for name in ("baseline", "mse"):
        child = by_variant[name]
        assert child.info.status == "FINISHED" and child.data.tags["ablation"] == "tiny"
        assert child.data.tags["seed"] == "0" and "cv/weighted_r2" in child.data.metrics


@pytest.fixture
def mlflow_server(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'm.db'}",
                             "--default-artifact-root", str(tmp_path / "art")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not come up: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: the group this fixture started
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_ablation_end_to_end_mlflow_server(tiny_data, tmp_path, mlflow_server):
    """Both stages, two variants and the baseline against a real tracking server, read back over REST."""
    path = tmp_path / "tiny2.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny2", "base": str(DEMO), "knobs": ["main.loss", "main.targets"],
        "variants": {"log_cosh": {"main.loss": {"name": "log_cosh"}},
                     "log1p": {"main.targets.transform": "log1p"}}}))
    proc = _ablate([str(path), "--runs-dir", str(tmp_path / "runs"), f"data.root={tiny_data}", *TINY_ONE_EPOCH,
                    "main.folds.splitter.n_splits=2", "aux.folds.splitter.n_splits=2"], mlflow_server, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    client, parent, children = _parent_and_children(mlflow_server, "tiny2")
    assert parent.info.status == "FINISHED"
    _check_parent(client, parent, "tiny2", "main.loss, main.targets")
    for variant in ("log_cosh", "log1p"):
        for metric in ("weighted_r2", "weighted_r2_deployable"):
            assert f"delta/{variant}/{metric}" in parent.data.metrics
    assert sorted(c.data.tags["variant"] for c in children) == ["baseline", "log1p", "log_cosh"]
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["ablation"] == "tiny2"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"cv/weighted_r2", "cv/weighted_r2_deployable"} <= set(child.data.metrics)


TINY_TWO_FOLDS = ["main.image.size=[32,32]", "main.train.epochs=2", "main.train.batch_size=4", "data.num_workers=0",
        "main.model.backbone.model_name=resnet10t", "aux=null", "main.folds.splitter.n_splits=2"]


def _ablate_popen(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'm.db'}", "PYTHONPATH": str(REPO), "CI": "1"}
    return subprocess.Popen([sys.executable, "-m", "biomass.ablate", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_sweep_killed_and_resumed_ends_with_the_same_table(tmp_path, tiny_data):
    """Two sweeps of the same tiny ablation (baseline + log1p, 2 seeds, --parallel 2): one runs through; the other is
    killed with SIGKILL once a child has completed and a second is training, then resumed. Same scores."""
    args = [str(LOG_TARGETS), "--base", str(DEMO), f"data.root={tiny_data}", *TINY_TWO_FOLDS,
            "--seeds", "2", "--parallel", "2"]
    clean = _ablate_popen([*args, "--runs-dir", str(tmp_path / "clean")], tmp_path)
    out = clean.communicate(timeout=900)[0]
    assert clean.returncode == 0, out[-3000:]
    killed = _ablate_popen([*args, "--runs-dir", str(tmp_path / "killed")], tmp_path)
    deadline = time.time() + 600
    while time.time() < deadline:
        runs = list((tmp_path / "killed").glob("*/children/*/run/run.json"))
        done = [r for r in runs if json.loads(r.read_text()).get("status") == "completed"]
        if done and len(runs) > len(done):
            break
        time.sleep(0.5)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    root = only_folder(tmp_path / "killed")
    assert not (root / "log_targets" / "comparison.csv").exists()
    resumed = _ablate_popen(["--resume", str(root), "--parallel", "2"], tmp_path)
    out = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert "already completed" in out
    a = pd.read_csv(only_folder(tmp_path / "clean") / "log_targets" / "comparison.csv")
    b = pd.read_csv(root / "log_targets" / "comparison.csv")
    for col in ("variant", "score", "oracle", "delta_oracle", "ci_lo", "ci_hi", "verdict"):
        pd.testing.assert_series_equal(a[col], b[col], check_exact=False, atol=1e-6)
