"""Output locations and files: each place is checked for writability before any work starts; every file is written
atomically (`atomic`, the one home of that rename) and JSON is read through one checked reader.

`require_writable` is the one check every entry point runs on where it will write (a run directory, the image
cache, a submission file, an ablation's runs folder, the synthetic data folder, the MLflow SQLite store), so that a
read-only or impossible place is one `error:` line naming it, not a traceback after minutes of work.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def atomic(path: Path | str) -> Iterator[Path]:
    """The one way biomass writes a file: the caller writes the yielded temporary name in the same folder, which is
    then renamed to `path`, so a kill leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic(path) as tmp:
        tmp.write_bytes(data)


def write_csv_atomic(df: pd.DataFrame, path: Path, **kwargs) -> None:
    with atomic(path) as tmp:
        df.to_csv(tmp, **kwargs)


def write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent, default=float))


def read_json(path: Path, what: str = "file", fix: str = "retrain or restore it") -> dict[str, Any]:
    """A JSON object from `path`; a missing, truncated or foreign file is one error naming it and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise BiomassError(f"{path}: {what} is missing")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise BiomassError(f"{path}: {what} is not valid JSON (truncated or corrupt: {err}); {fix}") from None
    if not isinstance(data, dict):
        raise BiomassError(f"{path}: {what} is not a JSON object; it was not written by biomass")
    return data


def read_json_or(path: Path, default: Any = None) -> Any:
    """The JSON in `path`, or `default` when it is missing, unreadable or (with a default) not of the default's
    type: for files a caller polls while another process may still be writing them (a child's run.json)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default
    return default if default is not None and not isinstance(data, type(default)) else data
