"""An ablation's comparison: one row per variant (mean ± std over seeds, Δ against the baseline paired by seed, the
paired bootstrap 95% CI of Δ and the claim's verdict), as a CSV, a markdown table, a rich table, a forest plot and
summary.json; and the graveyard report of a whole sweep (every ablation's verdicts in one page and one plot)."""
from __future__ import annotations

import datetime as dt
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from biomass.ablate.spec import BASELINE, DEPLOYABLE, ORACLE, Ablation, shown_changes
from biomass.ablate.stats import CONFIRMED, CONTRADICTED, NO_CLAIM, UNRESOLVED, compare_runs, forest_plot, verdict
from biomass.constants import SHORT, TARGETS


@dataclass
class RunResult:
    variant: str
    seed: int
    run_dir: Path
    status: str = "pending"  # completed | failed
    exit_code: int | None = None
    duration_s: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    mlflow_run_id: str | None = None


# ------------------------------------------------------------------------------------------------------- summary
def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and std over the seeds that have the value; none (not a number) when any is NaN or inf, or none has it:
    a mean over the finite ones would hide a diverged seed."""
    values = [v for v in values if v is not None]
    if not values or not all(math.isfinite(v) for v in values):
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(ablation: Ablation, results: list[RunResult]) -> list[dict[str, Any]]:
    """One row per variant: mean ± std (over seeds) of the oracle and deployable CV, deltas against the baseline
    paired by seed, per-target R², time, status. Rows: the baseline, then the variants best first."""
    by_variant: dict[str, list[RunResult]] = {v.name: [] for v in ablation.variants}
    for r in results:
        by_variant[r.variant].append(r)
    base_by_seed = {r.seed: r.metrics for r in by_variant[BASELINE] if r.status == "completed"}
    rows = []
    for v in ablation.variants:
        runs = by_variant[v.name]
        ok = [r for r in runs if r.status == "completed"]
        row: dict[str, Any] = {"variant": v.name, "runs": len(runs), "completed": len(ok)}
        for key, col in ((DEPLOYABLE, "deployable"), (ORACLE, "oracle")):
            row[col], row[f"{col}_std"] = _mean_std([r.metrics.get(key) for r in ok])
            if v.name == BASELINE:
                row[f"delta_{col}"], row[f"delta_{col}_std"] = (0.0 if row[col] is not None else None), None
            else:
                row[f"delta_{col}"], row[f"delta_{col}_std"] = _mean_std(
                    [r.metrics[key] - base_by_seed[r.seed][key] for r in ok
                     if key in r.metrics and key in base_by_seed.get(r.seed, {})])
        for t in TARGETS:
            row[f"{t}_r2"] = _mean_std([r.metrics.get(f"cv/{t}_r2") for r in ok])[0]
        row["ranked_by"] = "deployable" if row["deployable"] is not None else "oracle"
        row["score"] = row["deployable"] if row["deployable"] is not None else row["oracle"]
        row["time_s"] = _mean_std([r.duration_s for r in runs])[0]
        if not runs:
            row["status"] = "not run"
        elif len(ok) == len(runs):
            row["status"] = "completed"
        else:
            errors = [f"seed {r.seed}: {r.error}" if len(runs) > 1 else r.error for r in runs if r.error]
            row["status"] = ("failed" if not ok else f"{len(ok)}/{len(runs)} completed") + f" ({'; '.join(errors)})"
        row["changes"] = "; ".join(f"{k}: {a} -> {b}" for k, a, b in shown_changes(v.changes))
        rows.append(row)
    rest = sorted(rows[1:], key=lambda r: (r["score"] is None, -(r["score"] or 0.0)))
    return [rows[0], *rest]


def add_intervals(ablation: Ablation, rows: list[dict[str, Any]], results: list[RunResult],
                  n_boot: int = 2000) -> list[dict[str, Any]]:
    """Each variant row gets the paired bootstrap 95% CI of Δ weighted R² against the baseline (images of the OOF
    predictions, seeds paired and pooled: biomass.ablate.stats.compare_runs), on the deployable score when every
    paired run has one, else the oracle; and the verdict on its claim direction."""
    import pandas as pd

    from biomass.data.table import read_train

    runs: dict[str, dict[int, Path]] = {}
    for r in results:
        if r.status == "completed":
            runs.setdefault(r.variant, {})[r.seed] = r.run_dir
    for row in rows:
        row.update({"ci_lo": None, "ci_hi": None, "ci_delta": None, "ci_score": None, "ci_note": "",
                    "claim_direction": None if row["variant"] == BASELINE else ablation.direction(row["variant"]),
                    "verdict": None})
    if BASELINE not in runs or len(runs) < 2:
        for row in rows[1:]:
            row["ci_note"] = "no completed baseline" if BASELINE not in runs else "no completed variant"
        return rows
    data = ablation.baseline.config.data
    wide = read_train(data.root, data.train_csv, data.allow_outside_root)
    truth = pd.DataFrame({"image_id": wide["image_id"], **{t: wide[t] for t in TARGETS}})
    by_variant = {c["variant"]: c for c in compare_runs(truth, runs, BASELINE, deployable=True, n_boot=n_boot)}
    for row in rows:
        c = by_variant.get(row["variant"])
        if c is None:
            continue
        row.update({"ci_lo": c["ci_lo"], "ci_hi": c["ci_hi"], "ci_delta": c["delta"], "ci_score": c["score"],
                    "ci_note": c["note"]})
        if c["ci_lo"] is not None:
            row["verdict"] = verdict(c["ci_lo"], c["ci_hi"], row["claim_direction"], ablation.margin)
    return rows


def overall_verdict(rows: list[dict[str, Any]]) -> str:
    """The file's claim covers all its variants: confirmed when every variant confirms it, contradicted when any
    contradicts it, else unresolved."""
    verdicts = [r.get("verdict") for r in rows if r["variant"] != BASELINE and r.get("verdict") != NO_CLAIM]
    if verdicts and all(v == CONFIRMED for v in verdicts):
        return CONFIRMED
    if any(v == CONTRADICTED for v in verdicts):
        return CONTRADICTED
    return UNRESOLVED


def _ci(row: dict[str, Any]) -> str:
    if row.get("ci_lo") is None:
        return "—"
    return f"[{row['ci_lo']:+.4f}, {row['ci_hi']:+.4f}]" + (" (oracle)" if row.get("ci_score") == "oracle" else "")


def _fmt(mean: float | None, std: float | None = None, signed: bool = False) -> str:
    if mean is None:
        return "—"
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return f"{text} ± {std:.4f}" if std is not None else text


def fmt_time(seconds: float | None) -> str:
    return "—" if seconds is None else str(dt.timedelta(seconds=round(seconds)))


TABLE_COLUMNS = ("variant", "CV deployable", "CV oracle", "Δ deployable", "Δ oracle", "Δ 95% CI", "verdict",
                 *(SHORT[t] for t in TARGETS), "time", "status")


def table_cells(row: dict[str, Any]) -> list[str]:
    no_aux = row["deployable"] is None and row["oracle"] is not None
    return [row["variant"], "n/a (no aux)" if no_aux else _fmt(row["deployable"], row["deployable_std"]),
            _fmt(row["oracle"], row["oracle_std"]),
            _fmt(row["delta_deployable"], row["delta_deployable_std"], signed=True),
            _fmt(row["delta_oracle"], row["delta_oracle_std"], signed=True), _ci(row),
            row.get("verdict") or ("—" if row["variant"] == BASELINE else "n/a"),
            *(_fmt(row[f"{t}_r2"]).replace("0.", ".", 1) if row[f"{t}_r2"] is not None else "—" for t in TARGETS),
            fmt_time(row["time_s"]), row["status"]]


def notes(rows: list[dict[str, Any]], seeds: int) -> list[str]:
    out = ["Ranked by CV weighted R² deployable (aux-predicted NDVI/Height, as at test time); Δ = variant − "
           "baseline" + (", paired by seed, mean ± std over seeds" if seeds > 1 else "") + ".",
           "Δ 95% CI: paired bootstrap over images of the OOF predictions (seeds paired, pooled), on the deployable "
           "score when every paired run has one, else the oracle; it covers which images were scored, not "
           "training noise. Verdict: the claim direction of each variant (not_better / better / worse) judged on "
           "that CI."]
    no_aux = [r["variant"] for r in rows if r["ranked_by"] == "oracle" and r["oracle"] is not None]
    if no_aux:
        out.append(f"No aux stage, so no deployable CV: {', '.join(no_aux)} ranked by the oracle CV (true "
                   "NDVI/Height fed to the main model), which over-states the test-time score.")
    return out


def markdown_table(ablation: Ablation, rows: list[dict[str, Any]], seeds: int) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# Ablation `{ablation.name}`", ""]
    if ablation.claim:
        lines += [f"Claim: {ablation.claim} (overall verdict: {overall_verdict(rows)})", ""]
    lines += [f"Base: `{ablation.base}`; knobs: {', '.join(f'`{k}`' for k in ablation.knobs)}"
              + (f"; every run: `{' '.join(ablation.overrides)}`" if ablation.overrides else "")
              + (f"; {seeds} seeds" if seeds > 1 else ""), ""]
    lines.append("| " + " | ".join(TABLE_COLUMNS) + " |")
    lines.append("|" + "|".join("---" if c in ("variant", "status") else "---:" for c in TABLE_COLUMNS) + "|")
    for row in rows:
        lines.append("| " + " | ".join(esc(c) for c in table_cells(row)) + " |")
    lines += ["", *notes(rows, seeds), ""]
    changes = [f"- `{r['variant']}`: {esc(r['changes'])}" for r in rows if r["changes"]]
    if changes:
        lines += ["Changes against the baseline:", "", *changes, ""]
    return "\n".join(lines)


def print_table(ablation: Ablation, rows: list[dict[str, Any]], seeds: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    title = f"ablation {ablation.name}" + (f": {ablation.claim}" if ablation.claim else "")
    table = Table(title=title, caption=" ".join(notes(rows, seeds)))
    for col in TABLE_COLUMNS:
        table.add_column(col, justify="left" if col in ("variant", "status") else "right",
                         overflow="fold" if col == "status" else "ellipsis")
    for row in rows:
        cells = table_cells(row)
        if row["variant"] == BASELINE:
            cells[0] = f"[bold]{cells[0]}"
        elif row.get("verdict") in (CONFIRMED, CONTRADICTED):
            cells[6] = f"[{'green' if row['verdict'] == CONFIRMED else 'red'}]{cells[6]}"
        elif row["status"] != "completed":
            cells[-1] = f"[red]{cells[-1]}"
        table.add_row(*cells)
    console.print(table)


def delta_plot(ablation: Ablation, rows: list[dict[str, Any]], seeds: int, path: Path) -> Path:
    """The forest plot: each variant's Δ with its bootstrap CI and verdict."""
    plotted = [{"variant": r["variant"], "delta": r["ci_delta"], "ci_lo": r["ci_lo"], "ci_hi": r["ci_hi"],
                "verdict": r["verdict"], "note": r["ci_note"] or r["status"]} for r in rows if r["variant"] != BASELINE]
    claim = f"{ablation.claim}; " if ablation.claim else ""
    title = (f"ablation {ablation.name}: Δ weighted R² vs {BASELINE}, 95% CI" + (f", {seeds} seeds" if seeds > 1 else "")
             + f"\n{claim}claim: " + ", ".join(sorted(set(ablation.directions.values()))))
    return forest_plot(plotted, path, title[:200])


def write_summary(ablation: Ablation, rows: list[dict[str, Any]], results: list[RunResult], seeds: int,
                  out_dir: Path) -> list[Path]:
    import pandas as pd

    files = [out_dir / "comparison.csv", out_dir / "comparison.md", out_dir / "runs.csv", out_dir / "deltas.png"]
    pd.DataFrame(rows).to_csv(files[0], index=False, float_format="%.6f")
    files[1].write_text(markdown_table(ablation, rows, seeds))
    pd.DataFrame([{"variant": r.variant, "seed": r.seed, "status": r.status, "exit_code": r.exit_code,
                   "duration_s": round(r.duration_s, 1), "run_dir": str(r.run_dir),
                   "mlflow_run_id": r.mlflow_run_id, "error": r.error,
                   **{k: v for k, v in r.metrics.items() if k.startswith("cv/") and isinstance(v, (int, float))}}
                  for r in results]).to_csv(files[2], index=False, float_format="%.6f")
    delta_plot(ablation, rows, seeds, files[3])
    return files


# ------------------------------------------------------------------------------------------------------ graveyard
GRAVEYARD_MD, GRAVEYARD_PNG, SUMMARY = "graveyard.md", "graveyard.png", "summary.json"


def write_graveyard(sweep_dir: Path, ablation_names: list[str]) -> list[Path]:
    """SWEEP_DIR/graveyard.md and graveyard.png from each ablation's summary.json: per ablation its claim and overall
    verdict, per variant Δ ± CI, verdict, time and status. An ablation without a summary yet is listed as not run."""
    import json

    from biomass.errors import BiomassError

    lines = [f"# Graveyard report: `{sweep_dir}`", "",
             "Δ = variant − baseline in CV weighted R² (deployable when every paired run has an aux stage, else "
             "oracle); 95% CI: paired bootstrap over images, seeds paired and pooled. Verdict: the claim judged on "
             "the CI (`confirmed` / `contradicted` / `unresolved at this scale`).", ""]
    plotted: list[dict[str, Any]] = []
    for name in ablation_names:
        path = sweep_dir / name / SUMMARY
        if not path.is_file():
            lines += [f"## `{name}`: not run", ""]
            continue
        try:
            summary = json.loads(path.read_text())
        except ValueError:
            raise BiomassError(f"{path}: not readable JSON; rerun the sweep with --resume {sweep_dir}") from None
        rows = summary["rows"]
        lines += [f"## `{name}`: {overall_verdict(rows)}", "", f"Claim: {summary.get('claim') or '(none)'}", "",
                  "| variant | claim | Δ | 95% CI | verdict | time | status |", "|---|---|---:|---:|---|---:|---|"]
        for r in rows:
            delta = r.get("ci_delta")
            if delta is None:  # no CI: the mean Δ over seeds, if any
                delta = r["delta_deployable"] if r["ranked_by"] == "deployable" else r["delta_oracle"]
            lines.append(f"| {r['variant']} | {r.get('claim_direction') or ''} | "
                         f"{_fmt(delta, signed=True) if r['variant'] != BASELINE else '—'} | {_ci(r)} | "
                         f"{r.get('verdict') or '—'} | {fmt_time(r['time_s'])} | "
                         f"{r['status'].replace('|', '/')} |")
            if r["variant"] != BASELINE:
                plotted.append({"ablation": name, "variant": r["variant"], "delta": r.get("ci_delta"),
                                "ci_lo": r.get("ci_lo"), "ci_hi": r.get("ci_hi"), "verdict": r.get("verdict"),
                                "note": r.get("ci_note") or r["status"]})
        lines.append("")
    md, png = sweep_dir / GRAVEYARD_MD, sweep_dir / GRAVEYARD_PNG
    md.write_text("\n".join(lines))
    forest_plot(plotted, png, f"graveyard: Δ weighted R² vs baseline, 95% CI ({sweep_dir.name})")
    return [md, png]
