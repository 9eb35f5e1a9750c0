"""`python -m biomass.baselines DATA_DIR --out submission.csv`: the colour-histogram ridge's submission."""
from __future__ import annotations

import argparse
from pathlib import Path

from biomass.baselines import fit_predict
from biomass.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biomass.baselines", description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, default=Path("baseline_submission.csv"))
    args = parser.parse_args(argv)
    fit_predict(args.data).to_csv(args.out, index=False, float_format="%.6f")
    print(f"colour-histogram ridge -> {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
