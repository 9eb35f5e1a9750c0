"""The one MLflow module: two sweeps started together on a fresh SQLite store both create their runs (the store is
created under the one lock, whoever creates it), and every experiment biomass creates carries the experiment-kind
tag MLflow 3's UI reads to open it in its model-training view."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import DEMO, REPO

# One sweep's MLflow side as `biomass.ablate` builds it (the sweep run and the ablation's parent run), on a fresh store
# per try; both processes start each try together (a file barrier), so their first uses of the store collide.
SWEEP_RUNS = """
import sys, time
from pathlib import Path
import mlflow
from biomass.ablate.spec import load_ablation
from biomass.ablate.sweep import parent_record
from biomass.tracking.runs import SweepRuns

me, folder, tries, parallel = sys.argv[1], Path(sys.argv[2]), int(sys.argv[5]), int(sys.argv[6])
ablation = load_ablation(Path(sys.argv[3]), Path(sys.argv[4]))
for i in range(tries):
    (folder / f"ready{i}.{me}").touch()
    while len(list(folder.glob(f"ready{i}.*"))) < 2:
        time.sleep(0.005)
    mlflow.set_tracking_uri(f"sqlite:///{folder / f'mlflow{i}.db'}")
    runs = SweepRuns([parent_record(ablation, 1, folder)], 1, folder / f"sweep{i}.{me}", parallel, "local", "sweep", {})
    runs.finish([], "FINISHED")
    runs.close()
    print("created", i, runs.sweep_run_id, flush=True)
"""


def start_two_sweeps(tmp_path: Path, tries: int, parallel: int) -> list[subprocess.CompletedProcess]:
    """Two processes, each creating a sweep's runs on stores 0..tries-1, every store new to both."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", SWEEP_RUNS, str(me), str(tmp_path),
                               str(REPO / "ablations" / "post_processing.yaml"), str(DEMO), str(tries), str(parallel)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for me in range(2)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


@pytest.mark.parametrize("tries", [1, pytest.param(5, marks=pytest.mark.slow)])
def test_two_sweeps_on_a_fresh_sqlite_store_both_start(tmp_path, tries):
    """Tries (five in the slow suite) of two sweeps started together on a new SQLite store: both create their runs every time, in one
    experiment tagged for MLflow 3's model-training view."""
    from mlflow.tracking import MlflowClient

    for p in start_two_sweeps(tmp_path, tries, parallel=1):
        assert p.returncode == 0 and p.stdout.count("created") == tries, p.stderr[-1500:]
    for i in range(tries):
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / f'mlflow{i}.db'}")
        experiment = client.get_experiment_by_name("sweep")
        assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
        runs = client.search_runs([experiment.experiment_id])
        assert sum(r.data.tags.get("role") == "sweep" for r in runs) == 2


@pytest.mark.slow
def test_two_parallel_sweeps_start_their_servers_on_one_fresh_store(tmp_path):
    """Each parallel sweep starts an `mlflow server` over the new store; the servers create it in turn."""
    for p in start_two_sweeps(tmp_path, 1, parallel=2):
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


def page_text(url: str) -> str:
    """The text of a page once its scripts have run, as headless Chromium renders it."""
    import re

    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    return " ".join(re.sub(r"<[^>]+>", " ", dom).split())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (apt-get install chromium)")
def test_the_links_biomass_prints_open_mlflows_model_training_pages(tmp_path):
    """In a real browser (MLflow 3.17 chooses its GenAI or model-training pages per browser, before any experiment
    tag): the experiment link of `ui_links` shows the runs table, where the bare experiment URL shows the GenAI
    overview of the very same tagged experiment."""
    from biomass.tracking import experiment_id, open_client
    from biomass.tracking.server import free_port, ui_links

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = open_client(uri)
    exp = experiment_id(client, "biomass-ui")
    run = client.create_run(exp, run_name="a-training-run")
    client.log_metric(run.info.run_id, "cv/weighted_r2", 0.87)
    client.set_terminated(run.info.run_id)
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                           "--port", str(port)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(base, timeout=2)
                break
            except OSError:
                time.sleep(1)
        links = ui_links(base, exp, run.info.run_id, [run.info.run_id])
        training = page_text(links["experiment"])
        assert "a-training-run" in training and "matching run" in training, training[:800]
        assert "a-training-run" in page_text(links["runs"])
        bare = page_text(f"{base}/#/experiments/{exp}")
        assert "Traces" in bare and "a-training-run" not in bare, bare[:800]  # what the tag alone gets
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)
