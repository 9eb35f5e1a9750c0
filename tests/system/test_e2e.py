"""The real entry points on a tiny demo: train both stages, infer, score; MLflow; determinism; 1 vs 2 processes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from biomass.constants import TARGETS

from helpers import DEMO, DEMO_FILE, REPO, TINY, train


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from biomass.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("data") / "demo", n_train=15, n_test=5, seed=1, width=128, height=64)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_data, mlflow_uri) -> Path:
    return train(tmp_path_factory.mktemp("runs") / "tiny", tiny_data)


def test_run_directory_is_complete(run_dir, tiny_data):
    for name in ("config.yaml", "folds.csv", "oof.csv", "oof_deployable.csv", "aux_oof.csv", "metrics.json",
                 "run.json", "plots/oof_scatter.png"):
        assert (run_dir / name).is_file(), name
    for stage in ("main", "aux"):
        for k in range(3):
            assert (run_dir / stage / f"fold{k}" / "best.safetensors").is_file()
            meta = json.loads((run_dir / stage / f"fold{k}" / "best.json").read_text())
            assert set(meta["scalers"]) >= {"targets"}
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    train_ids = set(pd.read_csv(tiny_data / "train.csv")["sample_id"])
    oof = pd.read_csv(run_dir / "oof.csv")
    assert list(oof.columns) == ["sample_id", "target"] and set(oof["sample_id"]) == train_ids
    folds = pd.read_csv(run_dir / "folds.csv")
    assert len(folds) == 15 and set(folds["main_fold"]) == {0, 1, 2}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("cv/weighted_r2", "cv/weighted_r2_deployable", "cv/aux_Pre_GSHH_NDVI_r2", "cv/aux_Height_Ave_cm_r2",
                *(f"cv/{t}_r2" for t in TARGETS)):
        assert isinstance(metrics[key], float), key
    assert metrics["cv/images_scored"] == 15 and metrics["cv/deployable_images_scored"] == 15
    assert metrics["cv/deployable_leak"] is False  # demo: init_from main/same_fold with shared folds


def test_mlflow_parent_with_nested_fold_runs(run_dir, mlflow_uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("run_dir") == str(run_dir)]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert "cv/weighted_r2" in parent.data.metrics and "cv/weighted_r2_deployable" in parent.data.metrics
    assert parent.data.params["main.train.epochs"] == "2"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == [f"{s}/fold{k}" for s in ("aux", "main") for k in range(3)]
    main0 = next(r for r in children if r.info.run_name == "main/fold0")
    history = client.get_metric_history(main0.info.run_id, "val/weighted_r2")
    assert [m.step for m in history] == [0, 1]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "oof.csv", "metrics.json", "plots"} <= artifacts


def test_infer_writes_a_scorable_submission(run_dir, tiny_data, tmp_path):
    from biomass.submission import write_submission as infer
    from biomass.score import score_files

    out = tmp_path / "submission.csv"
    sub = infer(run_dir, tiny_data, out)
    test = pd.read_csv(tiny_data / "test.csv")
    written = pd.read_csv(out)
    assert list(written["sample_id"]) == list(test["sample_id"])  # every row once, in test.csv's order
    assert (written["target"] >= 0).all() and len(sub) == 25
    assert -5 < score_files(tiny_data / "solution.csv", out)["weighted_r2"] <= 1


def test_image_only_run_without_aux_infers(tmp_path, tiny_data, mlflow_uri):
    from biomass.submission import write_submission as infer

    run = train(tmp_path / "image_only", tiny_data, "aux=null", "main.model.head={name: image_only}",
                "main.train.epochs=1")
    sub = infer(run, tiny_data, tmp_path / "submission.csv")
    assert len(sub) == 25 and (sub["target"] >= 0).all()


def test_fusion_run_without_aux_is_refused_at_inference(tmp_path, tiny_data, mlflow_uri):
    from biomass.errors import ConfigError
    from biomass.submission import write_submission as infer

    run = train(tmp_path / "fusion", tiny_data, "aux=null", "main.train.epochs=1")
    with pytest.raises(ConfigError, match="no aux stage"):
        infer(run, tiny_data, tmp_path / "submission.csv")


def test_infer_errors_name_the_problem(run_dir, tiny_data, tmp_path):
    from biomass.errors import BiomassError
    from biomass.submission import write_submission as infer

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "main" / "fold1" / "best.safetensors").unlink()
    with pytest.raises(BiomassError, match="main fold 1"):
        infer(broken, tiny_data, tmp_path / "s.csv")
    shutil.rmtree(broken)
    shutil.copytree(run_dir, broken)
    status = json.loads((broken / "run.json").read_text())
    (broken / "run.json").write_text(json.dumps({**status, "status": "running"}))
    with pytest.raises(BiomassError, match="did not complete"):
        infer(broken, tiny_data, tmp_path / "s.csv")
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    test = pd.read_csv(data / "test.csv")
    test.loc[0, "target_name"] = "Dry_Weeds_g"
    test.to_csv(data / "test.csv", index=False)
    with pytest.raises(BiomassError, match="Dry_Weeds_g"):
        infer(run_dir, data, tmp_path / "s.csv")


def test_same_seed_same_oof(tmp_path, tiny_data, mlflow_uri):
    extra = ["aux=null", "main.folds.train_folds=[0]", "tracking.mlflow=false"]
    a = train(tmp_path / "a", tiny_data, *extra)
    b = train(tmp_path / "b", tiny_data, *extra)
    assert (a / "oof.csv").read_bytes() == (b / "oof.csv").read_bytes()


def test_run_dir_that_exists_is_refused(tmp_path, tiny_data):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "x").write_text("")
    proc = subprocess.run([sys.executable, "-m", "biomass.run", str(DEMO), f"data.root={tiny_data}", *TINY,
                           "--run-dir", str(tmp_path / "r")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_data_root_that_does_not_exist_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "biomass.run", str(DEMO), "data.root=nowhere"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "nowhere").exists()  # never generated into


def test_demo_data_generated_on_first_use(tmp_path):
    from biomass.config.load import load_experiment
    from biomass.data.source import ensure_demo_data

    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(f"base: {DEMO}\ndata:\n  root: gen\n  demo: {{n_train: 6, n_test: 2, width: 64, height: 32}}\n")
    exp = load_experiment(exp_file)
    ensure_demo_data(exp)
    assert (tmp_path / "gen" / "train.csv").is_file() and len(list((tmp_path / "gen" / "train").glob("*.jpg"))) == 6


def test_two_processes_score_every_image_once_and_match_one_process(run_dir, tiny_data, tmp_path):
    """Two gloo CPU processes: training scores all images once; inference writes the same submission."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "accelerate_configs" / "cpu_ddp.yaml")]
    proc = subprocess.run([*launch, "-m", "biomass.run", str(DEMO), f"data.root={tiny_data}", *TINY, "aux=null",
                           "tracking.mlflow=false", "--run-dir", str(tmp_path / "r2")], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert metrics["cv/images_scored"] == 15
    oof = pd.read_csv(tmp_path / "r2" / "oof.csv")
    assert len(oof) == 75 and oof["sample_id"].is_unique

    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    from biomass.submission import write_submission as infer

    infer(run_dir, tiny_data, one)
    proc = subprocess.run([*launch, "-m", "biomass.infer", str(run_dir), "--data", str(tiny_data), "--out", str(two)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = pd.read_csv(one), pd.read_csv(two)
    assert list(a["sample_id"]) == list(b["sample_id"])
    assert (a["target"] - b["target"]).abs().max() <= 1e-5


@pytest.mark.slow
def test_readme_demo_learns(tmp_path):
    """README's main job as a newcomer runs it: the pretrained demo (experiments/demo.yaml, moved under tmp_path with
    its base made absolute so that its demo data and the converted weights land there, not in the repo or the
    home cache), through `accelerate launch`. It must learn: its CV and its deployable CV well above 0. (Its time
    is measured in docs/BENCHMARKS.md; the timeout only stops a hang.)"""
    experiment = tmp_path / "experiments" / "demo.yaml"
    experiment.parent.mkdir()
    text = DEMO_FILE.read_text()
    assert "base: ../biomass/configs/demo.yaml" in text
    experiment.write_text(text.replace("base: ../biomass/configs/demo.yaml",
                                       f"base: {REPO / 'biomass' / 'configs' / 'demo.yaml'}"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "BIOMASS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(["accelerate", "launch", "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"),
                           "-m", "biomass.run", str(experiment), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "demo_data" / "train.csv").is_file() and list((tmp_path / "cache").rglob("*.safetensors"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["cv/weighted_r2"] >= 0.6 and metrics["cv/weighted_r2_deployable"] >= 0.4, metrics
