"""scripts/gpu_check.sh rehearsed here, so that a missing import shows up on this machine and not on the lent GPU:
a fresh venv with only the GPU image's packages (tests/image_venv.py), the wheelhouse built for this Python, the
script with a CPU flag at a toy size; and its torch + timm fallback where biomass cannot be imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from biomass.pack.wheels import GPU_REHEARSAL

REPO = Path(__file__).resolve().parents[2]
PY = f"{sys.version_info.major}.{sys.version_info.minor}"
TOY = ["--cpu", "--model", "test_vit", "--size", "64", "--n-test", "8", "--folds", "2", "--batch", "4",
       "--aux-batch", "4", "--steps", "1", "--repeats", "1", "--width", "256", "--height", "128"]


def check(venv_python: Path, out: Path, wheels: Path, site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=f"{venv_python.parent}{os.pathsep}{env['PATH']}", PYTHON=str(venv_python), OUT=str(out),
               WHEELS=str(wheels), SITE=str(site), OMP_NUM_THREADS="1")
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)


def lines(out: Path) -> dict[str, dict]:
    return {x["part"]: x for x in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_script_fits_one_device_call():
    assert len((REPO / "scripts" / "gpu_check.sh").read_text()) <= 2000


@pytest.mark.slow
def test_gpu_check_in_a_venv_of_the_gpu_image(tmp_path):
    from image_venv import make

    python = make(tmp_path / "venv", GPU_REHEARSAL)
    bare = subprocess.run([str(python), "-c", "import biomass.config.load"], cwd=REPO, capture_output=True,
                          text=True, env={"PATH": "/usr/bin", "PYTHONPATH": str(REPO)})
    assert bare.returncode != 0 and "pydantic" in bare.stderr  # what the image lacks, before the wheels
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "biomass.bench", "wheelhouse", str(wheels), "--python-version", PY],
                           capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert built.returncode == 0, built.stderr[-2000:]
    assert "--no-index --no-deps" in built.stdout and sum(w.stat().st_size for w in wheels.iterdir()) <= 60 * 2**20

    out = tmp_path / "out"
    proc = check(python, out, wheels, tmp_path / "site", "600", *TOY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "check.txt").read_text()
    assert "pydantic 2.13.4" in report and "nvidia-smi: none" in report and "torch " in report
    parts = lines(out)
    assert len(parts) == 8 and all(x["status"] == "ok" for x in parts.values()), (out / "log.txt").read_text()[-3000:]
    assert all(x["versions"]["pydantic"] == "2.13.4" for x in parts.values())

    fallback = tmp_path / "fallback"
    proc = check(python, fallback, tmp_path / "no_wheels", tmp_path / "site2", "600", *TOY)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "plain torch + timm step instead" in (fallback / "check.txt").read_text()
    steps = lines(fallback)
    assert set(steps) == {"fallback_bf16", "fallback_fp32"}
    assert all(x["status"] == "ok" and x["img_s"] > 0 and x["flops_per_step"] > 0 for x in steps.values())
