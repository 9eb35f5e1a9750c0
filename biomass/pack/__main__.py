"""Bundle a run for an offline notebook: `python -m biomass.pack RUN_DIR --out DIR [--image kaggle|gpu] [--bf16]`.

Writes one folder to upload as one Kaggle dataset: the run directory, a wheel of biomass, the wheels the image lacks
(biomass.pack.wheels: the same lists `bench wheelhouse` uses) and submission.ipynb, which installs them with
`pip --no-index`, prints the device, runs the chain on the competition's test images and writes submission.csv.
Needs the package registry (pip download) where it runs; the notebook needs none. See biomass.pack.bundle.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from biomass.errors import run_cli
from biomass.pack.bundle import pack
from biomass.pack.wheels import IMAGES, MiB, image_named


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biomass.pack", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a completed run directory")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the bundle")
    parser.add_argument("--image", default="kaggle", choices=sorted(IMAGES), help="the target image (default kaggle)")
    parser.add_argument("--bf16", action="store_true", help="fold checkpoints' matrices in bfloat16: half the upload")
    parser.add_argument("--python-version", help="the wheels' Python, e.g. 3.12 (default: the image's)")
    parser.add_argument("--data", default="/kaggle/input/csiro-biomass",
                        help="the notebook's default competition data folder (a parameter there)")
    args = parser.parse_args(argv)
    image = image_named(args.image)
    out = pack(args.run_dir, args.out, image, args.bf16, args.python_version, args.data)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / MiB
    print(f"bundle for the {image.name} image: {out} ({size:.1f} MiB). Upload the folder as one Kaggle dataset, "
          f"attach it and the competition data to a notebook, import {out / 'submission.ipynb'} and run all.")
    return 0


if __name__ == "__main__":
    run_cli(main)
