"""Fault injection: a damaged run directory, an output place that cannot be written, two runs started at once, and
kills at random points. Each fault ends in one `error:` line naming the culprit (exit 2), or the work completes.

Unwritable places are made by putting a plain file where a folder must be (`.../a_file/sub.csv`): tests run as root
here and in CI, and root ignores permission bits, so `chmod` cannot make a folder read-only for them. The bad-input
table (tests/system/test_bad_inputs.py) holds the one-line cases for every output place; this file holds what needs
a trained run or several processes.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import DEMO, REPO

# The tiny demo, main stage 2 epochs x 3 folds, aux 1 epoch; the main stage reads its images as two halves while aux
# reads them whole: each stage reads its own images in the chain, so differing layouts make a working submission.
TINY = ["main.image.size=[32,32]", "aux.image.size=[32,32]", "main.train.epochs=2", "aux.train.epochs=1",
        "main.train.batch_size=4", "aux.train.batch_size=4", "data.num_workers=0",
        "main.model.backbone.model_name=resnet10t", "aux.model.backbone.model_name=resnet10t",
        "main.image.layout=halves", "tracking.mlflow=false"]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from biomass.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("faults") / "data", n_train=9, n_test=2, seed=3, width=64, height=32)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A completed run (in a real process, as a user makes it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    proc = subprocess.run([sys.executable, "-m", "biomass.run", str(DEMO), f"data.root={data}", *TINY,
                           "--run-dir", str(run)], env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def cli(capsys, module: str, args: list[str]) -> tuple[int, str, str]:
    from biomass.errors import run_cli

    if module == "biomass.infer":
        from biomass.infer import main
    else:
        from biomass.run import main
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, args)
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def one_error_line(code: int, err: str, *culprits: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for text in culprits:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def infer_args(run: Path, data: Path, out: Path) -> list[str]:
    return [str(run), "--data", str(data), "--out", str(out)]


# ------------------------------------------------------------------------------------- the happy path, layouts
@pytest.mark.slow
def test_differing_layouts_make_a_submission(trained, data, tmp_path, capsys):
    """main halves, aux whole: the chain reads each stage's images its own way (biomass.chain.Chain.reader)."""
    code, out, err = cli(capsys, "biomass.infer", infer_args(trained, data, tmp_path / "s.csv"))
    assert code == 0, err
    import pandas as pd

    sub = pd.read_csv(tmp_path / "s.csv")
    assert len(sub) == 2 * 5 and np.isfinite(sub["target"]).all()
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------- damaged run-directory files
RUN_FILES = ["run.json", "config.yaml", "folds.csv", "main/fold0/best.json", "main/fold1/best.safetensors",
             "aux/fold0/best.json", "aux/fold2/best.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "empty"])
@pytest.mark.parametrize("name", RUN_FILES)
def test_damaged_run_file_is_one_line_at_inference(trained, data, tmp_path, capsys, name, damage):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    target = run / name
    content = target.read_bytes()
    target.write_bytes(content[: len(content) // 2] if damage == "truncated" else b"")
    code, _, err = cli(capsys, "biomass.infer", infer_args(run, data, tmp_path / "s.csv"))
    one_error_line(code, err, name.split("/")[-1])
    assert str(run) in err
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.slow
def test_non_finite_checkpoint_cannot_make_a_submission(trained, data, tmp_path, capsys):
    """A checkpoint whose weights are NaN (a diverged or damaged fold): no submission, the fold named."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    path = run / "main" / "fold1" / "best.safetensors"
    state = load_file(str(path))
    save_file({k: v.fill_(float("nan")) if v.is_floating_point() and "target_space" not in k else v
               for k, v in state.items()}, str(path))
    code, _, err = cli(capsys, "biomass.infer", infer_args(run, data, tmp_path / "s.csv"))
    one_error_line(code, err, "main fold 1", "main/fold1/best.safetensors", "non-finite", "infer.tta=")
    assert not (tmp_path / "s.csv").exists()


def interrupted_copy(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    status = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**status, "status": "killed"}))
    return run


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_done_marker_is_one_line_at_resume(trained, tmp_path, capsys, damage):
    run = interrupted_copy(trained, tmp_path)
    done = run / "main" / "fold0" / "done.json"
    content = done.read_bytes()
    done.write_bytes(content[: len(content) // 2] if damage == "truncated" else b"")
    code, _, err = cli(capsys, "biomass.run", ["--resume", str(run)])
    one_error_line(code, err, str(done))
    assert json.loads((run / "run.json").read_text())["status"] == "failed"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["progress.json", "model-1.safetensors"])
def test_damaged_saved_state_is_one_line_at_resume(trained, tmp_path, capsys, name):
    """A fold interrupted mid-training: its saved state (progress.json written last) damaged."""
    run = interrupted_copy(trained, tmp_path)
    (run / "main" / "fold0" / "done.json").unlink()
    state = run / "state" / "main" / "fold0"
    state.mkdir(parents=True)
    (state / "progress.json").write_text(json.dumps({"progress": {"epoch": 1}, "param_groups": [],
                                                      "scheduler": {}}))
    ckpt = (run / "main" / "fold0" / "best.safetensors").read_bytes()
    (state / "model-1.safetensors").write_bytes(ckpt)
    (state / name).write_bytes((state / name).read_bytes()[:40])
    code, _, err = cli(capsys, "biomass.run", ["--resume", str(run)])
    one_error_line(code, err, str(state / name), "delete")


@pytest.mark.slow
def test_resume_of_a_run_without_status_file(trained, tmp_path, capsys):
    run = interrupted_copy(trained, tmp_path)
    (run / "run.json").write_text("")
    code, _, err = cli(capsys, "biomass.run", ["--resume", str(run)])
    one_error_line(code, err, str(run / "run.json"))


# ------------------------------------------------------------------------------------ no score on nothing
DIVERGE = [*TINY[:-1], "tracking.mlflow=false", "aux=null", "main.train.epochs=1", "main.folds.splitter.n_splits=2",
           "main.optim.lr=1e30"]


def test_diverged_training_is_one_line_naming_run_stage_fold(data, tmp_path, capsys):
    """lr 1e30: the validation predictions go NaN. Before: `completed`, cv/weighted_r2 1.0 over 0 images scored."""
    run = tmp_path / "run"
    code, _, err = cli(capsys, "biomass.run", [str(DEMO), f"data.root={data}", *DIVERGE, "--run-dir", str(run)])
    one_error_line(code, err, f"{run}/main/fold0", "main fold 0", "predictions are not finite")
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert not (run / "metrics.json").exists()


@pytest.mark.slow
def test_sweep_with_a_diverging_variant_ends_1_with_every_table(data, tmp_path):
    """Before: the sweep stopped after training every child (`oof.csv: has a header but no rows`, exit 2, no
    tables). Now the child is `failed` with its line and the sweep writes every table, exit 1."""
    import yaml

    spec = tmp_path / "diverge.yaml"
    spec.write_text(yaml.safe_dump({"name": "diverge", "claim": "a huge lr does not help", "base": str(DEMO),
                                    "knobs": ["main.optim.lr"], "variants": {"huge_lr": {"main.optim.lr": 1e30}}}))
    overrides = [o for o in DIVERGE if not o.startswith("main.optim.lr")]
    proc = subprocess.run([sys.executable, "-m", "biomass.ablate", str(spec), "--runs-dir", str(tmp_path / "runs"),
                           f"data.root={data}", *overrides], env=env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep,) = (tmp_path / "runs").iterdir()
    for name in ("comparison.csv", "comparison.md", "runs.csv", "deltas.png", "summary.json"):
        assert (sweep / "diverge" / name).is_file(), name
    assert (sweep / "graveyard.md").is_file()
    rows = {r["variant"]: r for r in json.loads((sweep / "diverge" / "summary.json").read_text())["rows"]}
    assert rows["baseline"]["status"] == "completed"
    assert rows["huge_lr"]["status"].startswith("failed") and "predictions are not finite" in rows["huge_lr"]["status"]
    assert "main fold 0" in rows["huge_lr"]["status"]


@pytest.mark.slow
def test_diverged_test_time_training_is_one_line(data, tmp_path, capsys):
    """`infer.ttt.lr` 1e30 in the deployable CV. Before: a FloatingPointError traceback, exit 1."""
    args = [str(DEMO), f"data.root={data}", *TINY, "main.train.epochs=1", "main.folds.splitter.n_splits=2",
            "aux.folds.splitter.n_splits=2", "infer.ttt={epochs: 1, lr: 1e30}", "--run-dir", str(tmp_path / "run")]
    code, _, err = cli(capsys, "biomass.run", args)
    one_error_line(code, err, "infer.ttt", "main fold 0", "fine-tuning loss is nan", "infer.ttt.lr")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


def test_a_completed_child_with_an_empty_oof_costs_its_row_the_ci_not_the_sweep(data, tmp_path, monkeypatch):
    """A child `completed` whose oof.csv has no rows (an older build, a damaged disk). Before: the sweep stopped at
    `error: …/oof.csv: has a header but no rows`, exit 2, no tables; now its row says why it has no CI."""
    import biomass.ablate.sweep as sweep
    from helpers import FakeExecutor

    class EmptyOof(FakeExecutor):
        def run(self, jobs, on_done):
            def done(job, outcome):
                run_dir = job.folder / "run"
                if json.loads((run_dir / "fake.json").read_text()).get("variant") == "mse":
                    (run_dir / "oof.csv").write_text("sample_id,target\n")
                on_done(job, outcome)
            super().run(jobs, done)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setattr(sweep, "make_executor", lambda *a: EmptyOof(data, {}))
    assert sweep.run_sweep([REPO / "ablations" / "losses.yaml"], DEMO, [f"data.root={data}", "aux=null"], 1,
                           tmp_path / "runs") == 0
    (root,) = (tmp_path / "runs").iterdir()
    rows = {r["variant"]: r for r in json.loads((root / "losses" / "summary.json").read_text())["rows"]}
    assert rows["mse"]["ci_lo"] is None and rows["mse"]["ci_note"].startswith("no CI: ") and "no rows" in \
        rows["mse"]["ci_note"]
    assert rows["r2"]["ci_lo"] is not None and (root / "graveyard.md").is_file()


# ---------------------------------------------------------------------------------------- unwritable places
def test_unwritable_mlflow_store_is_one_line_before_any_work(data, tmp_path, capsys, monkeypatch):
    """Before: 120 s of MLflow retries, then 181 lines."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/m.db")
    code, _, err = cli(capsys, "biomass.run", [str(DEMO), f"data.root={data}", *TINY, "tracking.mlflow=true",
                                               "--run-dir", str(tmp_path / "run")])
    one_error_line(code, err, "MLflow store", str(blocker))
    assert not (tmp_path / "run").exists()


def test_writability_check_uses_access_and_a_probe(tmp_path, monkeypatch):
    """What a non-root user meets with a read-only folder (root passes permission bits, so os.access is mocked)."""
    from biomass.errors import BiomassError
    from biomass.places import require_writable

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(BiomassError, match=f"--out {tmp_path}/x/s.csv: cannot write into {tmp_path}"):
        require_writable(tmp_path / "x" / "s.csv", "--out", is_file=True)


def test_ablation_runs_dir_unwritable(data, tmp_path, capsys):
    from biomass.ablate.__main__ import main
    from biomass.errors import run_cli

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, [str(REPO / "ablations" / "losses.yaml"), "--base", str(DEMO), f"data.root={data}",
                       "tracking.mlflow=false", "--runs-dir", str(blocker / "runs")])
    one_error_line(exit_.value.code, capsys.readouterr()[1], "--runs-dir", str(blocker))


# ---------------------------------------------------------------------------------------------- concurrency
@pytest.mark.slow
def test_two_default_runs_started_at_once_share_nothing_but_the_store(data, tmp_path):
    """Default run directories (runs/<name>/<timestamp>) in one working directory and one new MLflow SQLite store:
    both complete, into two directories, and the store holds both runs."""
    uri = f"sqlite:///{tmp_path / 'store' / 'm.db'}"
    args = [sys.executable, "-m", "biomass.run", str(DEMO), f"data.root={data}", *TINY[:-1], "aux=null",
            "main.train.epochs=1", "main.folds.splitter.n_splits=2"]
    procs = [subprocess.Popen(args, env=env(MLFLOW_TRACKING_URI=uri), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    dirs = sorted((tmp_path / "runs" / "demo").iterdir())
    assert len(dirs) == 2
    for d in dirs:
        assert json.loads((d / "run.json").read_text())["status"] == "completed"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    parents = {r.data.tags.get("run_dir") for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert parents == {str(d) for d in dirs}


def test_stamped_dirs_never_collide(tmp_path):
    """Many directories asked for in the same second, from threads: each caller owns a different one."""
    from concurrent.futures import ThreadPoolExecutor

    from biomass.rundir import stamped_dir

    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: stamped_dir(tmp_path / "runs"), range(16)))
    assert len(set(made)) == 16


def test_store_lock_serialises(tmp_path):
    """The lock around a SQLite store's first use is exclusive between processes."""
    from biomass.tracking import store_lock

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    code = ("import sys, time; from biomass.tracking import store_lock\n"
            f"with store_lock({uri!r}):\n    print('in', flush=True); time.sleep(1.5)\n")
    other = subprocess.Popen([sys.executable, "-c", code], env=env(), stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "in"
    start = time.time()
    with store_lock(uri):
        waited = time.time() - start
    other.wait(timeout=30)
    assert waited > 0.5


def test_force_removes_only_the_named_runs_outputs(tmp_path):
    from biomass.rundir import OUTPUTS, RunDir

    run, sibling = tmp_path / "a", tmp_path / "b"
    for folder in (run, sibling):
        for name in (*OUTPUTS[:3], "main/fold0/best.json", "notes.txt"):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text("{}")
    RunDir.create("demo", run, force=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert len(list(sibling.rglob("*"))) == 7  # untouched: 6 files and main/fold0/


# ------------------------------------------------------------------------------------------ kills, resumes
def start_training(run: Path, data: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "biomass.run", str(DEMO), f"data.root={data}", *TINY,
                             "--run-dir", str(run)], env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_point(seed: int) -> str:
    """Where a run is killed, drawn by the seed: mid main fold k (its saved state after epoch 0 exists while
    epoch 1 trains), or just after aux fold k's best epoch (the file stays; the rest of the run is still to come)."""
    rng = random.Random(seed)
    k = rng.randrange(3)
    return rng.choice([f"state/main/fold{k}/progress.json", f"aux/fold{k}/best.json"])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
@pytest.mark.parametrize("seed", [0, 1])
def test_training_killed_at_a_random_point_resumes(trained, data, tmp_path, sig, seed):
    """Killed at a point drawn by the seed (waited for as a file, so the kill always lands before the run ends),
    then resumed: the same metrics and the same OOF files as the run never killed (`trained`, same config)."""
    run = tmp_path / "run"
    proc = start_training(run, data)
    point = run / kill_point(seed)
    end = time.time() + 300
    while not point.exists():
        assert proc.poll() is None and time.time() < end, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    status = json.loads((run / "run.json").read_text())["status"]
    assert status == ("running" if sig == signal.SIGKILL else "killed"), status  # the kill landed mid-run
    done = subprocess.run([sys.executable, "-m", "biomass.run", "--resume", str(run)], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (run, trained))
    for key in ("cv/weighted_r2", "cv/weighted_r2_deployable", "cv/aux_Pre_GSHH_NDVI_r2"):
        assert got[key] == want[key], key
    for name in ("oof.csv", "aux_oof.csv", "oof_deployable.csv"):
        assert (run / name).read_bytes() == (trained / name).read_bytes(), name
    for done in sorted(trained.glob("*/fold*/done.json")):  # every epoch's numbers, not only the best epoch's
        again = run / done.relative_to(trained)
        assert json.loads(again.read_text())["history"] == json.loads(done.read_text())["history"], again
    assert not (run / "state").exists() or not any((run / "state").rglob("*.json"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_inference_killed_at_a_random_point_leaves_no_partial_submission(trained, data, tmp_path, seed):
    out = tmp_path / "s.csv"
    proc = subprocess.Popen([sys.executable, "-m", "biomass.infer", *infer_args(trained, data, out)], env=env(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(random.Random(seed).uniform(2.0, 8.0))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    if out.exists():  # it finished before the kill: then the file is whole
        import pandas as pd

        assert len(pd.read_csv(out)) == 10
    again = subprocess.run([sys.executable, "-m", "biomass.infer", *infer_args(trained, data, out)], env=env(),
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert out.is_file()


# ---------------------------------------------------------------------------------------------------- images
def test_exif_orientation_is_ignored_in_decode_size_and_crop(tmp_path):
    """A JPEG whose EXIF says 'rotate 90': decoded, sized and cropped as its pixels are stored, so a crop box in
    stored coordinates cuts what it names (OpenCV would otherwise rotate it and the box would miss)."""
    from PIL import Image

    from biomass.data.images import read_image
    from biomass.data.table import check_images

    rgb = np.zeros((32, 64, 3), np.uint8)
    rgb[:, :16] = (255, 0, 0)  # a red band on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.fromarray(rgb).save(tmp_path / "r.jpg", quality=95, exif=exif)
    assert check_images(tmp_path, ["r.jpg"]) == {"r.jpg": (32, 64)}
    img = read_image(tmp_path / "r.jpg")
    assert img.shape == (32, 64, 3)
    crop = read_image(tmp_path / "r.jpg", box=(0, 0, 16, 32))
    assert crop.shape == (32, 16, 3) and crop[..., 0].mean() > 200 and crop[..., 2].mean() < 50
