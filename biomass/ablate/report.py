"""An ablation's comparison: one row per variant (mean ± std over seeds, Δ against the baseline paired by seed),
as a CSV, a markdown table, a rich table, a Δ chart and summary.json."""
from __future__ import annotations

import datetime as dt
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from biomass.ablate.spec import BASELINE, DEPLOYABLE, ORACLE, Ablation, shown_changes
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
def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
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


def _fmt(mean: float | None, std: float | None = None, signed: bool = False) -> str:
    if mean is None:
        return "—"
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return f"{text} ± {std:.4f}" if std is not None else text


def fmt_time(seconds: float | None) -> str:
    return "—" if seconds is None else str(dt.timedelta(seconds=round(seconds)))


TABLE_COLUMNS = ("variant", "CV deployable", "CV oracle", "Δ deployable", "Δ oracle",
                 *(SHORT[t] for t in TARGETS), "time", "status")


def table_cells(row: dict[str, Any]) -> list[str]:
    no_aux = row["deployable"] is None and row["oracle"] is not None
    return [row["variant"], "n/a (no aux)" if no_aux else _fmt(row["deployable"], row["deployable_std"]),
            _fmt(row["oracle"], row["oracle_std"]),
            _fmt(row["delta_deployable"], row["delta_deployable_std"], signed=True),
            _fmt(row["delta_oracle"], row["delta_oracle_std"], signed=True),
            *(_fmt(row[f"{t}_r2"]).replace("0.", ".", 1) if row[f"{t}_r2"] is not None else "—" for t in TARGETS),
            fmt_time(row["time_s"]), row["status"]]


def notes(rows: list[dict[str, Any]], seeds: int) -> list[str]:
    out = ["Ranked by CV weighted R² deployable (aux-predicted NDVI/Height, as at test time); Δ = variant − "
           "baseline" + (", paired by seed, mean ± std over seeds" if seeds > 1 else "") + "."]
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
        lines += [f"Claim: {ablation.claim}", ""]
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
        elif row["status"] != "completed":
            cells[-1] = f"[red]{cells[-1]}"
        table.add_row(*cells)
    console.print(table)


def delta_plot(ablation: Ablation, rows: list[dict[str, Any]], seeds: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [r for r in rows if r["variant"] != BASELINE]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(variants) + 2), 3.6))
    x = list(range(len(variants)))
    width = 0.38
    for offset, col, label, colour in ((-width / 2, "delta_deployable", "Δ CV weighted R² deployable", "tab:blue"),
                                       (width / 2, "delta_oracle", "Δ CV weighted R² oracle", "tab:gray")):
        values = [r[col] if r[col] is not None else 0.0 for r in variants]
        errors = [r[f"{col}_std"] or 0.0 for r in variants] if seeds > 1 else None
        ax.bar([i + offset for i in x], values, width, yerr=errors, capsize=3, label=label, color=colour)
        for i, r in enumerate(variants):
            if r[col] is None:
                ax.annotate("n/a", (i + offset, 0), ha="center", va="bottom", fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [r["variant"] for r in variants], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"variant − {BASELINE}")
    base = rows[0]
    ref = ", ".join(f"{label} {base[col]:.4f}" for col, label in (("deployable", "deployable"), ("oracle", "oracle"))
                    if base[col] is not None)
    ax.set_title(f"ablation {ablation.name}" + (f" (mean ± std over {seeds} seeds)" if seeds > 1 else "")
                 + f"\n{BASELINE}: {ref or 'failed'}", fontsize=9)
    if not variants:
        ax.text(0.5, 0.5, "no variants", transform=ax.transAxes, ha="center")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
