"""Running an ablation: one `accelerate launch -m biomass.run` process per variant and seed, a nested MLflow child
of one parent run per ablation file; a crashed variant is recorded as failed and the others go on."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from biomass.ablate.report import RunResult, fmt_time, print_table, summarise, write_summary
from biomass.ablate.spec import BASELINE, DEPLOYABLE, ORACLE, Ablation, describe, shown_changes
from biomass.config.load import to_yaml
from biomass.config.schema import ExperimentConfig
from biomass.errors import BiomassError, ConfigError
from biomass.places import require_writable
from biomass.rundir import stamped_dir

# ---------------------------------------------------------------------------------------------------------- running
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


# -------------------------------------------------------------------------------------------------------- MLflow
class Parent:
    """The ablation's parent MLflow run (a client-side run, so the children run in their own processes)."""

    def __init__(self, ablation: Ablation, seeds: int, out_dir: Path):
        import logging

        import mlflow
        from mlflow.tracking import MlflowClient

        from biomass.tracking import git_state, store_lock

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.uri = mlflow.get_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = ablation.baseline.config.tracking.experiment or ablation.name
        try:
            with store_lock(self.uri):  # the store is created on first use: one process at a time
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
    require_writable(runs_dir, "--runs-dir")
    if ablation.baseline.config.tracking.mlflow:
        from biomass.tracking import check_store, tracking_uri

        check_store(tracking_uri())
    out_dir = stamped_dir(runs_dir / ablation.name)
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
                print(f"[{done}/{total}] {label}: {result.status} in {fmt_time(result.duration_s)}: {detail}",
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
