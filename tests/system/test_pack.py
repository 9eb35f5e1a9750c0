"""`python -m biomass.pack`: a Kaggle bundle whose notebook, run headless in a fresh offline venv that holds only the
image's own packages, writes the submission `biomass.infer` writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from biomass.pack.wheels import IMAGES

REPO = Path(__file__).resolve().parents[2]
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, Path]:
    from helpers import TINY, train

    from biomass.data.synthetic import generate

    root = tmp_path_factory.mktemp("pack")
    data = generate(root / "data", n_train=6, n_test=3, seed=1, width=128, height=64)
    run = train(root / "run", data, *TINY, "main.train.epochs=1", "tracking.mlflow=false",
                "main.model.backbone.model_name=test_resnet", "aux.model.backbone.model_name=test_resnet")
    return run, data


def pack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "biomass.pack", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


def kernel_for(python: Path, folder: Path) -> str:
    """A kernel spec for `python` in `folder` (put on JUPYTER_PATH): the notebook runs in that venv, with no
    PYTHONPATH of ours, so biomass can only come from the bundle's wheel."""
    spec = folder / "kernels" / "image"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "image",
        "language": "python", "env": {"PYTHONPATH": "", "CI": "1"}}))
    return "image"


@pytest.mark.slow
def test_bundle_notebook_writes_what_infer_writes(demo_run, tmp_path, monkeypatch):
    import nbformat
    from image_venv import make
    from nbclient import NotebookClient

    run, data = demo_run
    proc = pack(str(run), "--out", str(tmp_path / "input" / "bundle"), "--image", "kaggle", "--python-version", PY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bundle = tmp_path / "input" / "bundle"
    manifest = json.loads((bundle / "biomass_bundle.json").read_text())
    assert manifest["image"] == "kaggle" and (bundle / "run" / "config.yaml").is_file()
    assert not (bundle / "run" / "state").exists()
    names = {w.split("-")[0].replace("_", "-").lower() for w in manifest["wheels"]}
    assert names == {n.lower() for n in IMAGES["kaggle"].lacks} | {"biomass"}

    python = make(tmp_path / "venv", IMAGES["kaggle"].has)
    probe = subprocess.run([str(python), "-c", "import pydantic"], capture_output=True, env={"PATH": "/usr/bin"})
    assert probe.returncode != 0  # the stand-in image really lacks what the bundle brings
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    kernel = kernel_for(python, tmp_path / "jupyter")

    nb = nbformat.read(bundle / "submission.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += (f"\nINPUT = Path({str(tmp_path / 'input')!r})\nDATA = Path({str(data)!r})\n"
                      f"OUT = Path({str(tmp_path / 'nb_submission.csv')!r})\nSITE = Path({str(tmp_path / 'site')!r})\n")
    NotebookClient(nb, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    device = "".join(o.get("text", "") for o in nb.cells[3].outputs)
    assert f"from {tmp_path / 'site' / 'biomass'}" in device and "no GPU" in device, device

    subprocess.run([sys.executable, "-m", "biomass.infer", str(run), "--data", str(data), "--out",
                    str(tmp_path / "infer.csv")], check=True, timeout=600)
    ours, theirs = pd.read_csv(tmp_path / "nb_submission.csv"), pd.read_csv(tmp_path / "infer.csv")
    assert len(ours) == 3 * 5
    pd.testing.assert_frame_equal(ours, theirs)


def test_bundle_refuses_an_unfinished_run(tmp_path):
    (tmp_path / "run").mkdir()
    proc = pack(str(tmp_path / "run"), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_bf16_checkpoints_halve_and_still_predict(demo_run, tmp_path):
    """--bf16's rewrite: matrices in bfloat16 (about half the bytes), vectors float32, and the run still predicts
    what the float32 run does, to bfloat16's precision."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from biomass.pack.bundle import to_bf16

    run, data = demo_run
    half = tmp_path / "run"
    shutil.copytree(run, half)
    for path in half.glob("*/fold*/best.safetensors"):
        to_bf16(path)
    path = "main/fold0/best.safetensors"
    before, after = load_file(str(run / path)), load_file(str(half / path))
    assert before.keys() == after.keys()
    assert all(after[k].dtype == (torch.bfloat16 if v.dtype == torch.float32 and v.ndim >= 2 else v.dtype)
               for k, v in before.items())
    assert (half / path).stat().st_size < 0.6 * (run / path).stat().st_size
    for name, folder in (("fp32", run), ("bf16", half)):
        subprocess.run([sys.executable, "-m", "biomass.infer", str(folder), "--data", str(data), "--out",
                        str(tmp_path / f"{name}.csv")], check=True, timeout=600)
    fp32, bf16 = pd.read_csv(tmp_path / "fp32.csv"), pd.read_csv(tmp_path / "bf16.csv")
    assert (fp32["sample_id"] == bf16["sample_id"]).all()
    assert ((bf16["target"] - fp32["target"]).abs() <= 0.05 * fp32["target"].abs() + 0.5).all()
