"""submission.ipynb of a Kaggle bundle: offline install from the bundle's wheels, the device, the chain, the CSV.

Written as plain nbformat-4 JSON (no Jupyter package needed to build it). The first code cell holds the parameters
(tagged `parameters`, papermill's convention); every other cell reads them.
"""
from __future__ import annotations

import json
from pathlib import Path

PARAMETERS = '''from pathlib import Path

INPUT = Path("/kaggle/input")  # where Kaggle mounts the attached datasets: the bundle is found under it
DATA = Path({data!r})  # the competition's data: test.csv and test/
OUT = Path("/kaggle/working/submission.csv")
SITE = Path("/tmp/biomass_site")  # the bundle's wheels are installed here, first on the path
PROCESSES = 1  # 2 on a 2 x T4 machine: accelerate launch splits the test images between the GPUs'''

INSTALL = '''import json, os, subprocess, sys

found = sorted(p.parent for depth in ("*", "*/*", "*/*/*") for p in INPUT.glob(depth + "/biomass_bundle.json"))
assert found, f"no biomass_bundle.json under {INPUT}: attach the dataset that python -m biomass.pack wrote"
BUNDLE = found[0]
manifest = json.loads((BUNDLE / "biomass_bundle.json").read_text())
pins = ["==".join(w.split("-")[:2]) for w in manifest["wheels"]]  # name==version of every wheel in the bundle
subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--upgrade",
                "--find-links", str(BUNDLE / "wheels"), "--target", str(SITE), *pins], check=True)
sys.path.insert(0, str(SITE))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH")) if p)
print(BUNDLE, json.dumps(manifest, indent=1))'''

DEVICE = '''import biomass, torch

print("biomass", biomass.__version__, "from", biomass.__file__)
print("torch", torch.__version__, "CUDA", torch.version.cuda)
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(", ".join(gpus) or "no GPU: the chain runs on the CPU")'''

CHAIN = '''run_dir = BUNDLE / manifest["run"]
cmd = [sys.executable, "-m", "biomass.infer", str(run_dir), "--data", str(DATA), "--out", str(OUT)]
if PROCESSES > 1:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(PROCESSES), *cmd[1:]]
proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
for line in proc.stdout:
    print(line, end="")
assert proc.wait() == 0, f"biomass.infer failed (exit {proc.returncode}): its last lines are above"'''

SHOW = '''import pandas as pd

submission = pd.read_csv(OUT)
print(len(submission), "rows ->", OUT)
submission.head(10)'''


def _cell(kind: str, source: str, tags: tuple[str, ...] = ()) -> dict:
    cell = {"cell_type": kind, "metadata": {"tags": list(tags)} if tags else {}, "source": source.splitlines(True)}
    return cell | ({"execution_count": None, "outputs": []} if kind == "code" else {})


def cells(data: str) -> list[dict]:
    return [_cell("markdown", "# biomass: offline submission\n\nBuilt by `python -m biomass.pack`. Attach this "
                              "dataset and the competition's data, set the parameters below if the paths differ, "
                              "and run all: the cells install the bundle's wheels without the internet, print the "
                              "device, run the aux -> main chain over every fold model and write `submission.csv`."),
            _cell("code", PARAMETERS.format(data=data), ("parameters",)), _cell("code", INSTALL),
            _cell("code", DEVICE), _cell("code", CHAIN), _cell("code", SHOW)]


def write_notebook(path: Path, data: str) -> None:
    nb = {"nbformat": 4, "nbformat_minor": 5, "cells": cells(data),
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                       "language_info": {"name": "python"}}}
    for i, cell in enumerate(nb["cells"]):
        cell["id"] = f"cell-{i}"
    path.write_text(json.dumps(nb, indent=1) + "\n")
