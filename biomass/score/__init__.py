"""Score a submission: `python -m biomass.score SOLUTION.csv SUBMISSION.csv [--json]`.

Both files carry `sample_id,target` (the solution may carry more columns, e.g. Kaggle's train.csv). Row order does not
matter; a missing, extra or duplicated sample_id is an error.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from biomass.constants import TARGET_WEIGHTS, TARGETS
from biomass.data.table import read_csv
from biomass.errors import DataError
from biomass.metrics import per_target_r2, r2_weighted_rows

WEIGHT_OF = dict(zip(TARGETS, TARGET_WEIGHTS))


def _load(path: Path, role: str) -> pd.DataFrame:
    df = read_csv(path, required=("sample_id", "target"))
    dup = df["sample_id"][df["sample_id"].duplicated()]
    if len(dup):
        raise DataError(f"{path}: sample_id {dup.iloc[0]!r} appears more than once in the {role}")
    values = pd.to_numeric(df["target"], errors="coerce")
    bad = values.isna() | ~np.isfinite(values.fillna(0))
    if bad.any():
        raise DataError(f"{path}: sample_id {df['sample_id'][bad].iloc[0]!r} has a non-numeric or non-finite target "
                        f"{df['target'][bad].iloc[0]!r}")
    return pd.DataFrame({"sample_id": df["sample_id"].astype(str), "target": values.astype(float)})


def score_files(solution: Path, submission: Path) -> dict[str, object]:
    sol, sub = _load(solution, "solution"), _load(submission, "submission")
    missing = sorted(set(sol["sample_id"]) - set(sub["sample_id"]))
    if missing:
        raise DataError(f"{submission}: sample_id {missing[0]!r} is missing ({len(missing)} missing in all)")
    extra = sorted(set(sub["sample_id"]) - set(sol["sample_id"]))
    if extra:
        raise DataError(f"{submission}: sample_id {extra[0]!r} is not in the solution ({len(extra)} extra in all)")
    merged = sol.merge(sub, on="sample_id", suffixes=("_true", "_pred"))
    target = merged["sample_id"].str.rsplit("__", n=1).str[-1]
    unknown = sorted(set(target) - set(TARGETS))
    if unknown:
        raise DataError(f"{solution}: unknown target name {unknown[0]!r} in sample_id; expected one of {TARGETS}")
    weights = target.map(WEIGHT_OF).to_numpy()
    score = r2_weighted_rows(merged["target_true"], merged["target_pred"], weights)
    per = {}
    for name in TARGETS:
        rows = target == name
        if rows.any():
            y, p = merged.loc[rows, "target_true"].to_numpy(), merged.loc[rows, "target_pred"].to_numpy()
            per[name] = per_target_r2(y[:, None], p[:, None], (name,))[name]
    return {"weighted_r2": score, "per_target": per, "rows": int(len(merged))}
