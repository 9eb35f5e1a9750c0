"""`python -m biomass.ablate ABLATION.yaml [...] [--base EXP] [--dry-run] [--seeds N] [key=value ...]`.

Exit status: 0 when every run completed; 1 when any run failed (the table and the parent run are still written);
2 for a bad ablation file, experiment or override, or a missing data root or weights file (one line, nothing
trained: every file and variant is checked before the first run starts).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from biomass.ablate.runner import preflight, run_ablation
from biomass.ablate.spec import describe, load_ablation
from biomass.errors import ConfigError, run_cli


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
