"""Cardboard-border crop boxes: `python -m biomass.crops detect DATA_ROOT` and `python -m biomass.crops score ...`.

detect: finds the pasture box inside any cardboard border of every image listed in DATA_ROOT/train.csv and
test.csv (with neither, every *.jpg under train/ and test/) and writes crops.csv (image_path,x0,y0,x1,y1; x1/y1
exclusive), the file `data.crops` can name. score: compares such a file with true boxes. The logic lives in
biomass.data.cardboard (see docs/CARDBOARD.md); this module only parses arguments.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from biomass.data.cardboard import score_files, write_crops
from biomass.errors import run_cli


def _detect(args: argparse.Namespace) -> int:
    done = write_crops(args.data_root, out=args.out, preview_dir=args.preview, force=args.force, workers=args.workers,
                       allow_outside_root=args.allow_outside_root)
    preview = f"; preview {done['preview']}" if done["preview"] else ""
    print(f"{done['images']} images, cardboard border found in {done['bordered']} -> {done['out']}{preview}")
    return 0


def _score(args: argparse.Namespace) -> int:
    scores = score_files(args.data_root, args.pred, args.truth)
    if args.json:
        print(json.dumps(scores, sort_keys=True))
        return 0
    for group, s in scores.items():
        print(f"{group:>10}: {s['images']:5d} images  mean IoU {s['mean_iou']:.4f}  "
              f"IoU >= 0.9 {100 * s['share_iou_ge_0.9']:.1f}%")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from biomass.data.cardboard_eval import evaluate, markdown

    summary = evaluate(args.n, args.seed, args.width, args.height, workers=args.workers, keep=args.keep)
    print(json.dumps(summary, sort_keys=True, default=str) if args.json else markdown(summary))
    return 0 if all(summary["met"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biomass.crops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    det = sub.add_parser("detect", help="detect crop boxes and write crops.csv")
    det.add_argument("data_root", type=Path, help="dataset folder in Kaggle's layout")
    det.add_argument("--out", type=Path, help="output CSV (default DATA_ROOT/crops.csv)")
    det.add_argument("--preview", type=Path, metavar="DIR", help="also write DIR/crops_preview.png")
    det.add_argument("--force", action="store_true", help="overwrite an existing output file")
    det.add_argument("--workers", type=int, help="decoding threads (default: CPU count, at most 8)")
    det.add_argument("--allow-outside-root", action="store_true",
                     help="let train.csv/test.csv name images outside DATA_ROOT (as data.allow_outside_root)")
    det.set_defaults(func=_detect)
    sco = sub.add_parser("score", help="compare predicted crop boxes with true ones")
    sco.add_argument("data_root", type=Path, help="dataset folder (image sizes are read from its images)")
    sco.add_argument("--pred", type=Path, required=True, help="predicted crops CSV")
    sco.add_argument("--truth", type=Path, help="true crops CSV (default DATA_ROOT/crops.csv)")
    sco.add_argument("--json", action="store_true", help="print one JSON object")
    sco.set_defaults(func=_score)
    ev = sub.add_parser("evaluate", help="the detector on rendered borders of every kind (docs/CARDBOARD.md)")
    ev.add_argument("--n", type=int, default=300, help="photos to render (default 300)")
    ev.add_argument("--seed", type=int, default=2026)
    ev.add_argument("--width", type=int, default=2000)
    ev.add_argument("--height", type=int, default=1000)
    ev.add_argument("--workers", type=int, help="detection threads")
    ev.add_argument("--keep", type=Path, metavar="DIR", help="keep the photos, truth.csv and pred.csv in DIR")
    ev.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    ev.set_defaults(func=_evaluate)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    run_cli(main)
