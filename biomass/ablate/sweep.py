"""A sweep: every ablation file's variants x seeds, each distinct training run once, on an executor; tables, CIs and
verdicts per ablation; one graveyard report; MLflow runs nested sweep -> ablation -> child.

(Just over 350 lines: planning, running, resuming and the MLflow nesting of one sweep share its state and read best
together; the executors, the tracking server and the statistics live in their own modules.)

    SWEEP_DIR/sweep.json              what was asked (files, base, overrides, seeds, launch args) and the MLflow ids
    SWEEP_DIR/children/<key>/         config.yaml, run/ (the run directory), child.out/.err/.cmd, attempts.json
    SWEEP_DIR/<ablation>/             ablation.yaml, ablation.txt, comparison.csv/.md, runs.csv, deltas.png, summary.json
    SWEEP_DIR/graveyard.md, .png

A child's key is a hash of its full resolved config with its seed (to_yaml), so a run that two ablation files share
(the same baseline) trains once and both read it. `--resume SWEEP_DIR` reuses completed children, continues
interrupted ones (`biomass.run --resume`) and retries failed ones (at most MAX_RETRIES more times); the tables are
computed from the children's run directories only, so a resumed sweep ends with the table of one never killed.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from biomass.ablate.executors import ChildJob, Outcome, make_executor, stop_leftover
from biomass.ablate.report import (RunResult, overall_verdict, add_intervals, fmt_time, print_table, summarise, write_graveyard,
                                   write_summary)
from biomass.ablate.runner import child_command, read_result
from biomass.ablate.spec import BASELINE, DEPLOYABLE, ORACLE, Ablation, describe, load_ablation, shown_changes
from biomass.config.load import Experiment, to_yaml
from biomass.config.schema import ExperimentConfig
from biomass.errors import BiomassError, ConfigError, sigterm_interrupts
from biomass.places import read_json_or, require_writable, write_json
from biomass.rundir import CONFIG, METRICS, STATUS, stamped_dir
from biomass.tracking import check_store, tracking_uri
from biomass.tracking.runs import ParentRecord, SweepRuns
from biomass.tracking.server import UI_PORT, is_http

SWEEP_FILE = "sweep.json"
CHILDREN = "children"
ATTEMPTS = "attempts.json"
MAX_RETRIES = 2  # a failed child is retried at most this many times over the resumes of a sweep
MULTI_EXPERIMENT = "sweep"  # the MLflow experiment of a sweep over several ablation files (unless overridden)


@dataclass
class Child:
    key: str
    config: ExperimentConfig       # the seed set
    folder: Path                   # SWEEP_DIR/children/<key>
    uses: list[tuple[str, str, int]] = field(default_factory=list)  # (ablation, variant, seed)

    @property
    def run_dir(self) -> Path:
        return self.folder / "run"

    @property
    def label(self) -> str:
        return ", ".join(f"{a}/{v}/seed{s}" for a, v, s in self.uses[:3]) + (
            f" (+{len(self.uses) - 3})" if len(self.uses) > 3 else "")


@dataclass
class SweepOptions:
    executor: str = "local"
    parallel: int = 1
    child_gpus: int | None = None
    child_cpus: int | None = None
    address: str | None = None
    launch_args: list[str] = field(default_factory=list)


def child_key(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def sweep_experiment(ablations: list[Ablation]) -> str:
    """One MLflow experiment per sweep, so that its runs nest and identical children hash alike: the ablation's own
    (or an overridden `tracking.experiment`) when they all agree, else `sweep`."""
    names = {a.baseline.config.tracking.experiment for a in ablations}
    return names.pop() if len(names) == 1 else MULTI_EXPERIMENT


def plan(ablations: list[Ablation], seeds: int, experiment: str, sweep_dir: Path
         ) -> tuple[dict[str, Child], dict[str, dict[tuple[str, int], str]]]:
    """The distinct children (by key, in first-use order) and, per ablation, (variant, seed) -> key. Seed k of every
    variant is the baseline's seed k, so Δ pairs by seed."""
    children: dict[str, Child] = {}
    uses: dict[str, dict[tuple[str, int], str]] = {}
    for k in range(seeds):
        for a in ablations:
            for v in a.variants:
                seed = v.config.seed + k
                tracking = v.config.tracking.model_copy(update={"experiment": experiment})
                cfg = v.config.model_copy(update={"seed": seed, "tracking": tracking})
                key = child_key(cfg)
                child = children.setdefault(key, Child(key, cfg, sweep_dir / CHILDREN / key))
                child.uses.append((a.name, v.name, seed))
                uses.setdefault(a.name, {})[(v.name, seed)] = key
    return children, uses


def child_state(child: Child) -> str:
    """completed | interrupted (resume it) | failed | new, from its run directory alone."""
    status = read_json_or(child.run_dir / STATUS, {})
    metrics = read_json_or(child.run_dir / METRICS, {})
    if status.get("status") == "completed" and ORACLE in metrics:
        return "completed"
    if status.get("status") in ("running", "killed") and (child.run_dir / CONFIG).is_file():
        return "interrupted"
    return "failed" if status.get("status") == "failed" else "new"


# --------------------------------------------------------------------------------------------------------- sweep
def _save(sweep_dir: Path, saved: dict[str, Any]) -> None:
    write_json(sweep_dir / SWEEP_FILE, saved, indent=1)


def check_multi_node(options: SweepOptions, mlflow_on: bool) -> None:
    """Children on other machines need a tracking server they can reach (and the runs dir on shared storage)."""
    if options.executor != "ray" or not options.address or not mlflow_on:
        return
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not is_http(uri):
        raise ConfigError(f"--executor ray --address {options.address}: children on other machines cannot write to "
                          f"the local MLflow store {uri}; start an `mlflow server` every node can reach and set "
                          "MLFLOW_TRACKING_URI=http://HOST:PORT (and put --runs-dir on storage every node shares)")


def load_request(sweep_dir: Path) -> dict[str, Any]:
    """What `--resume SWEEP_DIR` repeats: the files, base, overrides, seeds and launch args of the first start."""
    saved = read_json_or(Path(sweep_dir) / SWEEP_FILE)
    if not isinstance(saved, dict) or "files" not in saved:
        raise BiomassError(f"--resume {sweep_dir}: no readable {SWEEP_FILE}; not a sweep directory")
    return saved


def run_sweep(files: list[Path], base: Path | None, overrides: list[str], seeds: int = 1,
              runs_dir: Path = Path("runs/ablations"), options: SweepOptions | None = None,
              resume: Path | None = None) -> int:
    """Run (or resume) a sweep; returns the number of failed children (after retries)."""
    options = options or SweepOptions()
    if options.parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {options.parallel}")
    if resume is not None:
        sweep_dir = Path(resume).resolve()
        saved = load_request(sweep_dir)
        files, overrides, seeds = [Path(f) for f in saved["files"]], saved["overrides"], saved["seeds"]
        base = Path(saved["base"]) if saved.get("base") else None
        options.launch_args = options.launch_args or saved.get("launch_args", [])
    else:
        saved = {}
    ablations = [load_ablation(f, base, overrides) for f in files]
    names = [a.name for a in ablations]
    if len(set(names)) < len(names):
        raise ConfigError(f"two ablation files share the name {next(n for n in names if names.count(n) > 1)!r}")
    from biomass.ablate.runner import preflight

    for a in ablations:
        preflight(a)
    mlflow_on = any(a.baseline.config.tracking.mlflow for a in ablations)
    check_multi_node(options, mlflow_on)
    from biomass.data.source import ensure_demo_data

    for a in ablations:  # here, once: children starting together would generate the demo data over each other
        for v in a.variants:
            ensure_demo_data(Experiment(v.config, a.base, tuple(a.overrides)))
    if resume is None:
        require_writable(runs_dir, "--runs-dir")
        if mlflow_on:
            check_store(tracking_uri())
        sweep_dir = stamped_dir(runs_dir)
        saved = {"files": [str(f.resolve()) for f in files], "base": str(base.resolve()) if base else None,
                 "overrides": list(overrides), "seeds": seeds, "launch_args": options.launch_args,
                 "ablations": names, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    experiment = sweep_experiment(ablations)
    children, uses = plan(ablations, seeds, experiment, sweep_dir)
    for a in ablations:
        out = sweep_dir / a.name
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(a.path, out / "ablation.yaml")
        (out / "ablation.txt").write_text(describe(a, seeds) + "\n")

    with sigterm_interrupts():  # a SIGTERM stops the children, Ray and the server as Ctrl-C does
        executor = make_executor(options.executor, options.parallel, options.child_gpus, options.child_cpus,
                                 options.address)
        tracking = None
        try:
            if mlflow_on:
                tracking = SweepRuns([parent_record(a, seeds, sweep_dir / a.name) for a in ablations], seeds,
                                     sweep_dir, options.parallel, options.executor, experiment, saved)
            _save(sweep_dir, saved)
            shared = sum(len(c.uses) for c in children.values()) - len(children)
            print(f"sweep {sweep_dir}: {len(ablations)} ablation(s), {len(children)} distinct runs"
                  + (f" ({shared} shared)" if shared else "") + f", executor {options.executor} x{options.parallel}"
                  + (f", MLflow {tracking.uri}" if tracking else ""), flush=True)
            results = _run_children(children, ablations, tracking, options, executor, resume is not None)
            failed = 0
            for a in ablations:
                failed += _finish_ablation(a, seeds, uses[a.name], children, results, sweep_dir, tracking)
            files = write_graveyard(sweep_dir, names)
            print(f"graveyard report: {files[0]}", flush=True)
            if tracking is not None:
                links = tracking.finish(files, "FINISHED" if any(r.status == "completed" for r in results.values())
                                        else "FAILED")
                saved["links"] = links
                _save(sweep_dir, saved)
                where = ("" if is_http(tracking.store_uri) else
                         f" (after `mlflow ui --backend-store-uri {tracking.store_uri} --port {UI_PORT}`)")
                print(f"MLflow runs{where}: {links['runs']}\nMLflow compare the ablation parents: {links['compare']}",
                      flush=True)
        except BaseException as err:
            if tracking is not None:
                tracking.abort("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            if tracking is not None:
                tracking.close()
            executor.close()
    return failed


def _run_children(children: dict[str, Child], ablations: list[Ablation], tracking: SweepRuns | None,
                  options: SweepOptions, executor, resuming: bool) -> dict[str, RunResult]:
    first_parent = {}  # child key -> the parent it nests under (its first use)
    results: dict[str, RunResult] = {}
    jobs: list[ChildJob] = []
    env = {"MLFLOW_TRACKING_URI": tracking.uri} if tracking else {}
    for key, child in children.items():
        a_name, v_name, seed = child.uses[0]
        result = RunResult(v_name, seed, child.run_dir)
        attempts = read_json_or(child.folder / ATTEMPTS) or []
        state = child_state(child) if resuming else "new"
        if state == "interrupted" or (resuming and (child.folder / "child.pid").is_file()):
            stop_leftover(child.folder)  # a killed sweep's child may still run: stop it before continuing its run
            state = child_state(child)
        if state == "completed":
            results[key] = read_result(result, 0, child.folder)
            results[key].duration_s = sum(a.get("duration_s", 0.0) for a in attempts)
            continue
        # "new" with attempts: every attempt stopped before its run directory existed (a config error)
        if state in ("failed", "new") and len(attempts) > MAX_RETRIES:
            results[key] = read_result(result, attempts[-1].get("exit_code"), child.folder)
            continue
        child.folder.mkdir(parents=True, exist_ok=True)
        config_file = child.folder / "config.yaml"
        config_file.write_text(to_yaml(child.config))
        tags = {"ablation": a_name, "variant": v_name, "seed": str(seed), "child_key": key,
                "used_by": "; ".join(f"{a}/{v}" for a, v, _ in child.uses)[:5000]}
        parent_id = tracking.parents[a_name].run_id if tracking else None
        cmd = child_command(config_file, child.run_dir, options.launch_args, parent_id, tags,
                            resume=state == "interrupted", force=state in ("failed", "new") and child.run_dir.exists())
        first_parent[key] = parent_id
        results[key] = result
        jobs.append(ChildJob(key, cmd, env, child.folder))
    reused = len(children) - len(jobs)
    total, done = len(jobs), 0
    if reused:
        print(f"{reused} run(s) already completed or out of retries: reused", flush=True)

    def on_done(job: ChildJob, outcome: Outcome) -> None:
        nonlocal done
        done += 1
        child, result = children[job.key], results[job.key]
        read_result(result, outcome.exit_code, child.folder)
        attempts = read_json_or(child.folder / ATTEMPTS) or []
        result.duration_s = sum(a.get("duration_s", 0.0) for a in attempts) + (outcome.ended - outcome.spawned)
        attempts.append({"exit_code": outcome.exit_code, "status": result.status, "error": result.error,
                         "duration_s": round(outcome.ended - outcome.spawned, 2),
                         "queued_s": round(outcome.spawned - outcome.submitted, 3), "submitted": outcome.submitted,
                         "spawned": outcome.spawned, "where": outcome.where,
                         "resumed": "--resume" in job.cmd})
        (child.folder / ATTEMPTS).write_text(json.dumps(attempts, indent=1))
        m = result.metrics
        detail = (f"{ORACLE} {m[ORACLE]:.4f}" + (f", {DEPLOYABLE} {m[DEPLOYABLE]:.4f}" if DEPLOYABLE in m else "")
                  if result.status == "completed" else result.error)
        print(f"[{done}/{total}] {child.label}: {result.status} in {fmt_time(outcome.ended - outcome.spawned)}: "
              f"{detail} ({child.folder})", flush=True)

    for job in jobs:
        print(f"queued {children[job.key].label} ({job.folder})", flush=True)
    executor.run(jobs, on_done)
    return results


def parent_record(ablation: Ablation, seeds: int, out_dir: Path) -> ParentRecord:
    """The ablation as its MLflow parent run shows it: file, knobs, claim (the run's note) and each variant's changes."""
    tags = {"ablation": ablation.name, "knobs": ", ".join(ablation.knobs), "base": str(ablation.base),
            "ablation_file": str(ablation.path), "seeds": str(seeds), "runs_dir": str(out_dir),
            "overrides": " ".join(ablation.overrides)[:5000],
            "claim_direction": ", ".join(sorted(set(ablation.directions.values())))}
    if ablation.claim:
        tags["mlflow.note.content"] = ablation.claim
    params = {f"variant.{v.name}": "; ".join(f"{k}: {a} -> {b}" for k, a, b in shown_changes(v.changes))
              or "(no change)" for v in ablation.variants[1:]}
    return ParentRecord(ablation.name, tags, {**params, "margin": str(ablation.margin)}, BASELINE)


def _finish_ablation(ablation: Ablation, seeds: int, uses: dict[tuple[str, int], str], children: dict[str, Child],
                     results: dict[str, RunResult], sweep_dir: Path, tracking: SweepRuns | None) -> int:
    out = sweep_dir / ablation.name
    runs = []
    for (variant, seed), key in uses.items():
        r = results[key]
        runs.append(RunResult(variant, seed, r.run_dir, r.status, r.exit_code, r.duration_s, r.metrics, r.error,
                              r.mlflow_run_id))
    rows = add_intervals(ablation, summarise(ablation, runs), runs)
    files = write_summary(ablation, rows, runs, seeds, out)
    links = {(f"{r.variant}.seed{r.seed}"): r.mlflow_run_id for r in runs}
    (out / "summary.json").write_text(json.dumps(
        {"ablation": ablation.name, "claim": ablation.claim, "claim_direction": ablation.directions,
         "margin": ablation.margin, "base": str(ablation.base), "knobs": ablation.knobs, "seeds": seeds,
         "children": {f"{v}.seed{s}": k for (v, s), k in uses.items()}, "mlflow_children": links,
         "mlflow_parent_run_id": tracking.parents[ablation.name].run_id if tracking else None, "rows": rows},
        indent=1, default=str))
    files.append(out / "summary.json")
    print_table(ablation, rows, seeds)
    if tracking is not None:
        tracking.parents[ablation.name].finish(rows, overall_verdict(rows), [*files, out / "ablation.yaml"],
                                               "FINISHED" if any(r.status == "completed" for r in runs) else "FAILED",
                                               links)
    print(f"ablation {ablation.name}: {out / 'comparison.md'}", flush=True)
    return sum(r.status != "completed" for r in runs)


def report(sweep_dir: Path) -> list[Path]:
    """`python -m biomass.ablate report SWEEP_DIR`: the graveyard report from the ablations' summaries."""
    sweep_dir = Path(sweep_dir).resolve()
    return write_graveyard(sweep_dir, load_request(sweep_dir).get("ablations", []))

