"""Cross-validated training: `accelerate launch -m biomass.run EXPERIMENT [key=value ...] [--run-dir DIR]`.

Also `python -m biomass.run ...` (one process). `--dry-run` validates the experiment (and the data, when present) and
prints the resolved config. Trains the configured stages (main, then aux) fold by fold into one run directory
(biomass.rundir); the work is biomass.cv.experiment's.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from biomass.config.load import load_experiment
from biomass.errors import ConfigError, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biomass.run", description="Train an experiment with K-fold CV.")
    parser.add_argument("experiment", type=Path, nargs="?", help="experiment YAML (not with --resume)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")
    parser.add_argument("--run-dir", type=Path, help="output directory (default runs/<name>/<timestamp>)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved config; train nothing")
    parser.add_argument("--force", action="store_true", help="write into an existing --run-dir")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    parser.add_argument("--parent-run-id", help="log as a nested MLflow child of this run (used by biomass.ablate)")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="extra MLflow tag")
    args = parser.parse_intermixed_args(argv)
    if args.resume is not None:
        from biomass.cv.experiment import resume_experiment

        resume_experiment(args.resume.resolve())
        return 0
    if args.experiment is None:
        parser.error("an experiment YAML is required")
    if "=" in str(args.experiment):
        raise ConfigError(f"the first argument must be the experiment file, got the override {args.experiment}")
    tags = {}
    for item in args.tag:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--tag {item!r} is not KEY=VALUE")
        tags[key] = value
    exp = load_experiment(args.experiment, args.overrides)
    if args.dry_run:
        from biomass.preflight import dry_run

        print(dry_run(exp))
        return 0
    from biomass.cv.experiment import train_experiment

    train_experiment(exp, run_dir=args.run_dir, force=args.force, parent_run_id=args.parent_run_id, tags=tags)
    return 0


if __name__ == "__main__":
    run_cli(main)
