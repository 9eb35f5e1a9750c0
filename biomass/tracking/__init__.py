"""Everything MLflow, in one package: the training run's tracker (here), the sweep and ablation parent runs
(`tracking.runs`) and the tracking server a parallel sweep starts (`tracking.server`). `mlflow` is imported inside
functions only, so that importing biomass never needs it.

The store: MLFLOW_TRACKING_URI, else MLflow's default. Whoever creates or first opens a store (a run, a sweep, a
report, a tracking server) does it through `open_client` / under `store_lock`, one process at a time, and every
experiment biomass creates is tagged `mlflow.experimentKind: custom_model_development`, the tag MLflow 3's UI reads to
tell model training from GenAI; MLflow 3.17 also needs its browser-wide switch, which the links biomass prints set
(`tracking.server.MODEL_TRAINING_VIEW`, docs/TRACKING.md).

One run per invocation (params: the flattened resolved config; tags: git commit, dirty flag, experiment file), one
nested child run per stage and fold. Metric names are stable across runs: `train/loss`, `val/loss`,
`val/weighted_r2`, `lr` per epoch; `fold/weighted_r2` per fold; `cv/weighted_r2`, `cv/<target>_r2` at the end
(docs/TRACKING.md).
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from biomass.config.load import flatten
from biomass.errors import BiomassError
from biomass.places import require_writable

_MAX_PARAM = 6000  # MLflow's limit on a param value


def git_state(cwd: Path | None = None) -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=cwd, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {"git.commit": commit, "git.dirty": str(bool(dirty)).lower()} if commit else {}


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else MLflow's default (a SQLite file in the working directory)."""
    import mlflow

    return mlflow.get_tracking_uri()


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` tracking URI, or None for any other store."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    rest = uri[len(prefix):].split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


def check_store(uri: str) -> None:
    """A local store (SQLite file, or a folder for `file:` / plain-path URIs) must be writable: found before any
    work starts, rather than after MLflow's minutes of retries."""
    db = sqlite_file(uri)
    if db is not None:
        require_writable(db, f"MLflow store {uri} (MLFLOW_TRACKING_URI):", is_file=True)
    elif "://" not in uri or uri.startswith("file:"):
        folder = uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):] if uri.startswith(
            "file:") else uri
        require_writable(Path(folder), f"MLflow store {uri} (MLFLOW_TRACKING_URI):")


_held: dict[Path, list] = {}  # database -> [reentrant thread lock, depth]: nested store_lock calls in one process


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise the creation and first use of a SQLite store between processes: MLflow creates and migrates the
    schema on first connection, and two processes doing so at once make one of them fail inside alembic. An exclusive
    `fcntl` lock on `<db>.lock` next to the database; reentrant within a process (a sweep holds it while its server
    starts and opens a client); other stores need none."""
    db = sqlite_file(uri)
    if db is None:
        yield
        return
    import fcntl

    db = db.absolute()
    entry = _held.setdefault(db, [threading.RLock(), 0])
    with entry[0]:
        entry[1] += 1
        fd = None
        try:
            if entry[1] == 1:
                db.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o666)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            entry[1] -= 1
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3's UI: the model-training view


def open_client(uri: str):
    """An MlflowClient of the store at `uri`, made under the store lock: constructing one creates and migrates a new
    store, which two processes must not do at once."""
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created (under the store lock) with the experiment-kind tag when missing; an
    existing one without the tag gets it."""
    with store_lock(client.tracking_uri):
        found = client.get_experiment_by_name(name)
        if found is None:
            return client.create_experiment(name, tags=EXPERIMENT_KIND)
        for key, value in EXPERIMENT_KIND.items():
            if found.tags.get(key) != value:
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id


class Tracker:
    """A thin layer over mlflow's fluent API; a disabled tracker (other processes, tracking off) does nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.run_id: str | None = None
        if enabled:
            import mlflow

            logging.getLogger("mlflow").setLevel(logging.WARNING)
            self.mlflow = mlflow

    def start(self, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
              run_id: str | None = None, parent_run_id: str | None = None) -> str | None:
        if not self.enabled:
            return None
        mlflow = self.mlflow
        uri = mlflow.get_tracking_uri()
        try:  # the store's creation and the experiment's, one process at a time
            mlflow.set_experiment(experiment_id=experiment_id(open_client(uri), experiment))
        except Exception as err:  # noqa: BLE001 - an unreachable server, a damaged database
            raise BiomassError(f"MLflow tracking at {uri}: cannot open the store "
                               f"({' '.join(str(err).split())[:300]}); set tracking.mlflow=false to train "
                               "without it") from None
        if run_id:  # resume: continue the same run rather than start a duplicate
            mlflow.start_run(run_id=run_id)
        else:
            extra = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
            mlflow.start_run(run_name=run_name, tags={**tags, **extra})
            flat = {k: str(v)[:_MAX_PARAM] for k, v in flatten(params).items()}
            items = list(flat.items())
            for i in range(0, len(items), 90):  # log_params takes at most 100 per call
                mlflow.log_params(dict(items[i:i + 90]))
        self.run_id = mlflow.active_run().info.run_id
        return self.run_id

    def child(self, name: str, tags: dict[str, str] | None = None, run_id: str | None = None):
        if not self.enabled:
            return contextlib.nullcontext()
        if run_id:  # resume: continue the fold's child run
            return self.mlflow.start_run(run_id=run_id, nested=True)
        return self.mlflow.start_run(run_name=name, nested=True, tags=tags or {})

    def active_run_id(self) -> str | None:
        run = self.mlflow.active_run() if self.enabled else None
        return run.info.run_id if run is not None else None

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            self.mlflow.log_metrics({k.replace("@", "_"): float(v) for k, v in values.items()}, step=step)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self.mlflow.log_artifact(str(path), artifact_path=folder)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.mlflow.active_run() is not None:
            while self.mlflow.active_run() is not None:
                self.mlflow.end_run(status=status)
