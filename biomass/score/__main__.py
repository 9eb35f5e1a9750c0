"""`python -m biomass.score SOLUTION.csv SUBMISSION.csv [--json]`: the competition metric of a submission."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from biomass.errors import run_cli
from biomass.score import score_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biomass.score", description=__doc__.splitlines()[0])
    parser.add_argument("solution", type=Path)
    parser.add_argument("submission", type=Path)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = score_files(args.solution, args.submission)
    if args.json:
        print(json.dumps(result))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{args.submission.name} vs {args.solution.name} ({result['rows']} rows)")
        table.add_column("metric")
        table.add_column("R²", justify="right")
        table.add_row("weighted R² (competition)", f"{result['weighted_r2']:.5f}")
        for name, value in result["per_target"].items():
            table.add_row(name, f"{value:.5f}")
        Console().print(table)
    return 0


if __name__ == "__main__":
    run_cli(main)
