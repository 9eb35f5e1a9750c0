"""`python -m biomass.ablate ABLATION.yaml [...] [--base EXP] [--dry-run] [--seeds N] [--executor local|ray]
[--parallel N] [--resume SWEEP_DIR] [key=value ...]` runs a sweep; `python -m biomass.ablate report SWEEP_DIR` writes
its graveyard report again.

Exit status: 0 when every run completed; 1 when any run failed (the tables and the parent runs are still written);
2 for a bad ablation file, experiment, override or option, or a missing data root or weights file (one line, nothing
trained: every file and variant is checked before the first run starts).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from biomass.ablate.spec import describe, load_ablation
from biomass.ablate.sweep import SweepOptions, report, run_sweep
from biomass.errors import ConfigError, run_cli


def report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m biomass.ablate report",
                                     description="Write SWEEP_DIR/graveyard.md and graveyard.png from its ablations.")
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    for path in report(args.sweep_dir):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m biomass.ablate",
        description="Run ablations as one sweep: every variant of each ablation file (and its unchanged baseline) "
                    "as its own training process, identical runs trained once, compared with bootstrap CIs and "
                    "verdicts in one table and one MLflow parent run per file. `report SWEEP_DIR`: the graveyard "
                    "report again.",
        epilog="Exit status: 0 every run completed; 1 some run failed (tables and parent runs still written); "
               "2 bad ablation file, experiment, override, option, data root or weights file (nothing trained).")
    parser.add_argument("items", nargs="*", metavar="ABLATION.yaml | key=value",
                        help="ablation files, and config overrides for every run (values parsed as YAML)")
    parser.add_argument("--base", type=Path, help="run every variant on this experiment instead of the file's base")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each variant's changes against the base; train nothing")
    parser.add_argument("--seeds", type=int, default=1,
                        help="repeat every run with seed, seed+1, ... paired across variants (default 1)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/ablations"),
                        help="the sweep goes to RUNS_DIR/<timestamp>/ (default runs/ablations)")
    parser.add_argument("--launch-args", default="",
                        help='extra `accelerate launch` arguments, one string: --launch-args="--config_file '
                             'accelerate_configs/single_gpu.yaml"')
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="local: child processes on this machine; ray: Ray tasks (pip install -e \".[ray]\")")
    parser.add_argument("--parallel", type=int, default=1, help="children running at once (default 1)")
    parser.add_argument("--child-gpus", type=int, help="GPUs per child (default: the GPUs split evenly)")
    parser.add_argument("--child-cpus", type=int, help="CPU threads per child (default: the cores split evenly)")
    parser.add_argument("--address", help="ray: join this cluster (auto or host:port); default a local Ray")
    parser.add_argument("--resume", type=Path, metavar="SWEEP_DIR",
                        help="continue a sweep: completed runs reused, interrupted ones resumed, failed ones retried")
    args = parser.parse_intermixed_args(argv)
    files = [Path(i) for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if args.resume is not None and (files or overrides or args.base):
        raise ConfigError("--resume SWEEP_DIR repeats the sweep's own files, base and overrides; give none")
    if not files and args.resume is None:
        parser.error("at least one ablation file is required")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
    for flag in ("child_gpus", "child_cpus"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "child_gpus" else 1):
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least {0 if flag == 'child_gpus' else 1}")
    try:
        launch_args = shlex.split(args.launch_args)
    except ValueError as err:
        raise ConfigError(f"--launch-args: {err}") from None
    if args.dry_run:
        # Resolve every file before printing: a bad second file must not surface after the first's listing.
        ablations = [load_ablation(f, args.base, overrides) for f in files]
        for a in ablations:
            print(describe(a, args.seeds))
        print("dry run: nothing trained")
        return 0
    options = SweepOptions(args.executor, args.parallel, args.child_gpus, args.child_cpus, args.address, launch_args)
    failed = run_sweep(files, args.base, overrides, args.seeds, args.runs_dir, options, args.resume)
    if failed:
        print(f"{failed} run{'s' if failed > 1 else ''} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
