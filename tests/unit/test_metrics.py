"""biomass.metrics and `python -m biomass.score`: the one globally weighted R² over all (image, target) rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import hypothesis.extra.numpy as hnp
import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import r2_score

from biomass.constants import TARGET_WEIGHTS, TARGETS, TRAIN_COLUMNS
from biomass.metrics import per_target_r2, r2_weighted_rows, score_report, weighted_r2

W = np.array([0.1, 0.1, 0.1, 0.2, 0.5])


def test_target_order_and_weights_are_the_competitions() -> None:
    assert TARGETS == ("Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g", "GDM_g", "Dry_Total_g")
    assert TARGET_WEIGHTS == (0.1, 0.1, 0.1, 0.2, 0.5)


# ----------------------------------------------------------------------------------------------- hand-computed case
def test_weighted_r2_hand_computed() -> None:
    #            Green Dead Clover GDM Total
    y = np.array([[2, 0, 1, 3, 6],
                  [4, 2, 1, 5, 10]], dtype=float)
    p = np.array([[2, 0, 1, 3, 5],  # Total off by 1 (weight .5)
                  [4, 2, 3, 5, 10]], dtype=float)  # Clover off by 2 (weight .1)
    # one weighted mean over all ten rows; the weights sum to 2 (1 per image)
    mean = (0.1 * (2 + 0 + 1) + 0.2 * 3 + 0.5 * 6 + 0.1 * (4 + 2 + 1) + 0.2 * 5 + 0.5 * 10) / 2.0
    assert mean == pytest.approx(5.3)
    ss_res = 0.5 * 1 ** 2 + 0.1 * 2 ** 2
    ss_tot = (0.1 * ((2 - 5.3) ** 2 + (0 - 5.3) ** 2 + (1 - 5.3) ** 2) + 0.2 * (3 - 5.3) ** 2 + 0.5 * (6 - 5.3) ** 2
              + 0.1 * ((4 - 5.3) ** 2 + (2 - 5.3) ** 2 + (1 - 5.3) ** 2) + 0.2 * (5 - 5.3) ** 2
              + 0.5 * (10 - 5.3) ** 2)
    assert ss_tot == pytest.approx(21.22)
    expected = 1 - ss_res / ss_tot  # 0.957587...
    got = weighted_r2(y, p)
    assert got == pytest.approx(expected, abs=1e-12)
    assert got == pytest.approx(1 - 0.9 / 21.22, abs=1e-12)
    # not the unweighted R2, nor the mean of per-target R2s (the usual ways to get the metric wrong)
    assert abs(got - r2_score(y.ravel(), p.ravel())) > 1e-3
    assert abs(got - np.mean(list(per_target_r2(y, p).values()))) > 1e-3
    # the same through the flat-rows function, weights per row
    assert r2_weighted_rows(y.ravel(), p.ravel(), np.tile(W, 2)) == pytest.approx(expected, abs=1e-12)


def test_score_report_fields() -> None:
    y = np.array([[2, 0, 1, 3, 6], [4, 2, 1, 5, 10], [1, 1, 2, 2, 3]], dtype=float)
    p = y + np.array([[0.5, 0, 0, 0, -1], [0, 0.3, 0, 1, 0], [0, 0, -0.2, 0, 0.4]])
    report = score_report(y, p)
    per = report["per_target"]
    assert list(per) == list(TARGETS)
    assert report["weighted_r2"] == pytest.approx(weighted_r2(y, p))
    assert report["mean_target_r2"] == pytest.approx(np.mean([r2_score(y[:, j], p[:, j]) for j in range(5)]))


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        weighted_r2(np.zeros((3, 5)), np.zeros((3, 4)))
    with pytest.raises(ValueError):
        weighted_r2(np.zeros((3, 4)), np.zeros((3, 4)))  # five targets expected
    with pytest.raises(ValueError):
        weighted_r2(np.zeros(15), np.zeros(15))
    with pytest.raises(ValueError):
        r2_weighted_rows(np.zeros(4), np.zeros(4), np.ones(3))


# ------------------------------------------------------------------------------------------------------ vs sklearn
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 17
    y = rng.gamma(2.0, 20.0, size=(n, 5))
    p = y + rng.normal(0, 10.0, size=(n, 5))
    w = np.broadcast_to(W, y.shape)
    assert weighted_r2(y, p) == pytest.approx(r2_score(y.ravel(), p.ravel(), sample_weight=w.ravel()), abs=1e-12)
    per = per_target_r2(y, p)
    for j, name in enumerate(TARGETS):
        assert per[name] == pytest.approx(r2_score(y[:, j], p[:, j]), abs=1e-12)
    # a bad prediction goes negative, like sklearn's
    bad = rng.gamma(2.0, 20.0, size=(n, 5))
    assert weighted_r2(y, bad) == pytest.approx(r2_score(y.ravel(), bad.ravel(), sample_weight=w.ravel()))
    assert weighted_r2(y, bad) < 0


# ------------------------------------------------------------------------------------------------------ properties
@st.composite
def wide_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(2, 8))
    # integer-valued floats: sums are exact, so "all rows equal" (zero variance) is an exact test
    elems = st.integers(0, 500).map(float)
    y = draw(hnp.arrays(np.float64, (n, 5), elements=elems))
    p = draw(hnp.arrays(np.float64, (n, 5), elements=elems))
    return y, p


@settings(max_examples=60, deadline=None)
@given(pair=wide_pairs(), data=st.data(), c=st.floats(0.01, 100.0))
def test_weighted_r2_properties(pair: tuple[np.ndarray, np.ndarray], data: st.DataObject, c: float) -> None:
    y, p = pair
    score = weighted_r2(y, p)
    assert score <= 1.0
    # image-row order does not matter
    order = np.array(data.draw(st.permutations(range(len(y)))))
    assert weighted_r2(y[order], p[order]) == pytest.approx(score, rel=1e-9, abs=1e-9)
    # nor does the order of the flat (image, target) rows
    flat = np.array(data.draw(st.permutations(range(y.size))))
    w = np.broadcast_to(W, y.shape).ravel()
    assert r2_weighted_rows(y.ravel()[flat], p.ravel()[flat], w[flat]) == pytest.approx(score, rel=1e-9, abs=1e-9)
    # a perfect prediction scores exactly 1
    assert weighted_r2(y, y.copy()) == 1.0
    # scale invariance
    assert weighted_r2(c * y, c * p) == pytest.approx(score, rel=1e-9, abs=1e-9)
    # predicting the one weighted mean everywhere scores 0
    assume(np.ptp(y) > 0)
    mean = float(np.sum(np.broadcast_to(W, y.shape) * y) / (W.sum() * len(y)))
    assert weighted_r2(y, np.full_like(y, mean)) == pytest.approx(0.0, abs=1e-9)
    # ...while the unweighted mean is a (slightly) worse constant whenever the two means differ
    plain = float(y.mean())
    assert weighted_r2(y, np.full_like(y, plain)) <= 1e-12


# -------------------------------------------------------------------------------------------------------- the CLI
def _kaggle_solution(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """A Kaggle-train.csv-shaped solution (nine columns, long format) and its wide (n, 5) targets."""
    rng = np.random.default_rng(seed)
    y = np.round(rng.gamma(2.0, 15.0, size=(n, 5)), 4)
    rows = []
    for i in range(n):
        image = f"ID{1000 + i}"
        for j, t in enumerate(TARGETS):
            rows.append({"sample_id": f"{image}__{t}", "image_path": f"train/{image}.jpg",
                         "Sampling_Date": "2015/9/1", "State": "Tas", "Species": "Ryegrass",
                         "Pre_GSHH_NDVI": 0.6, "Height_Ave_cm": 4.5, "target_name": t, "target": y[i, j]})
    df = pd.DataFrame(rows)[list(TRAIN_COLUMNS)]
    return df, y


def _submission(sol: pd.DataFrame, pred: np.ndarray, seed: int) -> pd.DataFrame:
    sub = pd.DataFrame({"sample_id": sol["sample_id"], "target": pred.ravel()})
    return sub.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # row order must not matter


def _formula(y: np.ndarray, p: np.ndarray) -> float:
    w = np.broadcast_to(W, y.shape)
    mean = (w * y).sum() / w.sum()
    return float(1 - (w * (y - p) ** 2).sum() / (w * (y - mean) ** 2).sum())


# Each case writes its files into a folder and returns (CLI arguments, what the test needs to check).
def _case_random(d: Path) -> tuple[list[object], dict[str, object]]:
    sol, y = _kaggle_solution(9, seed=3)
    p = y + np.random.default_rng(4).normal(0, 8.0, size=y.shape)
    sol.to_csv(d / "solution.csv", index=False)  # all nine train.csv columns
    sub = _submission(sol, p, seed=5)
    assert (sub["sample_id"] != sol["sample_id"]).any()  # really shuffled
    sub.to_csv(d / "submission.csv", index=False)
    return [d / "solution.csv", d / "submission.csv", "--json"], {"y": y, "p": p}


def _case_table(d: Path) -> tuple[list[object], dict[str, object]]:
    sol, y = _kaggle_solution(4, seed=6)
    sol[["sample_id", "target"]].sample(frac=1.0, random_state=1).to_csv(d / "sol.csv", index=False)  # 2 columns
    p = y * 1.1
    _submission(sol, p, seed=2).to_csv(d / "sub.csv", index=False)
    return [d / "sol.csv", d / "sub.csv"], {"y": y, "p": p}


def _error_case(d: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    sol, y = _kaggle_solution(3, seed=0)
    sol.to_csv(d / "sol.csv", index=False)
    return sol, _submission(sol, y + 1.0, seed=0)


def _case_missing_id(d: Path) -> tuple[list[object], dict[str, object]]:
    _, sub = _error_case(d)
    sub.drop(index=3).to_csv(d / "sub.csv", index=False)
    return [d / "sol.csv", d / "sub.csv"], {"names": [sub["sample_id"].iloc[3], "missing"]}


def _case_extra_id(d: Path) -> tuple[list[object], dict[str, object]]:
    _, sub = _error_case(d)
    extra = pd.DataFrame({"sample_id": ["ID9999__GDM_g"], "target": [1.0]})
    pd.concat([sub, extra]).to_csv(d / "sub.csv", index=False)
    return [d / "sol.csv", d / "sub.csv"], {"names": ["ID9999__GDM_g"]}


def _case_duplicate_id(d: Path) -> tuple[list[object], dict[str, object]]:
    _, sub = _error_case(d)
    pd.concat([sub, sub.iloc[[7]]]).to_csv(d / "sub.csv", index=False)
    return [d / "sol.csv", d / "sub.csv"], {"names": [sub["sample_id"].iloc[7]]}


def _case_duplicate_in_solution(d: Path) -> tuple[list[object], dict[str, object]]:
    sol, sub = _error_case(d)
    pd.concat([sol, sol.iloc[[2]]]).to_csv(d / "sol2.csv", index=False)
    sub.to_csv(d / "sub.csv", index=False)
    return [d / "sol2.csv", d / "sub.csv"], {"names": [sol["sample_id"].iloc[2], "sol2.csv"]}


def _case_non_numeric(d: Path) -> tuple[list[object], dict[str, object]]:
    _, sub = _error_case(d)
    sub = sub.astype({"target": object})
    sub.loc[5, "target"] = "abc"
    sub.to_csv(d / "sub.csv", index=False)
    return [d / "sol.csv", d / "sub.csv"], {"names": [sub["sample_id"].iloc[5]]}


def _case_missing_file(d: Path) -> tuple[list[object], dict[str, object]]:
    _error_case(d)
    return [d / "sol.csv", d / "nowhere.csv"], {"names": ["nowhere.csv"]}


def _case_missing_column(d: Path) -> tuple[list[object], dict[str, object]]:
    _, sub = _error_case(d)
    sub.rename(columns={"target": "prediction"}).to_csv(d / "sub.csv", index=False)
    return [d / "sol.csv", d / "sub.csv"], {"names": ["'target'", "sub.csv"]}


def _case_debug(d: Path) -> tuple[list[object], dict[str, object]]:
    args, info = _case_missing_file(d)
    return [*args, "--debug"], info


ERRORS = {f.__name__.removeprefix("_case_"): f for f in (
    _case_missing_id, _case_extra_id, _case_duplicate_id, _case_duplicate_in_solution, _case_non_numeric,
    _case_missing_file, _case_missing_column)}
CASES = {"random": _case_random, "table": _case_table, "debug": _case_debug,
         **ERRORS}


class Run(NamedTuple):
    proc: subprocess.Popen[str]
    info: dict[str, object]

    def result(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=120)
        return self.proc.returncode, out, err


@pytest.fixture(scope="module", autouse=True)
def score_runs(tmp_path_factory) -> dict[str, Run]:
    """Every `python -m biomass.score` run of this module, started together at the module's start."""
    root = tmp_path_factory.mktemp("score")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    runs = {}
    for key, case in CASES.items():
        (root / key).mkdir()
        args, info = case(root / key)
        proc = subprocess.Popen([sys.executable, "-m", "biomass.score", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        runs[key] = Run(proc, info)
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()


def test_score_cli_matches_formula(score_runs: dict[str, Run]) -> None:
    code, stdout, stderr = score_runs["random"].result()
    y, p = score_runs["random"].info["y"], score_runs["random"].info["p"]
    assert code == 0, stderr
    out = json.loads(stdout)
    assert out["rows"] == 45
    assert out["weighted_r2"] == pytest.approx(_formula(y, p), abs=1e-6)
    assert out["weighted_r2"] == pytest.approx(weighted_r2(y, p), abs=1e-6)
    assert list(out["per_target"]) == list(TARGETS)
    for j, name in enumerate(TARGETS):
        assert out["per_target"][name] == pytest.approx(r2_score(y[:, j], p[:, j]), abs=1e-6)


def test_score_cli_two_column_solution_table(score_runs: dict[str, Run]) -> None:
    code, stdout, stderr = score_runs["table"].result()  # the human-readable table
    info = score_runs["table"].info
    assert code == 0, stderr
    assert "20 rows" in stdout
    assert f"{_formula(info['y'], info['p']):.5f}" in stdout
    for j in range(5):
        assert f"{r2_score(info['y'][:, j], info['p'][:, j]):.5f}" in stdout


@pytest.mark.parametrize("case", list(ERRORS))
def test_score_cli_errors(score_runs: dict[str, Run], case: str) -> None:
    code, stdout, stderr = score_runs[case].result()
    assert code == 2, (stdout, stderr)
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:")
    assert "Traceback" not in stderr
    for name in score_runs[case].info["names"]:
        assert name in lines[0], lines[0]


def test_debug_shows_the_traceback(score_runs: dict[str, Run]) -> None:
    """`--debug` (the shared biomass.errors.run_cli wrapper) re-raises: Python prints the traceback."""
    code, stdout, stderr = score_runs["debug"].result()
    assert code == 1
    assert "Traceback" in stderr and "DataError" in stderr and "nowhere.csv" in stderr


def test_no_score_on_nothing() -> None:
    """Zero rows, or a NaN/inf prediction, is an error, never a number (the R² of zero rows used to be 1.0)."""
    from biomass.metrics import NotScorable, scored_rows

    with pytest.raises(NotScorable, match="no rows"):
        weighted_r2(np.zeros((0, 5)), np.zeros((0, 5)))
    with pytest.raises(NotScorable, match="1 of 15 predictions are not finite"):
        r2_weighted_rows(np.ones(15), np.r_[np.ones(14), np.nan], np.ones(15))
    pred = np.ones((6, 5))
    pred[4, 2] = np.inf
    with pytest.raises(NotScorable, match=r"run: main fold 1: 1 of 3 predictions are not finite"):
        scored_rows(pred, {0: np.array([0, 2, 3]), 1: np.array([1, 4, 5])}, "run: main")
    with pytest.raises(NotScorable, match="no fold predicted any image"):
        scored_rows(pred, {}, "run: main")
    assert scored_rows(pred, {0: np.array([3, 0])}, "run").tolist() == [0, 3]
