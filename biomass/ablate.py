"""Ablations: `python -m biomass.ablate ABLATION.yaml [...] [--base EXP] [--dry-run] [--seeds N] [key=value ...]`.

An ablation file (ablations/*.yaml) names a base experiment, the config prefixes its variants may change (`knobs`)
and the variants, each a mapping of dotted config keys to values:

    name: losses
    claim: pure MSE, quantile, log and direct-R2 losses did not beat weighted SmoothL1
    base: ../experiments/gold.yaml     # relative to this file; --base replaces it
    knobs: [main.loss]
    variants:
      mse: {main.loss: {name: mse}}

Every variant is merged onto the base with the config's own rules (a component whose `name` changes is replaced
whole), validated, and compared with the base key by key: a variant that changes anything outside its knobs is
refused before anything trains. The unchanged base runs as variant `baseline`. Each run is its own process
(`accelerate launch -m biomass.run`), a nested MLflow child of one parent run per ablation file, which collects
the comparison table (CSV, markdown), a bar chart of the deltas against the baseline, and `delta/<variant>/...`
metrics. A crashed variant is recorded as failed and the others go on.

Exit status: 0 when every run completed; 1 when any run failed (the table and the parent run are still written);
2 for a bad ablation file, experiment or override, or a missing data root or weights file (one line, nothing
trained: every file and variant is checked before the first run starts).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from biomass.config import (ExperimentConfig, deep_merge, flatten, load_experiment_dict, load_yaml, parse_overrides,
                            resolve_paths, validate)
from biomass.constants import TARGETS
from biomass.errors import BiomassError, ConfigError, run_cli, suggest

BASELINE = "baseline"
ABLATION_KEYS = ("name", "claim", "base", "knobs", "variants")
ORACLE = "cv/weighted_r2"
DEPLOYABLE = "cv/weighted_r2_deployable"
SHORT = {"Dry_Green_g": "Green", "Dry_Dead_g": "Dead", "Dry_Clover_g": "Clover", "GDM_g": "GDM", "Dry_Total_g": "Total"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # safe in a folder name and an MLflow metric name


class _Absent:
    """A key one side of a comparison does not have."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


# ------------------------------------------------------------------------------------------------------ resolution
@dataclass
class Variant:
    name: str
    config: ExperimentConfig
    changes: dict[str, tuple[Any, Any]]  # flattened key -> (base value, variant value); ABSENT where missing


@dataclass
class Ablation:
    path: Path
    name: str
    claim: str | None
    base: Path
    knobs: list[str]
    overrides: list[str]
    variants: list[Variant]  # the baseline first

    @property
    def baseline(self) -> Variant:
        return self.variants[0]


def in_knobs(key: str, knobs: list[str]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in knobs)


def config_changes(base: dict[str, Any], other: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The flattened keys whose values differ between two dumped configs (a key only one side has included)."""
    a, b = flatten(base), flatten(other)
    return {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, ABSENT) != b.get(k, ABSENT)}


def _nest(path: Path, variant: str, changes: Any) -> dict[str, Any]:
    """`{'main.loss': {...}, 'seed': 1}` -> a nested override dict."""
    if not isinstance(changes, dict) or not changes:
        raise ConfigError(f"{path}: variant {variant!r} must be a non-empty mapping of config keys to values, "
                          f"got {changes!r}")
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{path}: variant {variant!r}: {key!r} is not a dotted config key")
        node: Any = value
        for part in reversed(key.split(".")):
            node = {part: node}
        out = _merge_plain(out, node)
    return out


def _merge_plain(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_plain(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def load_ablation(path: str | Path, base: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
                  ) -> Ablation:
    """Read an ablation file and resolve every variant to a validated config; refuse changes outside the knobs.

    `base` (relative to the working directory) replaces the file's own `base:`; `overrides` (`key=value`, paths
    relative to the working directory) apply to the baseline and every variant, under the variants' own changes.
    """
    from biomass.registry import load_components

    load_components()
    path = Path(path)
    raw = load_yaml(path)
    where = str(path)
    for key in raw:
        if key not in ABLATION_KEYS:
            raise ConfigError(f"{where}: unknown ablation key {key!r}{suggest(str(key), ABLATION_KEYS)}; "
                              f"an ablation has {', '.join(ABLATION_KEYS)}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: `name` must be letters, digits, '_', '-' or '.', got {name!r}")
    claim = raw.get("claim")
    if claim is not None and not isinstance(claim, str):
        raise ConfigError(f"{where}: `claim` must be text, got {claim!r}")
    knobs = raw.get("knobs")
    if isinstance(knobs, str):
        knobs = [knobs]
    if not isinstance(knobs, list) or not knobs or not all(
            isinstance(k, str) and k and all(k.split(".")) for k in knobs):
        raise ConfigError(f"{where}: `knobs` must be a non-empty list of dotted config keys, got {knobs!r}")
    variants = raw.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{where}: `variants` must be a non-empty mapping of variant names to changes")
    if base is not None:
        base_path = Path(base).resolve()
    else:
        if not isinstance(raw.get("base"), str):
            raise ConfigError(f"{where}: `base` (the experiment the variants change) is missing; add it or pass --base")
        base_path = (path.parent / raw["base"]).resolve()

    base_raw = load_experiment_dict(base_path)
    # parent and children share one MLflow experiment, named after the ablation (an override may still rename it)
    base_raw = deep_merge(base_raw, {"tracking": {"experiment": name}})
    base_raw = deep_merge(base_raw, resolve_paths(parse_overrides(list(overrides)), ExperimentConfig, Path.cwd(),
                                                  base_raw))
    try:
        base_cfg = validate(base_raw)
    except ConfigError as err:
        raise ConfigError(f"{where}: the base {base_path}: {err}") from None
    base_dump = base_cfg.dump()
    resolved = [Variant(BASELINE, base_cfg, {})]
    for vname, vchanges in variants.items():
        if not isinstance(vname, str) or not _NAME.match(vname):
            raise ConfigError(f"{where}: variant name {vname!r} must be letters, digits, '_', '-' or '.'")
        if vname == BASELINE:
            raise ConfigError(f"{where}: {BASELINE!r} is the unchanged base and runs anyway; rename that variant")
        nested = resolve_paths(_nest(path, vname, vchanges), ExperimentConfig, path.parent.resolve(), base_raw)
        try:
            cfg = validate(deep_merge(base_raw, nested))
        except ConfigError as err:
            raise ConfigError(f"{where}: variant {vname!r}: {err}") from None
        changes = config_changes(base_dump, cfg.dump())
        outside = [k for k in changes if not in_knobs(k, knobs)]
        if outside:
            shown = ", ".join(f"{k!r} ({_show(changes[k][0])} -> {_show(changes[k][1])})" for k in outside[:3])
            more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
            raise ConfigError(f"{where}: variant {vname!r} changes {shown}{more} outside its knobs "
                              f"({', '.join(knobs)}); declare the key as a knob or drop the change")
        resolved.append(Variant(vname, cfg, changes))

    known = set(flatten(base_dump)).union(*(flatten(v.config.dump()) for v in resolved))
    for knob in knobs:
        if not any(in_knobs(k, [knob]) for k in known):
            leaves = sorted({k.rsplit(".", 1)[0] for k in known} | known)
            raise ConfigError(f"{where}: knob {knob!r} matches no config key{suggest(knob, leaves)}")
    return Ablation(path.resolve(), name, claim, base_path, list(knobs), list(overrides), resolved)


# ------------------------------------------------------------------------------------------------------- display
def _show(value: Any) -> str:
    if value is ABSENT:
        return "(absent)"
    if isinstance(value, dict):
        return "{...}" if value else "{}"
    return json.dumps(value) if isinstance(value, (str, list, bool)) or value is None else str(value)


def shown_changes(changes: dict[str, tuple[Any, Any]]) -> list[tuple[str, str, str]]:
    """Changes as (key, before, after) text, a whole section added or removed shown once (`aux: {...} -> null`)."""
    out = []
    for key, (before, after) in changes.items():
        parts = key.split(".")
        if any(".".join(parts[:i]) in changes for i in range(1, len(parts))):
            continue  # inside a section that is replaced as a whole, already shown
        below = [k for k in changes if k.startswith(key + ".")]
        out.append((key, "{...}" if before is ABSENT and below else _show(before),
                    "{...}" if after is ABSENT and below else _show(after)))
    return out


def describe(ablation: Ablation, seeds: int = 1) -> str:
    lines = [f"ablation {ablation.name} ({ablation.path}): base {ablation.base}; knobs {', '.join(ablation.knobs)}"]
    if ablation.claim:
        lines.append(f"  claim: {ablation.claim}")
    if ablation.overrides:
        lines.append(f"  every run: {' '.join(ablation.overrides)}")
    lines.append(f"  {BASELINE}: the base, unchanged")
    for v in ablation.variants[1:]:
        lines.append(f"  {v.name}:")
        if not v.changes:
            lines.append("    (no change: identical to the baseline)")
        for key, before, after in shown_changes(v.changes):
            lines.append(f"    {key}: {before} -> {after}")
    n = len(ablation.variants)
    per_seed = f"{n - 1} variant{'s' if n > 2 else ''} + {BASELINE}"
    lines.append(f"  {n * seeds} runs ({per_seed}{f', x {seeds} seeds' if seeds > 1 else ''})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- running
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


def child_command(config_file: Path, run_dir: Path, launch_args: list[str], parent_run_id: str | None,
                  tags: dict[str, str]) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "-m", "biomass.run", str(config_file),
           "--run-dir", str(run_dir)]
    if parent_run_id:
        cmd += ["--parent-run-id", parent_run_id]
    for key, value in tags.items():
        cmd += ["--tag", f"{key}={value}"]
    return cmd


def write_config(cfg: ExperimentConfig, seed: int, path: Path) -> Path:
    """The full resolved config, every path absolute, so `python -m biomass.run path` runs exactly it."""
    data = cfg.dump()
    data["seed"] = seed
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120))
    return path


def _error_line(stderr: str) -> str | None:
    """The informative line of a crashed run's stderr: biomass's one-line `error:`, else the last exception line
    that is not the launcher's own CalledProcessError, else the last line."""
    lines = [ln.rstrip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error: "):
            return ln[len("error: "):]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", ln) and "CalledProcessError" not in ln:
            return ln
    return lines[-1] if lines else None


def _tail(text: str, n: int = 8) -> str:
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-n:])


def run_one(result: RunResult, cmd: list[str], log_dir: Path, env: dict[str, str]) -> RunResult:
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{result.run_dir.name}.out", log_dir / f"{result.run_dir.name}.err"
    (log_dir / f"{result.run_dir.name}.cmd").write_text(shlex.join(cmd) + "\n")
    start = time.time()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        try:
            result.exit_code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
    result.duration_s = time.time() - start
    stderr = err_path.read_text(errors="replace")
    status = _read_json(result.run_dir / "run.json")
    result.mlflow_run_id = status.get("mlflow_run_id")
    metrics = _read_json(result.run_dir / "metrics.json")
    if result.exit_code == 0 and status.get("status") == "completed" and ORACLE in metrics:
        result.status, result.metrics = "completed", metrics
    else:
        result.status = "failed"
        why = _error_line(stderr) or status.get("error") or "no error message"
        if result.exit_code == 0:
            why = f"exited 0 without a completed run ({why})"
        result.error = f"exit {result.exit_code}: {why}"
        (log_dir / f"{result.run_dir.name}.tail").write_text(_tail(stderr) + "\n")
    return result


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=20)
        except (subprocess.TimeoutExpired, OSError):
            proc.kill()
            proc.wait()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stamp_dir(root: Path, name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, k = root / name / stamp, 2
    while out.exists():
        out, k = root / name / f"{stamp}-{k}", k + 1
    out.mkdir(parents=True)
    return out.resolve()


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


def _fmt_time(seconds: float | None) -> str:
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
            _fmt_time(row["time_s"]), row["status"]]


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


# -------------------------------------------------------------------------------------------------------- MLflow
class Parent:
    """The ablation's parent MLflow run (a client-side run, so the children run in their own processes)."""

    def __init__(self, ablation: Ablation, seeds: int, out_dir: Path):
        import logging

        import mlflow
        from mlflow.tracking import MlflowClient

        from biomass.tracking import git_state

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.uri = mlflow.get_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = ablation.baseline.config.tracking.experiment or ablation.name
        try:
            found = self.client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
            tags = {"ablation": ablation.name, "knobs": ", ".join(ablation.knobs), "base": str(ablation.base),
                    "ablation_file": str(ablation.path), "seeds": str(seeds), "runs_dir": str(out_dir),
                    "overrides": " ".join(ablation.overrides)[:5000], "role": "ablation",
                    **git_state(Path(__file__).parent)}
            if ablation.claim:
                tags["mlflow.note.content"] = ablation.claim
            run = self.client.create_run(exp_id, run_name=f"ablation-{ablation.name}", tags=tags)
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(f"variant.{v.name}", ("; ".join(f"{k}: {a} -> {b}" for k, a, b in shown_changes(
                v.changes)) or "(no change)")[:6000]) for v in ablation.variants[1:]]
            for i in range(0, len(params), 90):
                self.client.log_batch(self.run_id, params=params[i:i + 90])
        except Exception as err:  # an unreachable server, a bad URI
            raise BiomassError(f"MLflow tracking at {self.uri}: cannot start the ablation's parent run "
                               f"({' '.join(str(err).split())[:300]})") from None

    def finish(self, rows: list[dict[str, Any]], files: list[Path], status: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for row in rows:
            for col, metric in (("oracle", "weighted_r2"), ("deployable", "weighted_r2_deployable")):
                for prefix, value, std in (("cv", row[col], row[f"{col}_std"]),
                                           ("delta", row[f"delta_{col}"], row[f"delta_{col}_std"])):
                    if prefix == "delta" and row["variant"] == BASELINE:
                        continue
                    if value is not None:
                        metrics.append(Metric(f"{prefix}/{row['variant']}/{metric}", float(value), now, 0))
                    if std is not None:
                        metrics.append(Metric(f"{prefix}/{row['variant']}/{metric}_std", float(std), now, 0))
        metrics.append(Metric("runs/completed", float(sum(r["completed"] for r in rows)), now, 0))
        metrics.append(Metric("runs/failed", float(sum(r["runs"] - r["completed"] for r in rows)), now, 0))
        for i in range(0, len(metrics), 900):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 900])
        for f in files:
            self.client.log_artifact(self.run_id, str(f))
        self.client.set_terminated(self.run_id, status)

    def abort(self, status: str) -> None:
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception:  # noqa: BLE001 - already failing; the run stays RUNNING in the UI at worst
            pass


def run_ablation(ablation: Ablation, seeds: int = 1, runs_dir: Path = Path("runs/ablations"),
                 launch_args: list[str] | None = None) -> list[dict[str, Any]]:
    """Train every variant (x seeds) as its own process; returns the summary rows (also printed and logged)."""
    out_dir = _stamp_dir(runs_dir, ablation.name)
    shutil.copyfile(ablation.path, out_dir / "ablation.yaml")
    (out_dir / "ablation.txt").write_text(describe(ablation, seeds) + "\n")
    parent = Parent(ablation, seeds, out_dir) if ablation.baseline.config.tracking.mlflow else None
    env = dict(os.environ)
    if parent is not None:
        env["MLFLOW_TRACKING_URI"] = parent.uri
    print(f"ablation {ablation.name}: {len(ablation.variants) * seeds} runs -> {out_dir}"
          + (f" (MLflow parent run {parent.run_id} at {parent.uri})" if parent else ""), flush=True)
    results: list[RunResult] = []
    total, done = len(ablation.variants) * seeds, 0
    try:  # the parent run ends KILLED on Ctrl-C, FAILED on any other error of the harness itself
        for k in range(seeds):
            for v in ablation.variants:
                seed = v.config.seed + k
                label = v.name if seeds == 1 else f"{v.name}-seed{seed}"
                result = RunResult(v.name, seed, out_dir / label)
                config_file = write_config(v.config, seed, out_dir / "configs" / f"{label}.yaml")
                tags = {"ablation": ablation.name, "variant": v.name, "seed": str(seed),
                        "base_experiment": str(ablation.base)}
                cmd = child_command(config_file, result.run_dir, launch_args or [],
                                    parent.run_id if parent else None, tags)
                done += 1
                print(f"[{done}/{total}] {label}: training (log {out_dir / 'logs' / label}.out/.err)", flush=True)
                results.append(run_one(result, cmd, out_dir / "logs", env))
                m = result.metrics
                detail = (f"{ORACLE} {m[ORACLE]:.4f}" + (f", {DEPLOYABLE} {m[DEPLOYABLE]:.4f}" if DEPLOYABLE in m
                                                         else "") if result.status == "completed" else result.error)
                print(f"[{done}/{total}] {label}: {result.status} in {_fmt_time(result.duration_s)}: {detail}",
                      flush=True)
        rows = summarise(ablation, results)
        files = write_summary(ablation, rows, results, seeds, out_dir)
        (out_dir / "summary.json").write_text(json.dumps(
            {"ablation": ablation.name, "base": str(ablation.base), "knobs": ablation.knobs, "seeds": seeds,
             "mlflow_parent_run_id": parent.run_id if parent else None, "rows": rows}, indent=1, default=str))
        files.append(out_dir / "summary.json")
        print_table(ablation, rows, seeds)
        if parent is not None:
            parent.finish(rows, [*files, out_dir / "ablation.yaml"],
                          "FINISHED" if any(r.status == "completed" for r in results) else "FAILED")
    except BaseException as err:
        if parent is not None:
            parent.abort("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    print(f"ablation {ablation.name}: {out_dir / 'comparison.md'}", flush=True)
    return rows


def preflight(ablation: Ablation) -> None:
    """What would make every run fail at its first step, found before any trains: a missing data root (unless the
    demo data is generated there; never into a root given on the command line) or backbone weights file."""
    root_from_cli = any(o.split("=", 1)[0] == "data.root" for o in ablation.overrides)
    for v in ablation.variants:
        data = v.config.data
        if not data.root.is_dir() and (data.demo is None or root_from_cli):
            raise ConfigError(f"{ablation.path.name}: variant {v.name!r}: data.root {data.root} does not exist")
        for stage_name in ("main", "aux"):
            stage = getattr(v.config, stage_name)
            weights = stage.model.backbone.get("weights") if stage is not None else None
            if weights and not Path(weights).is_file():
                raise ConfigError(f"{ablation.path.name}: variant {v.name!r}: {stage_name}.model.backbone.weights "
                                  f"{weights} not found")


# ------------------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m biomass.ablate",
        description="Run ablations: every variant of each ablation file (and its unchanged baseline) as its own "
                    "training process, compared in one table and one MLflow parent run per file.",
        epilog="Exit status: 0 every run completed; 1 some run failed (table and parent run still written); "
               "2 bad ablation file, experiment, override, data root or weights file (nothing trained).")
    parser.add_argument("items", nargs="*", metavar="ABLATION.yaml | key=value",
                        help="ablation files, and config overrides for every run (values parsed as YAML)")
    parser.add_argument("--base", type=Path, help="run every variant on this experiment instead of the file's base")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each variant's changes against the base; train nothing")
    parser.add_argument("--seeds", type=int, default=1, help="repeat every run with seed, seed+1, ... (default 1)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/ablations"),
                        help="outputs go to RUNS_DIR/<ablation>/<timestamp>/ (default runs/ablations)")
    parser.add_argument("--launch-args", default="",
                        help='extra `accelerate launch` arguments, one string: --launch-args="--config_file '
                             'accelerate_configs/single_gpu.yaml"')
    args = parser.parse_intermixed_args(argv)
    files = [Path(i) for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if not files:
        parser.error("at least one ablation file is required")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
    try:
        launch_args = shlex.split(args.launch_args)
    except ValueError as err:
        raise ConfigError(f"--launch-args: {err}") from None
    # Resolve every file before anything trains: a bad second file must not surface after hours of the first.
    ablations = [load_ablation(f, args.base, overrides) for f in files]
    names = [a.name for a in ablations]
    if len(set(names)) < len(names):
        raise ConfigError(f"two ablation files share the name {next(n for n in names if names.count(n) > 1)!r}")
    if args.dry_run:
        for a in ablations:
            print(describe(a, args.seeds))
        print("dry run: nothing trained")
        return 0
    for a in ablations:
        preflight(a)
    failed = 0
    for a in ablations:
        rows = run_ablation(a, args.seeds, args.runs_dir, launch_args)
        failed += sum(r["runs"] - r["completed"] for r in rows)
    if failed:
        print(f"{failed} run{'s' if failed > 1 else ''} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
