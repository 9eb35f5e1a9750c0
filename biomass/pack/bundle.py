"""A Kaggle bundle: one folder to upload as one Kaggle dataset, and the notebook that submits from it offline.

    OUT/run/                 the run directory (config, folds, fold checkpoints; no resumable state)
    OUT/wheels/*.whl         a wheel of biomass itself + the wheels the target image lacks (biomass.pack.wheels)
    OUT/submission.ipynb     install offline, print the device, run the chain, write submission.csv
    OUT/biomass_bundle.json  what is inside: the notebook finds the bundle under /kaggle/input by this file

`bf16`: the fold checkpoints' matrices and kernels (tensors of 2 or more dimensions) stored in bfloat16, about half
the upload; vectors (biases, norms, batch statistics) stay float32. Loading casts them back to the model's dtype.
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

from biomass import __version__
from biomass.errors import BiomassError
from biomass.pack.notebook import write_notebook
from biomass.pack.wheels import Image, download
from biomass.places import require_writable
from biomass.rundir import STATE, RunDir
from biomass.stages import configured

MANIFEST = "biomass_bundle.json"
SOURCE = Path(__file__).resolve().parents[2]  # the checkout biomass is imported from (its setup.cfg builds the wheel)


def pack(run_dir: Path, out: Path, image: Image, bf16: bool = False, python: str | None = None,
         data: str = "/kaggle/input/csiro-biomass") -> Path:
    """Write the bundle for `image` (wheels for `python`, default the image's) to the new folder `out`."""
    run = RunDir(run_dir)
    cfg = run.completed()
    out = require_writable(out, "--out")
    if out.exists() and any(out.iterdir()):
        raise BiomassError(f"--out {out} exists and is not empty; name a new folder")
    for stage in configured(cfg):
        for k in run.trained_folds(stage, stage.config(cfg)):
            if run.checkpoint_info(stage, k).get("base_weights"):
                raise BiomassError(f"{run.checkpoint(stage, k)}: a PEFT checkpoint on a base weights file outside "
                                   "the run; bundling that file is not supported")
    shutil.copytree(run.path, out / "run", ignore=shutil.ignore_patterns(STATE, "*.tmp*"))
    if bf16:
        for path in sorted((out / "run").glob("*/fold*/*.safetensors")):
            to_bf16(path)
    wheels = download(image, out / "wheels", python)
    wheels.append(biomass_wheel(out / "wheels"))
    write_notebook(out / "submission.ipynb", data)
    manifest = {"biomass": __version__, "image": image.name, "python": python or image.python, "run": "run",
                "run_name": cfg.name, "wheels": sorted(w.name for w in wheels), "bf16_checkpoints": bf16,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def to_bf16(path: Path) -> None:
    """Rewrite a safetensors file with its float32 tensors of 2+ dimensions in bfloat16 (temp name, then rename)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    half = {k: v.to(torch.bfloat16) if v.dtype == torch.float32 and v.ndim >= 2 else v for k, v in state.items()}
    tmp = path.with_suffix(".tmp.safetensors")
    save_file(half, str(tmp))
    tmp.replace(path)


def biomass_wheel(dest: Path) -> Path:
    """A wheel of biomass built from a clean copy of the checkout it is imported from (no stale build/ folder
    slips in); pure Python, so any image's Python takes it."""
    import tempfile

    if not (SOURCE / "setup.cfg").is_file():
        raise BiomassError(f"{SOURCE}: no setup.cfg; build the bundle from a checkout of biomass")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("setup.cfg", "pyproject.toml", "README.md"):
            shutil.copy2(SOURCE / name, tmp)
        shutil.copytree(SOURCE / "biomass", Path(tmp) / "biomass", ignore=shutil.ignore_patterns("__pycache__"))
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                               "--wheel-dir", str(dest), tmp], stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    built = sorted(dest.glob(f"biomass-{__version__}-*.whl"))
    if proc.returncode or not built:
        raise BiomassError(f"building the biomass wheel failed: {proc.stderr.strip().splitlines()[-1:]}")
    return built[-1]
