"""A fresh virtual environment that stands in for an offline image: only the named packages and what they need.

Each distribution of the closure (their Requires-Dist, markers evaluated here, extras left out) is linked from this
interpreter's site-packages by its top-level entries (package folders, modules, .libs, .dist-info): seconds, where
`pip install torch==2.14.1` from the local file takes minutes and gigabytes with its CUDA wheels. Not
`--system-site-packages`, which would see pydantic and albumentations. Importable as `image_venv` (tests/ is on
sys.path).
"""
from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

# Whatever an image lacks must stay out of the stand-in: linking one of these is a bug in the closure.
NEVER = {"pydantic", "pydantic-core", "albumentations", "albucore", "mlflow", "mlflow-skinny", "ray", "biomass"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(packages: tuple[str, ...]) -> list[md.Distribution]:
    seen: dict[str, md.Distribution] = {}
    todo = [normalise(p) for p in packages]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        dist = md.distribution(name)
        seen[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalise(req.name))
    bad = NEVER & set(seen)
    assert not bad, f"the stand-in would hold {bad}"
    return list(seen.values())


def make(path: Path, packages: tuple[str, ...]) -> Path:
    """The venv at `path` (with pip, which the image has) holding `packages`' closure; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    site = next((path / "lib").glob("python3*/site-packages"))
    for dist in closure(packages):
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops):
            target = site / top
            source = Path(dist.locate_file(top))
            if not target.exists() and source.exists() and not top.endswith(".pth") and top != "__pycache__":
                target.symlink_to(source)
    return path / "bin" / "python"
