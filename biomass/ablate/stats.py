"""Confidence intervals for ablation deltas: a paired bootstrap over images of the competition metric.

(Just over 350 lines: the OOF reader's checks and the vectorised bootstrap belong together; each is short.)

An ablation compares a variant against the baseline by CV weighted R² (`biomass.metrics.weighted_r2`). The mean ± std
over seeds says nothing about how much of a delta is luck in which images were available; this module answers that
from the out-of-fold predictions each run leaves behind (`oof.csv`, `oof_deployable.csv`):

- `load_oof` reads one run's OOF file into a wide table (index image_id, columns TARGETS).
- `paired_bootstrap_delta` resamples images with replacement (one resample shared by both arms and every seed) and
  recomputes Δ = mean over seeds k of [R²(variant_k) − R²(baseline_k)] on each resample; percentile CI.
- `verdict` turns a CI into 'confirmed' / 'contradicted' / 'unresolved at this scale' for a claim.
- `compare_runs` does the above for every variant of a sweep from its run directories.
- `forest_plot` draws the result.

What the interval covers: the uncertainty from the finite set of images, with the trained models held fixed. It does
not cover training-seed noise (a new seed gives a different model). With several seeds the point estimate averages
that noise down; `resample_seeds=True` also resamples the seed pairs, which is only a rough guide with 2-3 seeds.

Depends only on numpy, pandas, matplotlib and biomass.metrics / constants / errors (it will move to
`biomass/ablate/stats.py`, so it must not import biomass.ablate).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biomass.constants import TARGET_WEIGHTS, TARGETS
from biomass.errors import DataError
from biomass.metrics import weighted_r2

OOF_FILES = {True: "oof_deployable.csv", False: "oof.csv"}
CLAIMS = ("not_better", "better", "worse", "none")  # none: a variant shown for its numbers, which judge no claim
NO_CLAIM = "no claim"
CONFIRMED, CONTRADICTED, UNRESOLVED = "confirmed", "contradicted", "unresolved at this scale"


# ------------------------------------------------------------------------------------------------------- reading
def load_oof(run_dir: str | Path, deployable: bool) -> pd.DataFrame:
    """One run's OOF predictions, wide: index image_id (sorted), columns TARGETS, float.

    deployable=True reads `oof_deployable.csv` (the score a submission would get: the main model fed the aux model's
    predicted tabular inputs); deployable=False reads `oof.csv` (fed the true tabular inputs: the oracle). Raises a
    DataError (a BiomassError) naming the file when it is missing or malformed: unreadable, wrong columns, a sample_id
    not of the form `<image_id>__<target>`, an unknown target, a duplicate, an image without all five targets, or a
    value that is not a finite number.
    """
    path = Path(run_dir) / OOF_FILES[bool(deployable)]
    if not path.is_file():
        other = Path(run_dir) / OOF_FILES[not deployable]
        hint = f" ({other.name} is there)" if other.is_file() else ""
        raise DataError(f"{path}: OOF file not found{hint}")
    try:
        df = pd.read_csv(path, dtype={"sample_id": str})
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the OOF file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    missing = [c for c in ("sample_id", "target") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} (has: {', '.join(map(str, df.columns))}); "
                        "expected Kaggle's long format sample_id,target")
    if df.empty:
        raise DataError(f"{path}: has a header but no rows")
    ids = df["sample_id"].fillna("").astype(str)
    parts = ids.str.rsplit("__", n=1)
    ok = parts.map(lambda p: len(p) == 2 and p[0].strip() != "" and p[1] != "")
    if not ok.all():
        raise DataError(f"{path}: sample_id {ids[~ok].iloc[0]!r} is not of the form '<image_id>__<target>'")
    image, target = parts.str[0], parts.str[1]
    unknown = ~target.isin(TARGETS)
    if unknown.any():
        raise DataError(f"{path}: sample_id {ids[unknown].iloc[0]!r} has unknown target {target[unknown].iloc[0]!r}; "
                        f"expected one of {', '.join(TARGETS)}")
    dup = ids.duplicated()
    if dup.any():
        raise DataError(f"{path}: duplicate sample_id {ids[dup].iloc[0]!r}")
    values = pd.to_numeric(df["target"], errors="coerce")
    bad = values.isna() | ~np.isfinite(values.fillna(0.0))
    if bad.any():
        raise DataError(f"{path}: sample_id {ids[bad].iloc[0]!r} has {df['target'][bad].iloc[0]!r}, "
                        "which is not a finite number")
    wide = pd.DataFrame({"image_id": image, "target_name": target, "value": values.astype(float)}).pivot(
        index="image_id", columns="target_name", values="value")
    wide = wide.reindex(columns=list(TARGETS))
    incomplete = wide.isna().any(axis=1)
    if incomplete.any():
        image_id = wide.index[incomplete][0]
        lacking = [t for t in TARGETS if pd.isna(wide.loc[image_id, t])]
        raise DataError(f"{path}: image {image_id!r} has no row for {', '.join(lacking)}")
    wide.columns.name = None
    wide.index = wide.index.astype(str).rename("image_id")
    return wide.sort_index()


# ----------------------------------------------------------------------------------------------------- bootstrap
def bootstrap_counts(n_images: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, n_images) int counts: how often each image is drawn in each resample of n_images with replacement.

    Public so that a reference implementation can replay exactly the same resamples (np.repeat(arange, counts)).
    """
    if n_images < 1 or n_boot < 1:
        raise ValueError(f"need n_images >= 1 and n_boot >= 1, got {n_images} and {n_boot}")
    draws = np.random.default_rng(seed).integers(0, n_images, size=(n_boot, n_images))
    flat = (draws + np.arange(n_boot)[:, None] * n_images).ravel()  # resample b's images in bins b*n .. b*n + n-1
    return np.bincount(flat, minlength=n_boot * n_images).reshape(n_boot, n_images)


def _as_arms(y_true: np.ndarray, preds: Sequence[np.ndarray], name: str) -> np.ndarray:
    if len(preds) == 0:
        raise ValueError(f"{name}: no seeds")
    arr = np.stack([np.asarray(p, dtype=np.float64) for p in preds])
    if arr.shape[1:] != y_true.shape:
        raise ValueError(f"{name}: expected {len(preds)} arrays of shape {y_true.shape}, got {arr.shape[1:]}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: predictions contain NaN or inf")
    return arr


def _r2_from_sums(ss_res: np.ndarray, ss_tot: np.ndarray) -> np.ndarray:
    """R² with the same zero-variance convention as biomass.metrics.r2_weighted_rows (1 if perfect, else 0)."""
    ss_tot = np.broadcast_to(ss_tot, ss_res.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - ss_res / ss_tot
    return np.where(ss_tot == 0, np.where(ss_res == 0, 1.0, 0.0), r2)


def paired_bootstrap_delta(y_true: np.ndarray, base_preds: Sequence[np.ndarray], variant_preds: Sequence[np.ndarray],
                           n_boot: int = 2000, seed: int = 0, ci: float = 0.95, resample_seeds: bool = False,
                           weights: tuple[float, ...] = TARGET_WEIGHTS) -> dict[str, Any]:
    """Paired bootstrap of Δ = mean_k [weighted_r2(variant_k) − weighted_r2(base_k)] (positive: variant better).

    y_true (n_images, 5) in TARGETS order; base_preds and variant_preds: one (n_images, 5) array per seed, paired by
    position (variant seed k against baseline seed k), on the same images in the same order. Each resample draws
    n_images images with replacement, the same draw for both arms and every seed, and recomputes the global weighted
    R² of every run on it (an image drawn c times counts c times: its five rows get weight c·w_target, and the
    weighted mean is that of the resample). resample_seeds=True also draws the seed pairs with replacement in each
    resample (k drawn -> variant_k and base_k together).

    Note that with resample_seeds=False the statistic is linear in the per-seed scores, so it equals
    mean(variant) − mean(base) whatever the seed order: the pairing shows in `per_seed` (and, with
    resample_seeds=True, in the interval), not in `delta`.

    Vectorised: with counts C (n_boot, n_images), every weighted sum over rows of a resample is C @ (per-image sums), so
    SS_res of each run is C @ r (r_i = Σ_j w_j (y_ij − p_ij)²) and SS_tot = C @ q − (C @ a)² / (C @ 1·Σw), with
    a_i = Σ_j w_j y_ij and q_i = Σ_j w_j y_ij² on y centred at its full-sample weighted mean (R² is shift invariant;
    the centring avoids cancellation).

    Returns delta (on all images), ci_lo, ci_hi (percentile interval at level `ci`), std (of the bootstrap
    distribution, ddof=1), per_seed (the n_seeds deltas on all images), p_positive (share of resamples with Δ > 0),
    n_images, n_seeds, n_boot, ci, resample_seeds, and samples (the n_boot resampled Δ, an array).
    """
    y = np.asarray(y_true, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != len(w):
        raise ValueError(f"y_true: expected shape (n_images, {len(w)}), got {y.shape}")
    if not np.isfinite(y).all():
        raise ValueError("y_true contains NaN or inf")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    base, var = _as_arms(y, base_preds, "base_preds"), _as_arms(y, variant_preds, "variant_preds")
    if len(base) != len(var):
        raise ValueError(f"paired seeds: {len(base)} baseline arrays but {len(var)} variant arrays")
    n, n_seeds = len(y), len(base)

    per_seed = np.array([weighted_r2(y, var[k], tuple(w)) - weighted_r2(y, base[k], tuple(w)) for k in range(n_seeds)])

    counts = bootstrap_counts(n, n_boot, seed).astype(np.float64)
    centred = y - np.sum(y * w) / (n * w.sum())
    a = centred @ w                                            # (n,)
    q = (centred ** 2) @ w                                     # (n,)
    res_base = ((y[None] - base) ** 2 @ w).T                   # (n, n_seeds)
    res_var = ((y[None] - var) ** 2 @ w).T
    sw = counts.sum(axis=1) * w.sum()                          # (n_boot,)
    ss_tot = counts @ q - (counts @ a) ** 2 / sw
    ss_tot = np.maximum(ss_tot, 0.0)[:, None]
    boot = _r2_from_sums(counts @ res_var, ss_tot) - _r2_from_sums(counts @ res_base, ss_tot)  # (n_boot, n_seeds)
    if resample_seeds:
        rng = np.random.default_rng([seed, 1])
        draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
        stats = np.take_along_axis(boot, draws, axis=1).mean(axis=1)
    else:
        stats = boot.mean(axis=1)

    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return {"delta": float(per_seed.mean()), "ci_lo": float(lo), "ci_hi": float(hi),
            "std": float(stats.std(ddof=1)) if n_boot > 1 else 0.0, "per_seed": [float(d) for d in per_seed],
            "p_positive": float(np.mean(stats > 0)), "n_images": int(n), "n_seeds": int(n_seeds),
            "n_boot": int(n_boot), "ci": float(ci), "resample_seeds": bool(resample_seeds), "samples": stats}


# ------------------------------------------------------------------------------------------------------- verdict
def verdict(ci_lo: float, ci_hi: float, claim_direction: str, margin: float = 0.0) -> str:
    """Judge a claim about Δ = variant − baseline (positive: variant better) from its confidence interval.

    Each claim names a region of Δ; the claim is 'confirmed' when the whole interval [ci_lo, ci_hi] lies inside that
    region, 'contradicted' when the whole interval lies outside it, and 'unresolved at this scale' otherwise (the
    interval straddles the boundary: more images or seeds are needed). margin >= 0 is the practical-equivalence
    margin m: an improvement of at most m does not count as "better", a loss of at most m does not count as "worse".

    - 'better'     (Δ > m):   confirmed if ci_lo > m;   contradicted if ci_hi <= m;   else unresolved.
    - 'not_better' (Δ <= m):  confirmed if ci_hi <= m;  contradicted if ci_lo > m;    else unresolved.
      (the exact complement of 'better'; with m = 0 a variant identical to the baseline, CI (0, 0), confirms it)
    - 'worse'      (Δ < −m):  confirmed if ci_hi < −m;  contradicted if ci_lo >= −m;  else unresolved.
      (with m = 0 a CI of (0, 0) contradicts 'worse': the same score is not worse)
    - 'none': the variant judges no claim (its CI cannot measure it, say): 'no claim', left out of the file's verdict.
    """
    if claim_direction not in CLAIMS:
        raise ValueError(f"claim_direction must be one of {', '.join(CLAIMS)}, got {claim_direction!r}")
    if claim_direction == "none":
        return NO_CLAIM
    lo, hi, m = float(ci_lo), float(ci_hi), float(margin)
    if not (math.isfinite(lo) and math.isfinite(hi) and math.isfinite(m)):
        raise ValueError(f"ci_lo, ci_hi and margin must be finite, got {ci_lo}, {ci_hi}, {margin}")
    if lo > hi:
        raise ValueError(f"ci_lo {lo} > ci_hi {hi}")
    if m < 0:
        raise ValueError(f"margin must be >= 0, got {m}")
    if claim_direction == "better":
        inside, outside = lo > m, hi <= m
    elif claim_direction == "not_better":
        inside, outside = hi <= m, lo > m
    else:
        inside, outside = hi < -m, lo >= -m
    return CONFIRMED if inside else CONTRADICTED if outside else UNRESOLVED


# ----------------------------------------------------------------------------------------------------- comparing
def _truth_table(y_true_wide: pd.DataFrame) -> pd.DataFrame:
    df = y_true_wide.set_index("image_id") if "image_id" in y_true_wide.columns else y_true_wide
    missing = [t for t in TARGETS if t not in df.columns]
    if missing:
        raise DataError(f"true labels: missing target column {missing[0]!r}")
    if df.index.duplicated().any():
        raise DataError(f"true labels: duplicate image_id {df.index[df.index.duplicated()][0]!r}")
    return df[list(TARGETS)].astype(float)


def compare_runs(y_true_wide: pd.DataFrame, runs: Mapping[str, Mapping[int, str | Path]], baseline: str = "baseline",
                 deployable: bool = True, n_boot: int = 2000, seed: int = 0, ci: float = 0.95,
                 resample_seeds: bool = False) -> list[dict[str, Any]]:
    """Bootstrap every variant against the baseline from the runs' OOF files; one row per variant (not the baseline).

    y_true_wide: the true labels, one row per image (`biomass.data.table.read_train(root)`: an image_id column, or
    image_id as the index) with the five target columns. runs: variant name -> {seed: run_dir}. Only seeds present in
    both the variant and the baseline are used, variant seed k paired with baseline seed k. The images are those in
    the labels and in every paired run's OOF file (the intersection; the row says how many of how many). With
    deployable=True the deployable OOF is used when every paired run of both arms has oof_deployable.csv, otherwise
    the oracle oof.csv for both arms (never a mix); the row's `score` says which.

    Row keys: variant, delta, ci_lo, ci_hi, std, p_positive, per_seed, seeds, n_seeds, n_images, n_images_total,
    score ('deployable' | 'oracle'), note. A variant with no seed in common with the baseline, or no image in common,
    gets delta/ci None and a note saying why.
    """
    if baseline not in runs:
        raise DataError(f"no runs for the baseline {baseline!r} (have: {', '.join(map(str, runs))})")
    truth = _truth_table(y_true_wide)
    base_runs = {int(s): Path(d) for s, d in runs[baseline].items()}
    rows: list[dict[str, Any]] = []
    for name, seeds_dirs in runs.items():
        if name == baseline:
            continue
        var_runs = {int(s): Path(d) for s, d in seeds_dirs.items()}
        seeds = sorted(set(var_runs) & set(base_runs))
        row: dict[str, Any] = {"variant": name, "delta": None, "ci_lo": None, "ci_hi": None, "std": None,
                               "p_positive": None, "per_seed": [], "seeds": seeds, "n_seeds": len(seeds),
                               "n_images": 0, "n_images_total": len(truth), "score": None, "note": ""}
        rows.append(row)
        unpaired = sorted(set(var_runs) ^ set(base_runs))
        if not seeds:
            row["note"] = (f"no seed in common with {baseline} (variant seeds {sorted(var_runs)}, "
                           f"{baseline} seeds {sorted(base_runs)})")
            continue
        dirs = [var_runs[s] for s in seeds] + [base_runs[s] for s in seeds]
        use_deployable = deployable and all((d / OOF_FILES[True]).is_file() for d in dirs)
        row["score"] = "deployable" if use_deployable else "oracle"
        try:  # a damaged or empty OOF file costs this row its CI, not the sweep its tables
            tables = [load_oof(d, use_deployable) for d in dirs]
        except DataError as err:
            row["note"] = f"no CI: {err}"
            continue
        common = truth.index
        for t in tables:
            common = common.intersection(t.index)
        common = common.sort_values()
        row["n_images"] = len(common)
        notes = []
        if unpaired:
            notes.append(f"seeds {unpaired} unpaired, left out")
        if deployable and not use_deployable:
            notes.append("oracle: a paired run has no oof_deployable.csv")
        if len(common) < len(truth):
            notes.append(f"{len(common)} of {len(truth)} images in every paired run's OOF")
        if len(common) == 0:
            row["note"] = "; ".join([*notes, "no image in common"])
            continue
        y = truth.loc[common].to_numpy()
        preds = [t.loc[common].to_numpy() for t in tables]
        result = paired_bootstrap_delta(y, preds[len(seeds):], preds[:len(seeds)], n_boot=n_boot, seed=seed, ci=ci,
                                        resample_seeds=resample_seeds)
        row.update({k: result[k] for k in ("delta", "ci_lo", "ci_hi", "std", "p_positive", "per_seed")})
        row["note"] = "; ".join(notes)
    return rows


# ---------------------------------------------------------------------------------------------------------- plot
def _signed(x: float) -> str:
    return f"{x:+.4f}".replace("-", "−")


def forest_plot(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """A forest plot PNG: one line per row (key 'variant'), its point Δ ('delta') with a horizontal CI bar
    ('ci_lo', 'ci_hi'), a vertical line at 0, and on the right the numbers and the row's 'verdict' (if any). Rows
    carrying an 'ablation' key are grouped under a header per ablation, in first-appearance order. Rows whose delta is
    None are listed as 'n/a' with their 'note'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get("ablation"), []).append(r)
    grouped = any(key is not None for key in groups)
    lines: list[tuple[str, Mapping[str, Any] | None]] = []  # top to bottom; None row: a group header
    for key, members in groups.items():
        if grouped:
            lines.append((str(key) if key is not None else "(no ablation)", None))
        lines.extend((str(r.get("variant", "?")), r) for r in members)

    height = 1.2 + 0.32 * max(len(lines), 1)
    fig, ax = plt.subplots(figsize=(9.0, height))
    fig.subplots_adjust(left=0.22, right=0.62, top=1 - 0.55 / height, bottom=0.45 / height)
    ys = list(range(len(lines)))[::-1]
    right = blended_transform_factory(ax.transAxes, ax.transData)
    labels = []
    for y, (label, r) in zip(ys, lines):
        if r is None:
            labels.append(label)
            continue
        labels.append(f"  {label}" if grouped else label)
        delta, lo, hi = r.get("delta"), r.get("ci_lo"), r.get("ci_hi")
        if delta is None:
            ax.text(1.03, y, f"n/a  {r.get('note', '')}", transform=right, va="center", fontsize=8, color="gray")
            continue
        verdict_text = r.get("verdict") or ""
        colour = {CONFIRMED: "tab:green", CONTRADICTED: "tab:red"}.get(verdict_text, "tab:blue")
        if lo is not None and hi is not None:
            ax.hlines(y, lo, hi, color=colour, lw=2)
        ax.plot([delta], [y], "o", color=colour, ms=5)
        text = _signed(delta) + (f" [{_signed(lo)}, {_signed(hi)}]" if lo is not None and hi is not None else "")
        ax.text(1.03, y, f"{text}  {verdict_text}".rstrip(), transform=right, va="center", fontsize=8)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(ys, labels, fontsize=8)
    for tick, (_, r) in zip(ax.get_yticklabels(), lines):
        if r is None:
            tick.set_fontweight("bold")
    ax.set_ylim(-0.7, len(lines) - 0.3)
    ax.set_xlabel("Δ CV weighted R² (variant − baseline), point and CI", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(title, fontsize=9)
    if not lines:
        ax.text(0.5, 0.5, "no rows", transform=ax.transAxes, ha="center")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["CLAIMS", "CONFIRMED", "CONTRADICTED", "NO_CLAIM", "OOF_FILES", "UNRESOLVED", "bootstrap_counts", "compare_runs",
           "forest_plot", "load_oof", "paired_bootstrap_delta", "verdict"]
