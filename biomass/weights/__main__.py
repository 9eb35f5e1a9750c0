"""`python -m biomass.weights {import,check,packaged}`: backbone weights files, offline.

- `import SRC --model NAME --out FILE.safetensors [--map timm|positional]`: convert a weights file to timm's naming
  for NAME (SRC may be `packaged:NAME`, a file a pip package ships), with its provenance in the metadata.
- `check FILE --model NAME`: load FILE into timm's NAME and say what matched.
- `packaged`: the packaged weights this project knows, and where each one's converted file is cached.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from biomass.errors import ConfigError, run_cli
from biomass.weights import MAPPINGS, PACKAGED, PACKAGED_PREFIX, cache_dir, check_file, import_weights, packaged, \
    packaged_source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biomass.weights", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("import", help="convert a weights file to timm's naming, as safetensors")
    p.add_argument("src", help="a weights file, or packaged:NAME")
    p.add_argument("--model", help="timm model name (default for packaged: its own)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--map", choices=MAPPINGS, help="timm: names (and timm's converter for the architecture); "
                                                  "positional: pair tensors in order, every shape checked")
    p = sub.add_parser("check", help="load a weights file into a timm model and say what matched")
    p.add_argument("file", type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--json", action="store_true")
    sub.add_parser("packaged", help="the packaged weights this project knows")
    args = parser.parse_args(argv)

    if args.cmd == "import":
        if args.src.startswith(PACKAGED_PREFIX):
            entry = packaged(args.src[len(PACKAGED_PREFIX):])
            src, sha, model, mapping = packaged_source(entry), entry.sha256, args.model or entry.model, \
                args.map or entry.mapping
        else:
            if not args.model:
                raise ConfigError("--model: which timm model the file is for")
            src, sha, model, mapping = Path(args.src), None, args.model, args.map or "timm"
        out = import_weights(src, model, args.out, mapping, sha256=sha)
        print(f"{src} -> {out} ({model}, {mapping} mapping)")
    elif args.cmd == "check":
        report = check_file(args.file, args.model)
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            print(f"{args.file}: {report['matched']} of {report['model_tensors']} tensors of {args.model} matched; "
                  f"{report['missing']} missing, {report['unexpected']} unexpected, {report['mismatched']} "
                  f"shape-mismatched")
            for k, v in report["metadata"].items():
                print(f"  {k}: {v}")
        return 0 if report["complete"] else 1
    else:
        for name, entry in PACKAGED.items():
            print(f"{PACKAGED_PREFIX}{name}: {entry.source}; pip install {entry.distribution}; timm "
                  f"{entry.model}; cached as {cache_dir() / f'{name}-{entry.sha256[:12]}.safetensors'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
