"""Every repository path and every `python -m` / `-m` module that README.md and docs/*.md name exists, so the docs
cannot point at a file or function's old home."""
from __future__ import annotations

import importlib.util
import re

import pytest
from helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP = "biomass|tests|docs|experiments|ablations|accelerate_configs|scripts|\\.ci"
PATH = re.compile(rf"(?<![\w/.$-])((?:{TOP})/[\w./*-]*[\w*])")
MODULE = re.compile(r"(?:python|accelerate launch[^`\n]*?) -m ([a-z_][\w.]*)")


def named_paths(text: str) -> set[str]:
    """Repository paths the text names, except on a line that quotes an `error:` about a missing file."""
    lines = [ln for ln in text.splitlines() if "error: " not in ln]
    return {m.group(1).rstrip(".") for m in PATH.finditer("\n".join(lines))}


def named_modules(text: str) -> set[str]:
    return {m.group(1).rstrip(".") for m in MODULE.finditer(text)}


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_named_path_and_module_exists(doc):
    text = doc.read_text()
    missing = [p for p in sorted(named_paths(text))
               if not (any(REPO.glob(p)) if "*" in p else (REPO / p).exists())]
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"
    modules = [m for m in sorted(named_modules(text)) if m not in ("pip", "pytest", "mlflow", "accelerate")]
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    assert not absent, f"{doc.name} names modules that do not exist: {absent}"


def test_the_scanner_sees_paths_and_modules():
    """The regexes find what the docs write (a scanner that finds nothing passes every doc)."""
    text = ("see `biomass/chain.py` and docs/ARCHITECTURE.md; `python -m biomass.run x` and "
            "`accelerate launch --config_file a.yaml -m biomass.infer RUN`; not /data/biomass/x or runs/demo1")
    assert named_paths(text) == {"biomass/chain.py", "docs/ARCHITECTURE.md"}
    assert named_modules(text) == {"biomass.run", "biomass.infer"}
    assert len(named_paths((REPO / "README.md").read_text())) > 10
