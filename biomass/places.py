"""Output locations: each is checked for writability before any work starts, and files are written atomically.

`require_writable` is the one check every entry point runs on where it will write (a run directory, the image
cache, a submission file, an ablation's runs folder, the synthetic data folder, the MLflow SQLite store), so that a
read-only or impossible place is one `error:` line naming it, not a traceback after minutes of work.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

from biomass.errors import BiomassError


def require_writable(path: Path | str, what: str, is_file: bool = False) -> Path:
    """`path` (a folder, or a file when `is_file`) can be created or written: its nearest existing ancestor is a
    writable folder (probed by creating and removing a temporary file there, which also catches a read-only file
    system and works for root, whom permission bits do not stop). Returns the absolute path."""
    path = Path(path).expanduser().absolute()
    if is_file and path.is_dir():
        raise BiomassError(f"{what} {path} is a folder; name a file in it")
    if not is_file and path.exists() and not path.is_dir():
        raise BiomassError(f"{what} {path} is a file, not a folder")
    probe = path.parent if is_file else path
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise BiomassError(f"{what} {path} cannot be created: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BiomassError(f"{what} {path}: cannot write into {probe} (read-only or no permission)")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".biomass-probe-"):
            pass
    except OSError as err:
        raise BiomassError(f"{what} {path}: cannot write into {probe} ({err.strerror or err})") from None
    if is_file and path.exists() and not os.access(path, os.W_OK):
        raise BiomassError(f"{what} {path}: the file is read-only")
    return path


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary name in the same folder, then rename: a kill leaves the old file or the new one."""
    tmp = _tmp_name(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = _tmp_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv_atomic(df: pd.DataFrame, path: Path, **kwargs) -> None:
    tmp = _tmp_name(path)
    try:
        df.to_csv(tmp, **kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
