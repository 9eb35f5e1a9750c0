"""biomass.config: experiment files, `base:` chains, deep merge, dotted overrides, paths, and one-line errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import DEMO, GOLD, REPO

from biomass.config.load import deep_merge, load_experiment, parse_overrides, to_yaml, validate
from biomass.errors import ConfigError, run_cli
from biomass.run import main as run_main



def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- the shipped files
@pytest.mark.parametrize("path", sorted((REPO / "experiments").rglob("*.yaml")),  # recipes/ too
                         ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_every_experiment_resolves(path: Path) -> None:
    exp = load_experiment(path)
    cfg = exp.config
    assert exp.path == path.resolve()
    assert cfg.name
    assert cfg.data.root.is_absolute()
    # the dumped config (a run's config.yaml) validates again to the same thing
    again = validate(yaml.safe_load(to_yaml(cfg)))
    assert again.dump() == cfg.dump()


# ------------------------------------------------------------------------------------------------------ deep merge
def test_deep_merge_semantics() -> None:
    base = {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "l": [1, 2, 3], "s": "keep",
            "loss": {"name": "weighted_smooth_l1", "weights": [0.1, 0.1, 0.1, 0.2, 0.5], "beta": 1.0},
            "pool": {"name": "gem", "p": 3.0, "eps": 1e-6}}
    change = {"a": {"y": {"q": 20}, "z": 3}, "l": [9], "loss": {"name": "mse"}, "pool": {"name": "gem", "p": 4.0}}
    before = yaml.safe_dump(base), yaml.safe_dump(change)
    out = deep_merge(base, change)
    assert out == {"a": {"x": 1, "y": {"p": 1, "q": 20}, "z": 3},  # mappings merge, recursively
                   "l": [9],  # lists replace
                   "s": "keep",
                   "loss": {"name": "mse"},  # a renamed component drops its old arguments
                   "pool": {"name": "gem", "p": 4.0, "eps": 1e-6}}  # the same component merges
    assert (yaml.safe_dump(base), yaml.safe_dump(change)) == before  # inputs untouched
    out["a"]["y"]["p"] = 99
    assert base["a"]["y"]["p"] == 1  # no shared nodes
    # a mapping replaces a scalar and vice versa
    assert deep_merge({"k": 1}, {"k": {"a": 1}}) == {"k": {"a": 1}}
    assert deep_merge({"k": {"a": 1}}, {"k": None}) == {"k": None}


_keys = st.sampled_from(["name", "a", "b", "c", "p"])
_scalars = st.none() | st.integers(-3, 3) | st.sampled_from(["x", "y", "gem", "gap"]) | st.lists(st.integers(0, 2),
                                                                                               max_size=2)
_trees = st.dictionaries(_keys, st.recursive(_scalars, lambda kids: st.dictionaries(_keys, kids, max_size=4),
                                             max_leaves=8), max_size=5)


def _leaves(d: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _at(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for k in path:
        d = d[k]
    return d


def _survives(a: dict[str, Any], b: dict[str, Any], path: tuple[str, ...]) -> bool:
    """A leaf of `a` must survive when `b` leaves its path alone: both sides plain mappings down to where `b` stops."""
    node_a, node_b = a, b
    for k in path[:-1]:
        if k not in node_b:
            return True
        va, vb = node_a[k], node_b[k]
        if not (isinstance(va, dict) and isinstance(vb, dict)):
            return False
        if "name" in va and "name" in vb and va["name"] != vb["name"]:
            return False
        node_a, node_b = va, vb
    return path[-1] not in node_b


@settings(max_examples=150, deadline=None)
@given(a=_trees, b=_trees)
def test_deep_merge_properties(a: dict[str, Any], b: dict[str, Any]) -> None:
    merged = deep_merge(a, b)
    assert deep_merge(a, {}) == a
    assert deep_merge({}, b) == b
    assert deep_merge(a, a) == a
    assert deep_merge(merged, b) == merged  # applying the same change twice changes nothing more
    assert set(merged) == set(a) | set(b)
    for path, value in _leaves(b).items():  # the change always wins
        assert _at(merged, path) == value
    for path, value in _leaves(a).items():  # and what it leaves alone stays
        if _survives(a, b, path):
            assert _at(merged, path) == value


# ---------------------------------------------------------------------------------------------------- base chains
def test_component_rename_through_a_file(tmp_path: Path) -> None:
    child = _write(tmp_path / "child.yaml", f"base: {GOLD}\nname: child\nmain:\n  loss: {{name: mse}}\n")
    cfg = load_experiment(child).config
    assert cfg.main.loss == {"name": "mse", "weights": None}  # beta and gold's weights dropped with the old name
    # the same component keeps its siblings
    child2 = _write(tmp_path / "child2.yaml", f"base: {GOLD}\nname: c2\nmain:\n  loss: {{beta: 2.0}}\n")
    assert load_experiment(child2).config.main.loss == {
        "name": "weighted_smooth_l1", "weights": [0.1, 0.1, 0.1, 0.2, 0.5], "beta": 2.0}


def test_base_chain_three_levels(tmp_path: Path) -> None:
    _write(tmp_path / "one" / "a.yaml", f"base: {GOLD}\nname: a\ndata: {{root: data_a}}\n"
                                        "main:\n  train: {epochs: 3, batch_size: 4}\n  optim: {lr: 1.0e-3}\n")
    _write(tmp_path / "two" / "b.yaml", "base: ../one/a.yaml\nname: b\nmain:\n  train: {epochs: 5}\n"
                                        "  augment: {train: [{name: VerticalFlip, p: 0.5}]}\n")
    c = _write(tmp_path / "c.yaml", "base: two/b.yaml\nname: c\nmain:\n  optim: {weight_decay: 0.0}\n")
    cfg = load_experiment(c).config
    assert cfg.name == "c"
    assert cfg.main.train.epochs == 5  # b over a
    assert cfg.main.train.batch_size == 4  # from a
    assert cfg.main.train.patience == 15  # from gold
    assert cfg.main.optim["lr"] == 1.0e-3 and cfg.main.optim["weight_decay"] == 0.0
    assert cfg.main.augment.train == [{"name": "VerticalFlip", "p": 0.5}]  # the list replaced whole
    assert cfg.data.root == tmp_path / "one" / "data_a"  # relative to a.yaml, the file that says it
    assert cfg.main.model.backbone["weights"] == str(
        REPO / "weights/vit_huge_plus_patch16_dinov3.lvd1689m/pytorch_model.bin")  # from gold's folder
    assert cfg.aux is not None and cfg.aux.train.epochs == 25


@pytest.mark.parametrize("files", [
    {"x.yaml": "base: y.yaml\n", "y.yaml": "base: x.yaml\n"},
    {"x.yaml": "base: x.yaml\n"},
    {"x.yaml": "base: y.yaml\n", "y.yaml": "base: sub/z.yaml\n", "sub/z.yaml": "base: ../x.yaml\n"},
], ids=["two", "self", "three"])
def test_base_loop_is_an_error(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        _write(tmp_path / name, text)
    with pytest.raises(ConfigError, match="loops"):
        load_experiment(tmp_path / "x.yaml")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(_write(tmp_path / "a.yaml", "base: missing.yaml\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_experiment(_write(tmp_path / "b.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="YAML"):
        load_experiment(_write(tmp_path / "c.yaml", "name: [unclosed\n"))


# ------------------------------------------------------------------------------------------------------ overrides
def test_overrides_are_yaml() -> None:
    got = parse_overrides(["a.i=3", "a.f=2.5", "a.e=1.0e-3", "a.l=[1, 2]", "a.n=null", "a.s=hello", "a.b=true",
                           "a.empty=", "top=x=y", "a.d={k: 1}"])
    assert got == {"a": {"i": 3, "f": 2.5, "e": 1.0e-3, "l": [1, 2], "n": None, "s": "hello", "b": True,
                         "empty": None, "d": {"k": 1}},
                   "top": "x=y"}
    assert type(got["a"]["i"]) is int and type(got["a"]["f"]) is float


def test_overrides_reach_the_config(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_experiment(DEMO, ["main.train.epochs=3", "main.optim.lr=1e-3", "main.image.size=[64, 96]",
                                 "main.train.patience=null", "name=renamed", "main.model.pooling.name=gem",
                                 "main.model.pooling.p=4"]).config
    assert cfg.main.train.epochs == 3
    assert cfg.main.optim["lr"] == pytest.approx(1e-3)
    assert cfg.main.image.size == (64, 96)
    assert cfg.main.train.patience is None
    assert cfg.name == "renamed"
    assert cfg.main.model.pooling == {"name": "gem", "p": 4.0, "eps": 1e-6, "learn_p": True}


@pytest.mark.parametrize("item", ["main.optim.lr", "=3", "main..lr=3", ".lr=1", "main.=1"])
def test_malformed_override(item: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        parse_overrides([item])
    with pytest.raises(ConfigError):
        load_experiment(DEMO, [item])


def test_conflicting_overrides() -> None:
    with pytest.raises(ConfigError, match="conflicts"):
        parse_overrides(["main=1", "main.optim.lr=2"])


# ---------------------------------------------------------------------------------------------------------- paths
def test_paths_in_a_file_resolve_from_its_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the CWD must not matter for paths written in a file
    exp = _write(tmp_path / "exps" / "x.yaml", f"base: {GOLD}\nname: x\ndata: {{root: ../data/here}}\n"
                 "main:\n  model:\n    backbone: {name: timm, model_name: resnet18, weights: w/model.bin}\n"
                 "aux:\n  model:\n    backbone: {weights: aux.bin}\n")  # no `name`: the base's component
    cfg = load_experiment(exp).config
    assert cfg.data.root == tmp_path / "data" / "here"
    assert cfg.main.model.backbone["weights"] == str(tmp_path / "exps" / "w" / "model.bin")
    assert cfg.aux.model.backbone["weights"] == str(tmp_path / "exps" / "aux.bin")
    assert cfg.data.train_csv == "train.csv"  # a file name inside root, not a path


def test_paths_on_the_cli_resolve_from_the_cwd(tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    exp = load_experiment(DEMO, ["data.root=rel/data", "main.model.backbone.weights=w.bin",
                                 "aux.model.backbone={name: timm, model_name: resnet18, weights: ../a.bin}"])
    cfg = exp.config
    assert cfg.data.root == work / "rel" / "data"
    assert cfg.main.model.backbone["weights"] == str(work / "w.bin")
    assert cfg.aux.model.backbone["weights"] == str(tmp_path / "a.bin")
    assert exp.from_cli("data.root") and not exp.from_cli("data")
    # untouched: demo's own root, relative to experiments/
    assert load_experiment(DEMO).config.data.root == REPO / "demo_data"
    # absolute paths stay as they are; null stays null
    cfg = load_experiment(DEMO, [f"data.root={tmp_path / 'abs'}", "main.model.backbone.weights=null"]).config
    assert cfg.data.root == tmp_path / "abs" and cfg.main.model.backbone["weights"] is None


# --------------------------------------------------------------------------------------------------------- errors
def _cli_error(capsys, *overrides: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        run_cli(run_main, [str(DEMO), "--dry-run", *overrides])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(("override", "expected"), [
    ("main.optim.lrr=1", ["'main.optim.lrr'", "did you mean 'lr'"]),
    ("main.trian.epochs=1", ["'main.trian", "'train'"]),
    ("main.train.epochs=abc", ["'main.train.epochs'", "'abc'"]),
    ("main.train.epochs=0", ["'main.train.epochs'"]),
    ("main.model.pooling.name=gemm", ["'main.model.pooling.name'", "'gem'", "Available:", "gap", "cls"]),
    ("main.loss.bogus=1", ["'main.loss.bogus'", "weighted_smooth_l1"]),
    ("main.loss.betta=2", ["'main.loss.betta'", "'beta'"]),
    ("main.loss.name=[a]", ["'main.loss'"]),
    ("main.loss=mse", ["'main.loss'"]),
    ("main.augment.train=[{name: HorizontalFlp}]", ["'main.augment.train[0].name'", "'HorizontalFlip'"]),
    ("main.augment.train=[{name: HorizontalFlip, prob: 0.5}]", ["'main.augment.train[0]'", "prob"]),
    ("aux.augment.val=[{name: HorizontalFlip, p: 2}]", ["'aux.augment.val[0]'", "HorizontalFlip", "p"]),
    ("main.augment.train=[{name: Normalize}]", ["'main.augment.train[0].name'", "image.mean"]),
    ("infer.tta=[spin]", ["'infer.tta.0'"]),
])
@pytest.mark.filterwarnings("ignore:Argument.*not valid for transform:UserWarning")  # albumentations' own note
def test_config_errors_name_the_key(capsys, override: str, expected: list[str]) -> None:
    line = _cli_error(capsys, override)
    for text in expected:
        assert text in line, line


def test_debug_reraises() -> None:
    """With `--debug` the error propagates (Python prints its traceback; tests/test_metrics.py checks that through a
    subprocess of the same run_cli wrapper); without it, one line and exit 2."""
    with pytest.raises(ConfigError, match="lrr"):
        run_cli(run_main, [str(DEMO), "--dry-run", "main.optim.lrr=1", "--debug"])
    with pytest.raises(SystemExit):
        run_cli(run_main, [str(DEMO), "--dry-run", "main.optim.lrr=1"])


# ------------------------------------------------------------------------------- the CLI (started at module start)
def _spawn(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return subprocess.Popen([sys.executable, "-m", "biomass.run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory) -> dict[str, subprocess.Popen[str]]:
    """The CLI run this module checks in a real process, started when the module starts (it pays torch's import
    once) so that it runs while the in-process tests do; the test that reads it comes last."""
    tmp = tmp_path_factory.mktemp("cli")
    procs = {
        "unknown": _spawn(tmp, str(DEMO), "--dry-run", "some.unknown=1"),
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _result(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def test_gold_dry_run_has_every_seed_hyperparameter(capsys, tmp_path: Path) -> None:
    """`python -m biomass.run experiments/gold.yaml --dry-run`, through the same entry point in-process."""
    from biomass.data.synthetic import generate

    assert load_experiment(GOLD).config.main.model.backbone["weights"] == str(REPO / \
        "weights/vit_huge_plus_patch16_dinov3.lvd1689m/pytorch_model.bin")  # relative to experiments/
    # The dry run is strict (data and weights must exist): a tiny rendered root, and no weights file (random init).
    root = generate(tmp_path / "data", n_train=5, n_test=1, seed=0, width=64, height=32)
    with pytest.raises(SystemExit) as exit_:
        run_cli(run_main, [str(GOLD), "--dry-run", f"data.root={root}", "main.model.backbone.weights=null"])
    stdout, stderr = capsys.readouterr()
    assert exit_.value.code == 0, stderr
    assert "# data: 5 train images" in stdout
    cfg = yaml.safe_load(stdout)  # the printed config is YAML (the data note is a comment)
    main, aux = cfg["main"], cfg["aux"]

    assert main["model"]["backbone"]["model_name"] == "vit_huge_plus_patch16_dinov3.lvd1689m"
    assert main["model"]["backbone"]["freeze_fraction"] == 0.5
    assert cfg["data"]["root"] == str(root)
    assert main["model"]["pooling"] == {"name": "gap"}
    assert main["model"]["head"]["name"] == "fusion"
    assert main["image"]["size"] == [800, 800] and main["image"]["crop"] is True
    assert main["train"]["batch_size"] == 10
    assert main["train"]["epochs"] == 20
    assert main["train"]["patience"] == 15
    assert main["optim"]["lr"] == 5.0e-05
    assert main["optim"]["weight_decay"] == 1.0e-05
    assert main["scheduler"] == {"name": "cosine_warm_restarts", "T_0": 10, "T_mult": 2, "eta_min": 1.0e-06}
    assert main["loss"]["name"] == "weighted_smooth_l1"
    assert main["loss"]["weights"] == [0.1, 0.1, 0.1, 0.2, 0.5]
    assert main["loss"]["beta"] == 1.0
    assert main["folds"]["splitter"]["name"] == "kfold"
    assert main["folds"]["splitter"]["seed"] == 42 and main["folds"]["splitter"]["n_splits"] == 5
    assert [t["name"] for t in main["augment"]["train"]] == [
        "HorizontalFlip", "VerticalFlip", "RandomBrightnessContrast", "HueSaturationValue", "GaussNoise"]

    assert aux["model"]["backbone"]["model_name"] == "vit_huge_plus_patch16_dinov3.lvd1689m"
    assert aux["model"]["backbone"]["freeze_fraction"] == 0.25
    assert aux["model"]["backbone"]["weights"] is None
    assert aux["model"]["head"]["name"] == "aux_mlp" and aux["model"]["head"]["hidden"] == 256
    assert aux["scheduler"]["name"] == "plateau"
    assert aux["scheduler"]["factor"] == 0.5 and aux["scheduler"]["patience"] == 4
    assert aux["train"]["epochs"] == 25 and aux["train"]["batch_size"] == 8
    assert aux["folds"]["splitter"]["seed"] == 44 and aux["folds"]["splitter"]["n_splits"] == 5
    assert aux["loss"]["name"] == "mse" and aux["loss"]["weights"] == [1.0, 1.0]
    assert aux["optim"]["weight_decay"] == 0.001 and aux["optim"]["lr"] == 5.0e-05
    assert "RandomRotate90" in [t["name"] for t in aux["augment"]["train"]]
    assert aux["init_from"] == "main/fold0"
    assert cfg["infer"]["fold_weights"] == [0.264901, 0.174089, 0.157770, 0.231843, 0.171397]
    assert cfg["seed"] == 42
    # and literally, as a reader of the dry run sees them
    for text in ("vit_huge_plus_patch16_dinov3.lvd1689m", "[800, 800]", "batch_size: 10", "lr: 5.0e-05",
                 "weight_decay: 1.0e-05", "T_0: 10", "T_mult: 2", "eta_min: 1.0e-06", "weighted_smooth_l1",
                 "[0.1, 0.1, 0.1, 0.2, 0.5]", "epochs: 20", "patience: 15", "freeze_fraction: 0.5",
                 "freeze_fraction: 0.25", "factor: 0.5", "patience: 4", "epochs: 25", "batch_size: 8", "seed: 44",
                 "name: mse", "weight_decay: 0.001", "RandomRotate90"):
        assert text in stdout, text


def test_cli_unknown_key_is_one_line(cli_runs) -> None:
    code, stdout, stderr = _result(cli_runs["unknown"])
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:")
    assert "'some.unknown'" in lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize(("n_train", "drop_last", "refused"), [
    (9, False, True),    # 9 = 2 x 4 + 1: the last batch of a BatchNorm head holds one image
    (9, True, False),    # ... unless it is dropped
    (8, False, False),   # batches of 4 and 4
    (1, True, True),     # a fold of one image cannot drop its only batch
])
def test_check_batches_refuses_a_last_batch_of_one_image(n_train, drop_last, refused, tmp_path):
    """`preflight.check_batches` at training start: the demo's main head (fusion MLP) has BatchNorm, so a fold whose
    last training batch holds 1 image is one error naming the fold, its size and both ways out."""
    import numpy as np

    from biomass.preflight import check_batches, check_models
    from biomass.stages import MAIN

    cfg = load_experiment(DEMO, [f"data.root={tmp_path}", "main.train.batch_size=4",
                                 f"main.train.drop_last={str(drop_last).lower()}"]).config
    facts = check_models(cfg)  # the meta-device build, once: its answers go to check_batches
    assert facts[MAIN].batchnorm_head
    ids = np.array([0] * 3 + [1] * n_train)  # fold 0 trains on the n_train images of fold 1
    if not refused:
        check_batches(cfg, {MAIN: ids}, facts)
        return
    with pytest.raises(ConfigError) as err:
        check_batches(cfg, {MAIN: ids}, facts)
    msg = str(err.value)
    assert f"fold 0 has {n_train} training images" in msg
    assert "main.train.drop_last=true" in msg and "main.train.batch_size" in msg
