"""The ablation harness: every ablations/*.yaml resolves, stays within its knobs and builds; bad files are refused;
a tiny ablation trains end to end under MLflow (sqlite by default, a real `mlflow server` in the slow test)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import DEMO, DEMO_FILE, GOLD, REPO

from biomass.ablate.__main__ import main
from biomass.ablate.report import RunResult, summarise
from biomass.ablate.runner import _error_line
from biomass.ablate.spec import BASELINE, in_knobs, load_ablation
from biomass.config.load import load_experiment, to_yaml
from biomass.errors import run_cli

ABLATIONS = sorted((REPO / "ablations").glob("*.yaml"))
REQUIRED = {"losses", "log_targets", "scaled_sigmoid", "image_size", "dual_image", "pooling", "leaderboard_chain",
            "folds"}
BASES = {"own_base": None, "demo_base": DEMO}


def ids(path: Path) -> str:
    return path.stem


def test_the_writeup_ablations_exist():
    assert REQUIRED <= {p.stem for p in ABLATIONS}
    for path in ABLATIONS:
        text = path.read_text()
        assert text.startswith("#"), f"{path.name}: start with a comment saying what the writeup claimed"
        raw = yaml.safe_load(text)
        assert raw["name"] == path.stem and raw.get("claim")
        assert (path.parent / raw["base"]).resolve() == GOLD


@pytest.mark.parametrize("base", BASES.values(), ids=BASES.keys())
@pytest.mark.parametrize("path", ABLATIONS, ids=ids)
def test_every_variant_resolves_within_its_knobs(path, base, tmp_path):
    ablation = load_ablation(path, base)
    assert ablation.base == (base or GOLD).resolve()
    assert ablation.variants[0].name == BASELINE and not ablation.variants[0].changes
    assert len(ablation.variants) >= 2
    for v in ablation.variants:
        assert v.config.tracking.experiment == ablation.name  # parent and children share one MLflow experiment
        assert all(in_knobs(k, ablation.knobs) for k in v.changes), v.name
        if v.name != BASELINE:
            assert v.changes, f"{v.name} is identical to the baseline"
        # the written config is complete and absolute: biomass.run reads back exactly the same config
        written = tmp_path / f"{v.name}.yaml"  # as the sweep writes a child's config.yaml
        written.write_text(to_yaml(v.config.model_copy(update={"seed": v.config.seed + 1})))
        again = load_experiment(written).config.dump()
        assert again == {**v.config.dump(), "seed": v.config.seed + 1}


_BUILT: dict[str, tuple[int, ...]] = {}


def _build_and_forward(stage_name: str, stage, meta: bool) -> tuple[int, ...]:
    """Build a stage's model (and loss) as training does and push a batch of two through it; one build per
    distinct model (losses with one output per target share the baseline's)."""
    import torch

    from biomass.engine.build import build_stage_model
    from biomass.registry import LOSSES
    from biomass.stages import by_name

    st = by_name(stage_name)
    n_targets, n_tabular = len(st.targets), len(st.inputs)
    loss = LOSSES.build_node(stage.loss, n_targets)
    key = json.dumps([meta, stage_name, stage.image.size, stage.image.layout, stage.model.model_dump(mode="json"),
                      stage.targets.activation, loss.outputs_per_target], sort_keys=True, default=str)
    if key not in _BUILT:
        h, w = stage.image.size
        w *= 2 if stage.image.layout == "halves" else 1
        with torch.device("meta" if meta else "cpu"), torch.no_grad():
            model, _ = build_stage_model(st, stage, load_weights=not meta)
            model.eval()
            out = model(torch.zeros(2, 3, h, w, dtype=torch.uint8), torch.zeros(2, n_tabular))
        _BUILT[key] = tuple(out.shape)
    shape = _BUILT[key]
    assert shape == (2, n_targets * loss.outputs_per_target), (stage_name, shape)
    return shape


@pytest.mark.parametrize("path", ABLATIONS, ids=ids)
def test_every_variant_builds_on_demo(path):
    """Real CPU models on the demo base at a tiny size; a variant that sets a large size (image_size.yaml) keeps it,
    and is pushed through on the meta device (shapes only) to stay fast."""
    ablation = load_ablation(path, DEMO, ["main.image.size=[64,64]", "aux.image.size=[64,64]",
                                          "main.model.backbone.model_name=resnet10t",
                                          "aux.model.backbone.model_name=resnet10t"])
    for v in ablation.variants:
        for stage_name in ("main", "aux"):
            stage = getattr(v.config, stage_name)
            if stage is not None:
                _build_and_forward(stage_name, stage, meta=max(stage.image.size) > 256)


@pytest.mark.parametrize("path", ABLATIONS, ids=ids)
def test_every_variant_builds_on_gold_without_memory(path):
    """The real ViT-H+ of gold on the meta device: shapes only, no weights file, no memory, well under a second."""
    ablation = load_ablation(path)
    for v in ablation.variants:
        _build_and_forward("main", v.config.main, meta=True)
        if v.config.aux is not None:
            _build_and_forward("aux", v.config.aux, meta=True)


@pytest.mark.parametrize("base", BASES.values(), ids=BASES.keys())
def test_dry_run_shows_only_knob_keys(base, capsys):
    argv = [str(p) for p in ABLATIONS] + (["--base", str(base)] if base else []) + ["--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    knobs: list[str] = []
    seen: dict[str, set[str]] = {}
    ablation = variant = None
    for line in out.splitlines():
        if line.startswith("ablation "):
            ablation = line.split()[1]
            knobs = line.split("; knobs ", 1)[1].split(", ")
            seen[ablation] = set()
        elif line.startswith("  ") and not line.startswith("    ") and line.rstrip().endswith(":"):
            variant = line.strip()[:-1]
            seen[ablation].add(variant)
        elif line.startswith("    ") and " -> " in line:
            key = line.strip().split(": ", 1)[0]
            assert in_knobs(key, knobs), f"{ablation}/{variant}: {key} is outside {knobs}"
    assert set(seen) == {p.stem for p in ABLATIONS}
    assert seen["losses"] == {"mse", "quantile", "log_cosh", "r2"}
    assert "aux: {...} -> null" in out  # leaderboard_chain drops the whole aux section, shown once
    assert "nothing trained" in out


def test_cli_dry_run_of_the_demo_rebase():
    proc = subprocess.run([sys.executable, "-m", "biomass.ablate", "ablations/losses.yaml", "--base",
                           "experiments/demo.yaml", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'main.loss.name: "weighted_smooth_l1" -> "quantile"' in proc.stdout
    assert str(DEMO_FILE) in proc.stdout


def _write(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "base": str(DEMO), **body}))
    return path


@pytest.mark.parametrize("body, words", [
    ({"knobs": ["main.loss"], "variants": {"sneaky": {"main.loss": {"name": "mse"}, "main.train.epochs": 3}}},
     ["'sneaky'", "'main.train.epochs'", "outside its knobs"]),
    # a component renamed through a knob is replaced whole; its stage's other keys must not move
    ({"knobs": ["main.model.pooling"], "variants": {"gem": {"main.model.pooling.name": "gem",
                                                            "aux.model.pooling.name": "gem"}}},
     ["'gem'", "'aux.model.pooling.name'"]),
    ({"knobs": ["main.loss"], "variants": {"typo": {"main.loss.nmae": "mse"}}}, ["'typo'", "main.loss.nmae"]),
    ({"knobs": ["main.los"], "variants": {"mse": {"main.loss": {"name": "mse"}}}}, ["'mse'", "main.loss.name"]),
    ({"knobs": ["main.loss", "main.lss"], "variants": {"mse": {"main.loss": {"name": "mse"}}}},
     ["knob 'main.lss'", "did you mean"]),
    ({"knobs": ["main.loss"], "variants": {"baseline": {"main.loss": {"name": "mse"}}}}, ["'baseline'"]),
    ({"knobs": ["main.loss"], "variants": {"empty": {}}}, ["'empty'", "non-empty"]),
    ({"knobs": ["main.loss"], "variant": {}}, ["'variant'", "did you mean 'variants'"]),
])
def test_bad_ablations_are_refused_in_one_line(tmp_path, capsys, body, words):
    path = _write(tmp_path, body)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(path), "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for word in words:
        assert word in err, (word, err)


def test_a_missing_data_root_is_refused_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(REPO / "ablations" / "pooling.yaml"), "--base", str(DEMO),
                       f"data.root={tmp_path / 'missing'}", "--runs-dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    assert "data.root" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_overrides_apply_everywhere_and_variants_keep_their_knob(tmp_path):
    ablation = load_ablation(REPO / "ablations" / "image_size.yaml", DEMO, ["main.image.size=[64,64]", "seed=5",
                                                                          "tracking.experiment=mine"])
    sizes = {v.name: v.config.main.image.size for v in ablation.variants}
    assert sizes["baseline"] == (64, 64) and sizes["main_1024"] == (1024, 1024)
    assert {v.config.seed for v in ablation.variants} == {5}
    assert {v.config.tracking.experiment for v in ablation.variants} == {"mine"}


def test_summary_pairs_seeds_and_reports_failures():
    ablation = load_ablation(REPO / "ablations" / "leaderboard_chain.yaml", DEMO)

    def run(variant, seed, oracle, deployable=None, status="completed"):
        metrics = {"cv/weighted_r2": oracle, **({"cv/weighted_r2_deployable": deployable} if deployable else {}),
                   **{f"cv/{t}_r2": 0.5 for t in ("Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g", "GDM_g",
                                                  "Dry_Total_g")}}
        return RunResult(variant, seed, Path(f"/x/{variant}-{seed}"), status=status, exit_code=0, duration_s=10.0,
                         metrics=metrics if status == "completed" else {}, error=None if status == "completed"
                         else "exit 1: boom")

    results = [run("baseline", 0, 0.70, 0.60), run("baseline", 1, 0.72, 0.64),
               run("crop_no_aux", 0, 0.71), run("crop_no_aux", 1, 0.75),
               run("no_crop_no_aux", 0, 0.0, status="failed"), run("no_crop_no_aux", 1, 0.69)]
    rows = {r["variant"]: r for r in summarise(ablation, results)}
    base, crop, nocrop = rows["baseline"], rows["crop_no_aux"], rows["no_crop_no_aux"]
    assert base["deployable"] == pytest.approx(0.62) and base["deployable_std"] == pytest.approx(0.0283, abs=1e-4)
    assert base["ranked_by"] == "deployable" and crop["ranked_by"] == "oracle"
    assert crop["deployable"] is None and crop["delta_deployable"] is None
    # paired by seed: (0.71 - 0.70, 0.75 - 0.72) -> mean 0.02, std 0.0141
    assert crop["delta_oracle"] == pytest.approx(0.02) and crop["delta_oracle_std"] == pytest.approx(0.01414, 1e-3)
    assert nocrop["completed"] == 1 and nocrop["status"].startswith("1/2 completed") and "boom" in nocrop["status"]
    assert nocrop["delta_oracle"] == pytest.approx(0.69 - 0.72) and nocrop["delta_oracle_std"] is None


def test_error_line_skips_the_launchers_trailer():
    stderr = ("Traceback (most recent call last):\n  File x\nValueError: the real cause\n"
              "Traceback (most recent call last):\n  File y\n"
              "subprocess.CalledProcessError: Command '[...]' returned non-zero exit status 1.\n")
    assert _error_line(stderr) == "ValueError: the real cause"
    assert _error_line("noise\nerror: config key 'x' is wrong\nTraceback\nsubprocess.CalledProcessError: x\n") \
        == "config key 'x' is wrong"


def test_sweep_seeds_commands_and_parent_without_training(tmp_path, monkeypatch, tiny_data):
    """The sweep's loop with a stand-in for the training processes: commands, written configs, seeds paired across
    variants, the parent run's metrics (mean ± std, CI), tags and artifacts, and a parent marked FAILED when every
    run failed. (Was a test of run_ablation, which the sweep replaced: children now live in children/<key>/.)"""
    from mlflow.tracking import MlflowClient
    from helpers import FakeExecutor

    import biomass.ablate.sweep as sweep

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump({"name": "fake", "base": str(DEMO), "knobs": ["main.loss"],
                                    "variants": {"mse": {"main.loss": {"name": "mse"}}}}))
    fake = FakeExecutor(tiny_data, {"baseline": 0.0, "mse": -0.3})
    monkeypatch.setattr(sweep, "make_executor", lambda *a: fake)
    options = sweep.SweepOptions(launch_args=["--config_file", "accelerate_configs/cpu.yaml"])
    failed = sweep.run_sweep([path], None, ["seed=7", f"data.root={tiny_data}"], 2, tmp_path / "runs", options)
    assert failed == 0
    assert [(c["variant"], c["seed"]) for c in fake.calls] == [("baseline", 7), ("mse", 7), ("baseline", 8),
                                                               ("mse", 8)]
    cmd = fake.calls[3]["cmd"]
    i = cmd.index("accelerate.commands.launch")
    assert cmd[i + 1:i + 5] == ["--config_file", "accelerate_configs/cpu.yaml", "-m", "biomass.run"]
    written = yaml.safe_load(Path(cmd[i + 5]).read_text())
    assert written["seed"] == 8 and written["main"]["loss"]["name"] == "mse"
    assert written["tracking"]["experiment"] == "fake" and fake.calls[3]["env"]["MLFLOW_TRACKING_URI"] == uri
    assert Path(cmd[cmd.index("--run-dir") + 1]).parent.parent.name == "children"
    assert {"ablation=fake", "variant=mse", "seed=8"} <= {cmd[j + 1] for j, a in enumerate(cmd) if a == "--tag"}

    (sweep_dir,) = (tmp_path / "runs").iterdir()
    rows = {r["variant"]: r for r in json.loads((sweep_dir / "fake" / "summary.json").read_text())["rows"]}
    mse = rows["mse"]
    assert mse["oracle_std"] is not None and mse["delta_oracle"] < 0
    assert mse["ci_lo"] < mse["ci_delta"] < mse["ci_hi"] < 0 and mse["verdict"] == "confirmed"  # not_better

    client = MlflowClient(tracking_uri=uri)
    parent_id = cmd[cmd.index("--parent-run-id") + 1]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["seeds"] == "2"
    assert parent.data.tags["verdict"] == "confirmed" and parent.data.tags["verdict.mse"] == "confirmed"
    assert parent.data.metrics["delta/mse/ci_hi"] == pytest.approx(mse["ci_hi"])
    assert "cv/mse/weighted_r2_std" in parent.data.metrics and "variant.mse" in parent.data.params
    assert {"comparison.csv", "comparison.md", "deltas.png"} <= {a.path for a in client.list_artifacts(parent_id)}
    assert "± " in (Path(parent.data.tags["runs_dir"]) / "comparison.md").read_text()
    sweep_run = client.get_run(parent.data.tags["mlflow.parentRunId"])
    assert sweep_run.data.tags["role"] == "sweep"
    assert {"graveyard.md", "graveyard.png"} <= {a.path for a in client.list_artifacts(sweep_run.info.run_id)}

    fake.fail = True
    assert sweep.run_sweep([path], None, ["seed=1", f"data.root={tiny_data}"], 1, tmp_path / "runs2", options) == 2
    parent_id = fake.calls[-1]["cmd"][fake.calls[-1]["cmd"].index("--parent-run-id") + 1]
    assert client.get_run(parent_id).info.status == "FAILED"
