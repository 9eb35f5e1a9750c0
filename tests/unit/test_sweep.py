"""Sweeps: content-addressed children shared across ablation files, device/thread/port split of the local executor,
resume (reuse, continue, retry), the tracking server stopped whole, the refusals, the graveyard report; and (slow)
a real sweep killed with SIGKILL and resumed ends with the table of one never killed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import DEMO, REPO, FakeExecutor, only_folder

import biomass.ablate.sweep as sweep
from biomass.ablate.__main__ import main
from biomass.ablate.executors import local_slots, with_port
from biomass.ablate.spec import load_ablation
from biomass.tracking.server import TrackingServer, session_processes
from biomass.errors import BiomassError, ConfigError, run_cli

LOSSES, LOG_TARGETS = REPO / "ablations" / "losses.yaml", REPO / "ablations" / "log_targets.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from biomass.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("sweep") / "data", n_train=12, n_test=4, seed=0, width=128, height=64)


def test_identical_children_share_one_key_and_seeds_pair():
    ablations = [load_ablation(p, DEMO) for p in (LOSSES, LOG_TARGETS)]
    children, uses = sweep.plan(ablations, 2, "sweep", Path("/s"))
    assert len(children) == 2 * (1 + 4 + 1)  # one baseline per seed, shared by both files
    for seed in (0, 1):
        assert uses["losses"][("baseline", seed)] == uses["log_targets"][("baseline", seed)]
    assert uses["losses"][("baseline", 0)] != uses["losses"][("baseline", 1)]
    shared = children[uses["losses"][("baseline", 0)]]
    assert shared.uses == [("losses", "baseline", 0), ("log_targets", "baseline", 0)]
    assert shared.config.seed == 0 and shared.config.tracking.experiment == "sweep"
    assert {s for (_, s) in uses["losses"]} == {0, 1}  # every variant has seed k of the baseline
    # the key is the resolved config: one changed value gives another child
    other = sweep.child_key(shared.config.model_copy(update={"seed": 5}))
    assert other != shared.key and sweep.child_key(shared.config) == shared.key


def test_local_slots_split_devices_threads_and_ports():
    slots = local_slots(2, None, None, gpus=["0", "1", "2", "3"], cpus=16)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1", "2,3"]
    assert {s["OMP_NUM_THREADS"] for s in slots} == {"8"} and slots[0]["MKL_NUM_THREADS"] == "8"
    assert [s["CUDA_VISIBLE_DEVICES"] for s in local_slots(2, 1, 3, gpus=["4", "5", "6"], cpus=16)] == ["4", "5"]
    cpu = local_slots(2, None, None, gpus=[], cpus=2)
    assert cpu == [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}] * 2
    with pytest.raises(ConfigError, match="needs 3 GPUs"):
        local_slots(3, None, None, gpus=["0", "1"], cpus=8)
    with pytest.raises(ConfigError, match="no GPU"):
        local_slots(1, 1, None, gpus=[], cpus=8)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "-m", "biomass.run", "x.yaml"]
    assert with_port(cmd, 29555)[3:6] == ["--main_process_port", "29555", "--cpu"]


def test_resume_reuses_completed_continues_interrupted_and_retries_failed(tmp_path, monkeypatch, data):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.chdir(tmp_path)
    fake = FakeExecutor(data, {"mse": 0.5})
    monkeypatch.setattr(sweep, "make_executor", lambda *a: fake)
    over = [f"data.root={data}", "aux=null"]
    assert sweep.run_sweep([LOSSES, LOG_TARGETS], DEMO, over, 1, tmp_path / "runs") == 0
    assert len(fake.calls) == 6 and sum(c["variant"] == "baseline" for c in fake.calls) == 1  # baseline once
    root = only_folder(tmp_path / "runs")
    table = pd.read_csv(root / "losses" / "comparison.csv")
    keys = json.loads((root / "losses" / "summary.json").read_text())["children"]
    assert json.loads((root / "log_targets" / "summary.json").read_text())["children"]["baseline.seed0"] == \
        keys["baseline.seed0"]

    # a child left interrupted, one failed, one never started: resume continues, retries, starts; reuses the rest
    interrupted, failed, missing = (root / "children" / keys[k] / "run" for k in ("mse.seed0", "r2.seed0",
                                                                               "quantile.seed0"))
    (interrupted / "run.json").write_text(json.dumps({"status": "killed"}))
    (failed / "run.json").write_text(json.dumps({"status": "failed"}))
    import shutil

    shutil.rmtree(missing.parent)
    fake.calls.clear()
    assert run_cli_code(["--resume", str(root)]) == 0
    by_variant = {c["variant"] or "?": c for c in fake.calls}
    assert len(fake.calls) == 3 and fake.calls[0]["resume"] and "--resume" in fake.calls[0]["cmd"]
    assert {"r2", "quantile"} <= set(by_variant) and "--force" in by_variant["r2"]["cmd"]
    again = pd.read_csv(root / "losses" / "comparison.csv")
    pd.testing.assert_series_equal(table["score"], again["score"])
    assert "losses" in (root / "graveyard.md").read_text() and (root / "graveyard.png").is_file()

    # a child that keeps failing is retried at most MAX_RETRIES times over the resumes, then reported failed
    fake.fail = True
    (failed / "run.json").write_text(json.dumps({"status": "failed"}))
    for _ in range(sweep.MAX_RETRIES + 1):
        fake.calls.clear()
        sweep.run_sweep([], None, [], resume=root)
    assert fake.calls == []
    attempts = json.loads((failed.parent / sweep.ATTEMPTS).read_text())
    assert len(attempts) == 1 + sweep.MAX_RETRIES


def run_cli_code(argv: list[str]) -> int:
    try:
        run_cli(main, argv)
    except SystemExit as e:
        return e.code
    return 0


def test_report_cli_rewrites_the_graveyard(tmp_path, monkeypatch, data, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setattr(sweep, "make_executor", lambda *a: FakeExecutor(data, {"log1p": 1.0}))
    sweep.run_sweep([LOG_TARGETS], DEMO, [f"data.root={data}", "aux=null", "tracking.mlflow=false"], 2,
                    tmp_path / "runs")
    root = only_folder(tmp_path / "runs")
    (root / "graveyard.md").unlink()
    assert main(["report", str(root)]) == 0
    text = (root / "graveyard.md").read_text()
    assert "## `log_targets`: confirmed" in text and "| log1p | not_better |" in text


@pytest.mark.parametrize("argv, words", [
    (["--executor", "ray", "--address", "auto"], ["http", "MLFLOW_TRACKING_URI"]),
    (["--parallel", "0"], ["--parallel"]),
    (["--resume", "/nonexistent/sweep"], ["sweep.json"]),
])
def test_refusals_are_one_line(tmp_path, monkeypatch, capsys, data, argv, words):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    files = [] if "--resume" in argv else [str(LOG_TARGETS), "--base", str(DEMO), f"data.root={data}"]
    assert run_cli_code([*files, *argv, "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    for w in words:
        assert w in err
    assert not (tmp_path / "runs").exists()


def test_missing_ray_names_the_extra(monkeypatch):
    from biomass.ablate.executors import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(BiomassError, match=r'pip install -e "\.\[ray\]"'):
        import_ray()


def test_claim_direction_is_checked(tmp_path):
    path = tmp_path / "a.yaml"
    body = {"name": "a", "base": str(DEMO), "knobs": ["main.loss"], "variants": {"mse": {"main.loss": {"name": "mse"}}}}
    for bad, words in (({"claim_direction": "beter"}, "did you mean 'better'"), ({"claim_direction": {"mes": "better"}},
                       "'mes'"), ({"margin": -1}, "margin")):
        path.write_text(yaml.safe_dump({**body, **bad}))
        with pytest.raises(ConfigError, match=words):
            load_ablation(path)
    path.write_text(yaml.safe_dump({**body, "claim_direction": {"mse": "worse"}, "margin": 0.01}))
    a = load_ablation(path)
    assert a.direction("mse") == "worse" and a.margin == 0.01
    path.write_text(yaml.safe_dump(body))
    assert load_ablation(path).direction("mse") == "not_better"


@pytest.mark.slow
def test_tracking_server_stops_with_every_process(tmp_path):
    server = TrackingServer(f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "server.log")
    url = server.start()
    sid = server.session
    assert server.healthy() and url.startswith("http://127.0.0.1:")
    assert len(session_processes(sid)) >= 1
    server.stop()
    assert session_processes(sid) == []
    assert not server.healthy()
