"""`python -m biomass.data.synthetic OUT_DIR [options]`: render the synthetic dataset (see biomass.data.synthetic)."""
from __future__ import annotations

import argparse
from pathlib import Path

from biomass.data.synthetic import generate
from biomass.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biomass.data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="new or empty directory to write the dataset to")
    parser.add_argument("--n-train", type=int, default=24, help="training images (default 24)")
    parser.add_argument("--n-test", type=int, default=8, help="test images (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--width", type=int, default=2000, help="image width in pixels (default 2000, as Kaggle)")
    parser.add_argument("--height", type=int, default=1000, help="image height in pixels (default 1000, as Kaggle)")
    args = parser.parse_args(argv)
    out = generate(args.out_dir, n_train=args.n_train, n_test=args.n_test, seed=args.seed, width=args.width,
                   height=args.height)
    print(f"wrote {args.n_train} train + {args.n_test} test synthetic images ({args.width}x{args.height}) to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
