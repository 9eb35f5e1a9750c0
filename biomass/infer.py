"""Write a Kaggle submission: `accelerate launch -m biomass.infer RUN_DIR --data DATA_DIR [--out submission.csv]`.

Also `python -m biomass.infer ...`. For every test image, the chain of the run (biomass.chain): the aux folds predict
NDVI and Height; each main fold predicts biomass with TTA; the folds blend with `infer.fold_weights`; post-processing.
Fold models are loaded one at a time; each test image is decoded once. See biomass.submission.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from biomass.errors import run_cli
from biomass.submission import write_submission


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biomass.infer", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="folder with test.csv and test/ (Kaggle layout)")
    parser.add_argument("--out", type=Path, default=Path("submission.csv"))
    parser.add_argument("--batch-size", type=int, help="default: the config's infer.batch_size")
    parser.add_argument("--crops", type=Path, help="crop boxes CSV (default: data.crops in --data); where --data is "
                        "read-only (Kaggle), write it elsewhere with `python -m biomass.crops detect DATA --out FILE`")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    write_submission(args.run_dir.resolve(), args.data.resolve(), args.out, args.batch_size, crops=args.crops)
    return 0


if __name__ == "__main__":
    run_cli(main)
