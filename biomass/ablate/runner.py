"""One child of a sweep: its command (`accelerate launch -m biomass.run CONFIG`), its result read back from its run
directory; the checks made before anything trains. (The MLflow runs of a sweep: biomass.tracking.runs.)"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from biomass.ablate.report import RunResult
from biomass.ablate.spec import ORACLE, Ablation
from biomass.errors import ConfigError
from biomass.places import read_json_or
from biomass.rundir import METRICS, STATUS

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
    status = read_json_or(result.run_dir / STATUS, {})
    result.mlflow_run_id = status.get("mlflow_run_id")
    metrics = read_json_or(result.run_dir / METRICS, {})
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


def preflight(ablation: Ablation) -> None:
    """What would make every run fail at its first step, found before any trains (biomass.preflight.check_inputs for
    each variant)."""
    from biomass.preflight import check_inputs

    root_from_cli = any(o.split("=", 1)[0] == "data.root" for o in ablation.overrides)
    for v in ablation.variants:
        try:
            check_inputs(v.config, root_from_cli)
        except ConfigError as err:
            raise ConfigError(f"{ablation.path.name}: variant {v.name!r}: {err}") from None
