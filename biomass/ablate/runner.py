"""One child of a sweep: its command (`accelerate launch -m biomass.run CONFIG`), its written config, its result read
back from its run directory; the MLflow parent run of each ablation file; the checks made before anything trains."""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from biomass.ablate.report import RunResult, overall_verdict
from biomass.ablate.spec import BASELINE, ORACLE, Ablation, shown_changes
from biomass.config.load import to_yaml
from biomass.config.schema import ExperimentConfig
from biomass.errors import BiomassError, ConfigError

# ---------------------------------------------------------------------------------------------------------- running
def child_command(config_file: Path, run_dir: Path, launch_args: list[str], parent_run_id: str | None,
                  tags: dict[str, str], resume: bool = False, force: bool = False) -> list[str]:
    """`accelerate launch ... -m biomass.run`: a new run of config_file into run_dir, or (resume) the interrupted run
    in run_dir continued; force: a retry overwrites the failed attempt's outputs."""
    if resume:
        return [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "-m", "biomass.run", "--resume",
                str(run_dir)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "-m", "biomass.run", str(config_file),
           "--run-dir", str(run_dir)] + (["--force"] if force else [])
    if parent_run_id:
        cmd += ["--parent-run-id", parent_run_id]
    for key, value in tags.items():
        cmd += ["--tag", f"{key}={value}"]
    return cmd


def write_config(cfg: ExperimentConfig, seed: int, path: Path) -> Path:
    """The full resolved config, every path absolute, so `python -m biomass.run path` runs exactly it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg.model_copy(update={"seed": seed})))
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


def read_result(result: RunResult, exit_code: int | None, folder: Path) -> RunResult:
    """A finished child's result from its run directory (run.json, metrics.json) and its stderr in `folder`."""
    result.exit_code = exit_code
    err_path = folder / "child.err"
    stderr = err_path.read_text(errors="replace") if err_path.is_file() else ""
    status = _read_json(result.run_dir / "run.json")
    result.mlflow_run_id = status.get("mlflow_run_id")
    metrics = _read_json(result.run_dir / "metrics.json")
    if exit_code == 0 and status.get("status") == "completed" and ORACLE in metrics:
        result.status, result.metrics, result.error = "completed", metrics, None
    else:
        result.status = "failed"
        why = _error_line(stderr) or status.get("error") or "no error message"
        if exit_code == 0:
            why = f"exited 0 without a completed run ({why})"
        result.error = f"exit {exit_code}: {why}"
        (folder / "child.tail").write_text(_tail(stderr) + "\n")
    return result


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -------------------------------------------------------------------------------------------------------- MLflow
class Parent:
    """The ablation's parent MLflow run (a client-side run, so the children run in their own processes), nested under
    the sweep's run. `run_id` continues the parent of a resumed sweep."""

    def __init__(self, client, experiment_id: str, ablation: Ablation, seeds: int, out_dir: Path,
                 sweep_run_id: str | None, run_id: str | None = None):
        from mlflow.entities import Param

        from biomass.tracking import git_state

        self.client = client
        try:
            if run_id:
                self.run_id = run_id
                client.update_run(run_id, status="RUNNING")
                return
            tags = {"ablation": ablation.name, "knobs": ", ".join(ablation.knobs), "base": str(ablation.base),
                    "ablation_file": str(ablation.path), "seeds": str(seeds), "runs_dir": str(out_dir),
                    "overrides": " ".join(ablation.overrides)[:5000], "role": "ablation",
                    "claim_direction": ", ".join(sorted(set(ablation.directions.values()))),
                    **git_state(Path(__file__).parent)}
            if sweep_run_id:
                tags["mlflow.parentRunId"] = sweep_run_id
            if ablation.claim:
                tags["mlflow.note.content"] = ablation.claim
            run = client.create_run(experiment_id, run_name=f"ablation-{ablation.name}", tags=tags)
            self.run_id = run.info.run_id
            params = [Param(f"variant.{v.name}", ("; ".join(f"{k}: {a} -> {b}" for k, a, b in shown_changes(
                v.changes)) or "(no change)")[:6000]) for v in ablation.variants[1:]]
            params += [Param("margin", str(ablation.margin))]
            for i in range(0, len(params), 90):
                client.log_batch(self.run_id, params=params[i:i + 90])
        except Exception as err:  # an unreachable server, a bad URI
            raise BiomassError(f"MLflow tracking at {client.tracking_uri}: cannot start the ablation's parent run "
                               f"({' '.join(str(err).split())[:300]})") from None

    def finish(self, rows: list[dict[str, Any]], files: list[Path], status: str,
               children: dict[str, str] | None = None) -> None:
        """Scores, Δ (mean ± std over seeds; the bootstrap CI as delta/<variant>/ci_lo, ci_hi), a `verdict` tag per
        variant and overall, and tags `child.<variant>.seed<k>` naming each child's MLflow run (a child shared with
        another ablation is nested under only one parent; this tag is how the others find it)."""
        from mlflow.entities import Metric, RunTag

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
            for key in ("ci_lo", "ci_hi"):
                if row.get(key) is not None:
                    metrics.append(Metric(f"delta/{row['variant']}/{key}", float(row[key]), now, 0))
        metrics.append(Metric("runs/completed", float(sum(r["completed"] for r in rows)), now, 0))
        metrics.append(Metric("runs/failed", float(sum(r["runs"] - r["completed"] for r in rows)), now, 0))
        for i in range(0, len(metrics), 900):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 900])
        tags = [RunTag(f"verdict.{r['variant']}", r["verdict"]) for r in rows if r.get("verdict")]
        tags.append(RunTag("verdict", overall_verdict(rows)))
        tags += [RunTag(f"child.{label}", run_id) for label, run_id in (children or {}).items() if run_id]
        for i in range(0, len(tags), 90):
            self.client.log_batch(self.run_id, tags=tags[i:i + 90])
        for f in files:
            self.client.log_artifact(self.run_id, str(f))
        self.client.set_terminated(self.run_id, status)

    def abort(self, status: str) -> None:
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception:  # noqa: BLE001 - already failing; the run stays RUNNING in the UI at worst
            pass


def preflight(ablation: Ablation) -> None:
    from biomass.weights import weights_file

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
            if weights and not weights_file(weights).is_file():
                raise ConfigError(f"{ablation.path.name}: variant {v.name!r}: {stage_name}.model.backbone.weights "
                                  f"{weights} not found")
