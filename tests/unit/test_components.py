"""biomass.registry: one name per builder, helpful unknown-name errors, builder signatures as config schemas."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from biomass.config.load import component_model, validate_component
from biomass.errors import ConfigError
from biomass.registry import ALL, BACKBONES, HEADS, LOSSES, POOLINGS, Registry


@pytest.fixture(scope="module", autouse=True)
def registry_cli(tmp_path_factory) -> subprocess.Popen[str]:
    """`python -m biomass.registry`, started when the module starts so it runs while the in-process tests do."""
    tmp = tmp_path_factory.mktemp("registry")
    # COLUMNS=80: what rich assumes when the output is a pipe; names must not be cut short there
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "COLUMNS": "80"}
    proc = subprocess.Popen([sys.executable, "-m", "biomass.components"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _toy() -> Registry:
    reg = Registry("widget")

    @reg.register("alpha_beta")
    def alpha_beta(size: int, /, *, scale: float = 0.5, path: Path | None = None, tags: tuple[str, ...] = (),
                   _private: int = 0) -> dict:
        """Makes an alpha-beta widget.

        Second line, not shown."""
        return {"size": size, "scale": scale, "path": path, "tags": tags}

    @reg.register()
    def gamma(*, depth: int) -> str:
        return f"gamma{depth}"

    return reg


def test_register_and_build() -> None:
    reg = _toy()
    assert reg.names() == ["alpha_beta", "gamma"]  # the default name is the function's
    assert "gamma" in reg and "delta" not in reg
    assert reg.build("alpha_beta", 3, scale=2.0) == {"size": 3, "scale": 2.0, "path": None, "tags": ()}
    assert reg.build("gamma", depth=4) == "gamma4"
    assert reg.describe("alpha_beta") == "Makes an alpha-beta widget."
    assert reg.describe("gamma") == ""
    # the config-settable arguments: keyword ones, not the positional-only context nor `_private`
    assert list(reg.parameters("alpha_beta")) == ["scale", "path", "tags"]


def test_registering_a_name_twice_raises() -> None:
    reg = _toy()
    with pytest.raises(ValueError, match="gamma"):
        reg.register("gamma")(lambda: None)

    def alpha_beta() -> None:
        pass

    with pytest.raises(ValueError, match="alpha_beta"):
        reg.register()(alpha_beta)
    assert reg.names() == ["alpha_beta", "gamma"]  # the first registration is kept
    # and the real registries refuse a second `gem`
    with pytest.raises(ValueError):
        POOLINGS.register("gem")(lambda spec: None)


def test_unknown_name_lists_close_matches_and_all_names() -> None:
    reg = _toy()
    with pytest.raises(ConfigError) as err:
        reg.get("alpha_bet")
    msg = str(err.value)
    assert "widget" in msg and "'alpha_bet'" in msg
    assert "Did you mean 'alpha_beta'" in msg
    assert "Available: alpha_beta, gamma" in msg
    with pytest.raises(ConfigError) as err:
        reg.get("zzzz")
    assert "Did you mean" not in str(err.value) and "Available: alpha_beta, gamma" in str(err.value)

    with pytest.raises(ConfigError) as err:
        POOLINGS.build("gemm", None)
    msg = str(err.value)
    assert "'gem'" in msg
    assert all(name in msg.split("Available:")[1] for name in POOLINGS.names())


# ----------------------------------------------------------------------------------------------- component schemas
def test_component_model_from_a_signature() -> None:
    reg = _toy()
    model = component_model(reg, "alpha_beta")
    assert set(model.model_fields) == {"scale", "path", "tags"}
    filled = model.model_validate({})
    assert filled.scale == 0.5 and filled.path is None and filled.tags == ()
    typed = model.model_validate({"scale": "2", "path": "x/y.bin", "tags": ["a", "b"]})
    assert typed.scale == 2.0 and typed.path == Path("x/y.bin") and typed.tags == ("a", "b")
    with pytest.raises(ConfigError):  # unknown builder
        component_model(reg, "delta")


def test_validate_component_fills_defaults() -> None:
    reg = _toy()
    assert validate_component(reg, {"name": "alpha_beta"}, "stage.widget") == {
        "name": "alpha_beta", "scale": 0.5, "path": None, "tags": []}
    assert validate_component(reg, {"name": "gamma", "depth": 2}, "stage.widget") == {"name": "gamma", "depth": 2}

    assert validate_component(POOLINGS, {"name": "gem"}, "main.model.pooling") == {
        "name": "gem", "p": 3.0, "eps": 1e-6, "learn_p": True}
    assert validate_component(LOSSES, {"name": "weighted_smooth_l1", "beta": 2}, "main.loss") == {
        "name": "weighted_smooth_l1", "weights": None, "beta": 2.0}
    head = validate_component(HEADS, {"name": "consistent"}, "main.model.head")
    assert "_target_space" not in head and head["fusion_dims"] == [512, 256]
    backbone = validate_component(BACKBONES, {"name": "timm", "model_name": "resnet18"}, "main.model.backbone")
    assert backbone["freeze_fraction"] == 0.0 and backbone["weights"] is None and backbone["pretrained"] is False


@pytest.mark.parametrize(("node", "expected"), [
    ({"name": "alpha_beta", "scael": 1.0}, ["'stage.widget.scael'", "widget 'alpha_beta'", "did you mean 'scale'"]),
    ({"name": "alpha_beta", "private": 1}, ["'stage.widget.private'"]),
    ({"name": "alpha_beta", "_private": 1}, ["'stage.widget._private'"]),  # not settable from a config
    ({"name": "alpha_beta", "scale": "big"}, ["'stage.widget.scale'", "'big'"]),
    ({"name": "gamma"}, ["'stage.widget.depth'", "required"]),
    ({"name": "gama", "depth": 1}, ["'stage.widget.name'", "'gamma'", "Available: alpha_beta, gamma"]),
    ({"depth": 1}, ["'stage.widget'", "name"]),
    ("gamma", ["'stage.widget'", "name"]),
    ({"name": 3}, ["'stage.widget'", "name"]),
])
def test_validate_component_rejects(node, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        validate_component(_toy(), node, "stage.widget")
    msg = str(err.value)
    assert "\n" not in msg
    for text in expected:
        assert text in msg, msg


def test_real_component_kwargs_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"'main\.model\.pooling\.pp'.*did you mean 'p'"):
        validate_component(POOLINGS, {"name": "gem", "pp": 2}, "main.model.pooling")
    with pytest.raises(ConfigError, match=r"'main\.model\.backbone\.model_name'.*required"):
        validate_component(BACKBONES, {"name": "timm"}, "main.model.backbone")
    with pytest.raises(ConfigError, match=r"'main\.model\.pooling\.p' for pooling 'gap'"):
        validate_component(POOLINGS, {"name": "gap", "p": 3}, "main.model.pooling")  # gap takes no arguments


# -------------------------------------------------------------------------------------------------------- the CLI
def test_registry_cli_lists_everything(registry_cli: subprocess.Popen[str]) -> None:
    expected = {kind: reg.names() for kind, reg in ALL.items()}
    assert sum(map(len, expected.values())) >= 10 and all(expected.values())  # every registry is filled
    stdout, stderr = registry_cli.communicate(timeout=300)
    assert registry_cli.returncode == 0, stderr
    # the table's first two columns are the kind and the name, one component per row
    rows = set()
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) >= 2 and cells[0] in ALL and cells[1]:
            rows.add((cells[0], cells[1]))
    assert rows == {(kind, name) for kind, names in expected.items() for name in names}
    assert "n_splits=5" in stdout and "p=3.0" in stdout  # defaults shown
