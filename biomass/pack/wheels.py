"""The machines biomass runs on offline, what each lacks, and the wheels that bring it: the one place for both lists.

`python -m biomass.bench wheelhouse DIR` (the lent GPU machine) and `python -m biomass.pack` (Kaggle's notebook
image) fetch from here: on a machine that reaches the package registry, `pip download` of the pinned wheels for the
image's Python and platform, one version each, checked to need nothing that neither the set nor the image has.
"""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from biomass.errors import BiomassError

MiB = 2**20
BUDGET_MIB = 60  # what one device call carries comfortably (its working tree travels within 64 MiB)
# Pinned together: pydantic 2.13.4 requires exactly pydantic-core 2.46.4; albumentations 2.0.8 exactly albucore
# 0.0.24, which needs stringzilla and simsimd. typing-extensions travels too: pydantic needs >= 4.14.1, older than
# what an image may hold. These are the versions the test suite runs with.
BIOMASS_NEEDS = {"pydantic": "2.13.4", "pydantic-core": "2.46.4", "annotated-types": "0.7.0",
                 "typing-inspection": "0.4.2", "typing-extensions": "4.16.0", "albumentations": "2.0.8",
                 "albucore": "0.0.24", "stringzilla": "5.3.2", "simsimd": "6.5.16"}
# manylinux tags pip must be told one by one (it matches each exactly); both images run glibc >= 2.35.
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64")


@dataclass(frozen=True)
class Image:
    """An offline machine: its Python, the packages of biomass's needs it has, the wheels it lacks."""

    name: str
    python: str  # major.minor
    has: tuple[str, ...]  # what it brings that biomass or the wheels below import (normalised names)
    lacks: dict[str, str]  # name -> pinned version: the wheels to carry
    about: str


GPU_HAS = ("torch", "torchvision", "timm", "accelerate", "opencv-python-headless", "pandas", "scikit-learn", "rich",
           "safetensors", "scipy", "pyyaml", "numpy", "matplotlib", "packaging", "huggingface-hub", "pillow")
IMAGES = {
    "gpu": Image("gpu", "3.12", GPU_HAS, dict(BIOMASS_NEEDS),
                 "the lent H100/H200 ('cuda' image, device tool KINDS.md): no pydantic, albumentations or mlflow"),
    # timm travels too: Kaggle's image may predate 1.0.20, the first with DINOv3 (gold's backbone).
    "kaggle": Image("kaggle", "3.11", tuple(n for n in GPU_HAS if n != "timm") + ("ipykernel",),
                    {**BIOMASS_NEEDS, "timm": "1.0.31"},
                    "Kaggle's notebook image (code competitions run it offline): its albumentations, pydantic and "
                    "timm versions are not ours, so ours are carried and put first on the path"),
}
# What a fresh virtual environment holds to stand in for the GPU image in the rehearsal (tests): the image's
# packages that matter, and nothing of what it lacks.
GPU_REHEARSAL = ("torch", "timm", "accelerate", "opencv-python-headless", "pandas", "scikit-learn", "rich",
                 "safetensors", "scipy", "pyyaml")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_named(name: str) -> Image:
    if name not in IMAGES:
        raise BiomassError(f"unknown image {name!r}; one of {', '.join(IMAGES)}")
    return IMAGES[name]


def wheel_name(path: Path) -> tuple[str, str]:
    """(normalised project name, version) from a wheel's file name."""
    parts = path.name.split("-")
    return normalise(parts[0]), parts[1]


def install_line(wheels: Path, site: str = "/tmp/biomass_site") -> str:
    return (f"python3 -m pip install -q --no-index --no-deps --no-compile --target {site} {wheels}/*.whl && "
            f"export PYTHONPATH=$PWD:{site}")


def download(image: Image, dest: Path, python: str | None = None) -> list[Path]:
    """The image's missing wheels in `dest` for `python` (default the image's), one version each; other versions
    of the same projects left there from an earlier call are removed. Returns the wheel files."""
    python = python or image.python
    if not re.fullmatch(r"3\.\d+", python):
        raise BiomassError(f"--python-version must look like 3.12, got {python!r}")
    dest.mkdir(parents=True, exist_ok=True)
    pins = {normalise(k): v for k, v in image.lacks.items()}
    for old in dest.glob("*.whl"):
        name, version = wheel_name(old)
        if name in pins and version != pins[name]:
            print(f"wheelhouse: removing {old.name} (pinned {pins[name]})", file=sys.stderr)
            old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "--dest", str(dest),
           *[f"{k}=={v}" for k, v in image.lacks.items()]]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no message"]
        raise BiomassError(f"pip download for the {image.name} image (Python {python}) failed: {last[0]}")
    wheels = sorted(p for p in dest.glob("*.whl") if wheel_name(p)[0] in pins)
    check(image, wheels, python)
    return wheels


def check(image: Image, wheels: list[Path], python: str) -> None:
    """One wheel per pinned project, the size budget kept, and every requirement of every wheel (for this Python,
    on Linux, extras aside) met by the set itself or named among the image's packages."""
    from packaging.requirements import Requirement

    have = {}
    for w in wheels:
        name, version = wheel_name(w)
        if name in have:
            raise BiomassError(f"{w.parent}: two versions of {name} ({have[name]}, {version}); keep one")
        have[name] = version
    missing = {normalise(k) for k in image.lacks} - set(have)
    if missing:
        raise BiomassError(f"no wheel for {', '.join(sorted(missing))} (Python {python}) after pip download")
    total = sum(w.stat().st_size for w in wheels) / MiB
    if total > BUDGET_MIB:
        raise BiomassError(f"the wheels take {total:.1f} MiB, over the {BUDGET_MIB:.0f} MiB budget")
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "implementation_name":
           "cpython", "platform_python_implementation": "CPython", "extra": ""}
    provided = set(have) | {normalise(n) for n in image.has}
    for w in wheels:
        for line in _requires(w):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = normalise(req.name)
            if name not in provided:
                raise BiomassError(f"{w.name} needs {line!r}, which neither the wheels nor the {image.name} image "
                                   "has: add it to biomass.pack.wheels")
            if name in have and not req.specifier.contains(have[name], prereleases=True):
                raise BiomassError(f"{w.name} needs {line!r}, but the set pins {name} {have[name]}")


def _requires(wheel: Path) -> list[str]:
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Requires-Dist:")]
