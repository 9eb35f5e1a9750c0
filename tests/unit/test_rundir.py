"""The run directory: unique default names, --force removes only run outputs, checked readers name the file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from biomass.errors import BiomassError, ConfigError
from biomass.rundir import OUTPUTS, RunDir, folds_to_train, stamped_dir
from biomass.stages import MAIN


def test_stamped_dirs_in_the_same_second_never_collide(tmp_path):
    made = {stamped_dir(tmp_path / "runs") for _ in range(5)}
    assert len(made) == 5 and all(p.is_dir() for p in made)


def test_force_removes_only_run_outputs(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    for name in (*OUTPUTS[:3], "notes.txt"):
        (run / name).write_text("x")
    with pytest.raises(BiomassError, match="already exists"):
        RunDir.create("x", run, force=False)
    RunDir.create("x", run, force=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("content", ["", "{\"status\": ", "[1, 2]"])
def test_a_damaged_status_file_is_one_error_naming_it(tmp_path, content):
    (tmp_path / "run.json").write_text(content)
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(BiomassError, match="run.json"):
        RunDir(tmp_path).read_status()


def test_an_empty_folds_table_is_named(tmp_path):
    (tmp_path / "folds.csv").write_text("")
    with pytest.raises(BiomassError, match="folds.csv"):
        RunDir(tmp_path).fold_ids(MAIN)


def test_a_folds_table_cut_at_a_row_boundary_is_named(tmp_path):
    """A folds.csv that lost whole rows is still valid CSV: run.json's `folds_rows` (what write_folds returned) is
    what catches it."""
    import pandas as pd

    from biomass.stages import AUX

    run = RunDir(tmp_path)
    table = pd.DataFrame({"image_id": [f"ID{i}" for i in range(6)], "image_path": [f"train/{i}.jpg" for i in range(6)]})
    rows = run.write_folds(table, {MAIN: np.array([0, 1, 2] * 2), AUX: np.array([0, 1] * 3)})
    run.write_status({"status": "completed", "folds_rows": rows})
    assert list(run.fold_ids(MAIN)) == [0, 1, 2] * 2
    lines = (tmp_path / "folds.csv").read_text().splitlines(keepends=True)
    (tmp_path / "folds.csv").write_text("".join(lines[:4]))
    with pytest.raises(BiomassError, match=r"folds.csv: 3 rows, but the run wrote 6 \(truncated or edited\)"):
        run.fold_ids(MAIN)


def test_status_carries_the_format_version(tmp_path):
    RunDir(tmp_path).write_status({"status": "running"})
    assert json.loads((tmp_path / "run.json").read_text())["format_version"] == 1


def test_folds_to_train(tmp_path):
    from biomass.config.load import load_experiment
    from helpers import DEMO

    c = load_experiment(DEMO, ["main.folds.train_folds=[0, 2]", "aux=null"]).config
    assert folds_to_train(c.main, np.array([0, 1, 2, 0])) == [0, 2]
    with pytest.raises(ConfigError, match="fold 5 does not exist"):  # known from the splitter: at validation
        load_experiment(DEMO, ["main.folds.train_folds=[5]"])
    c = load_experiment(DEMO, ["main.folds.train_folds=[2]", "aux=null"]).config
    with pytest.raises(ConfigError, match="fold 2 does not exist"):  # a table with fewer folds than planned
        folds_to_train(c.main, np.array([0, 1, 0]))
