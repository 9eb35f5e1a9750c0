"""`python -m biomass.baselines DATA_DIR --out submission.csv [--method colour_ridge|linear_probe]`: a baseline's
submission (the linear probe uses `--experiment`'s main-stage backbone, frozen)."""
from __future__ import annotations

import argparse
from pathlib import Path

from biomass.baselines import fit_predict
from biomass.baselines.probe import fit_predict_probe
from biomass.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biomass.baselines", description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, default=Path("baseline_submission.csv"))
    parser.add_argument("--method", choices=["colour_ridge", "linear_probe"], default="colour_ridge")
    parser.add_argument("--experiment", type=Path, help="linear_probe: the experiment whose backbone it probes")
    args = parser.parse_args(argv)
    if args.method == "linear_probe" and args.experiment is None:
        parser.error("--method linear_probe needs --experiment (e.g. experiments/demo.yaml)")
    if args.method == "linear_probe":
        sub = fit_predict_probe(args.experiment, args.data)
    else:
        sub = fit_predict(args.data)
    sub.to_csv(args.out, index=False, float_format="%.6f")
    print(f"{args.method} -> {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
