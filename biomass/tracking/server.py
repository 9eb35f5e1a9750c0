"""An `mlflow server` over a local store for the lifetime of a parallel sweep (part of biomass.tracking).

SQLite takes one writer at a time: children logging straight into `sqlite:///mlflow.db` at once fail with "database is
locked" and lose metrics. A parallel sweep over a local store (sqlite or a folder) therefore starts one server on
127.0.0.1 (a free port, one worker: the server serialises the writes) and points every child at it. MLflow 3's
server spawns processes of its own (uvicorn/gunicorn workers, job runners) that outlive a SIGTERM of the `mlflow`
process, so the server runs in its own session and stopping it kills every process of that session.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from biomass.errors import BiomassError

UI_PORT = 5000  # `mlflow ui`'s default, for the links printed when the sweep's own server is gone


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now: the tracking server's, and each sweep child's accelerate main-process port."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def scheme(uri: str) -> str:
    return urllib.parse.urlparse(uri).scheme.lower()


def is_http(uri: str) -> bool:
    return scheme(uri) in ("http", "https")


def is_local_store(uri: str) -> bool:
    """A store this process opens itself (sqlite or a folder), as opposed to a server or a remote database."""
    return scheme(uri) in ("sqlite", "file", "")


def default_artifact_root(store_uri: str) -> Path:
    """Where MLflow puts artifacts of new experiments in this store without a server: `./mlruns` next to a sqlite
    store (MLflow's default), inside the folder of a file store."""
    if scheme(store_uri) == "sqlite":
        return Path.cwd() / "mlruns"
    return Path(urllib.parse.urlparse(store_uri).path if scheme(store_uri) == "file" else store_uri).resolve()


def session_processes(sid: int) -> list[int]:
    """Every live process of a session (Linux /proc): what is left of a server after its stop."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _die_with_parent() -> None:
    """In the server's first process: SIGTERM when the sweep dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


class TrackingServer:
    def __init__(self, store_uri: str, log_path: Path, startup_s: float = 120.0):
        self.store_uri, self.log_path, self.startup_s = store_uri, log_path, startup_s
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> str:
        """Start the server and wait until it answers; under the store lock, since the server creates and migrates
        a new store as it starts (two sweeps starting together on one fresh store take turns)."""
        from biomass.tracking import store_lock

        with store_lock(self.store_uri):
            return self._start()

    def _start(self) -> str:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store_uri,
               "--default-artifact-root", str(default_artifact_root(self.store_uri)), "--no-serve-artifacts",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        deadline = time.time() + self.startup_s
        while not self.healthy():
            if self.proc.poll() is not None or time.time() > deadline:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                self.stop()
                raise BiomassError(f"the sweep's mlflow server over {self.store_uri} did not start ({tail[0][:300]};"
                                   f" log {self.log_path})")
            time.sleep(0.3)
        return self.url

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    @property
    def session(self) -> int | None:
        return self.proc.pid if self.proc is not None else None  # start_new_session: its pid is the session id

    def stop(self) -> None:
        """Stop the server and every process it started: SIGTERM to the group, then SIGKILL to whatever of its
        session is left (a worker that moved to a group of its own included)."""
        if self.proc is None:
            return
        sid = self.proc.pid
        try:
            os.killpg(sid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + 10
        while (left := session_processes(sid)) and time.time() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc = None

    def __enter__(self) -> TrackingServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_leftover_server(sid: int | None) -> None:
    """A resumed sweep stops the server a killed one left running (if that session is still an mlflow server)."""
    if not sid:
        return
    try:
        cmdline = Path(f"/proc/{sid}/cmdline").read_bytes()
    except OSError:
        cmdline = b""
    if b"mlflow" in cmdline or not cmdline:
        for pid in session_processes(sid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"mlflow" in cmd or b"uvicorn" in cmd or b"gunicorn" in cmd or b"huey" in cmd:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# MLflow 3.17's UI picks its pages from a browser-wide "workflow type" (GenAI by default, kept in the browser's local
# storage) before it reads an experiment's `mlflow.experimentKind` tag: checked in headless Chromium, a tagged
# experiment still opened on the GenAI overview. A link with this query opens the model-training pages whatever the
# browser last chose.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def ui_links(base_url: str, experiment_id: str, sweep_run_id: str, parent_run_ids: list[str]) -> dict[str, str]:
    """Links into MLflow's UI, in its model-training view: the sweep run (its ablation parents are nested below it),
    the experiment, and the compare page of the ablation parents."""
    runs = urllib.parse.quote(json.dumps(parent_run_ids, separators=(",", ":")))
    exps = urllib.parse.quote(json.dumps([experiment_id], separators=(",", ":")))
    return {"runs": f"{base_url}/#/experiments/{experiment_id}/runs/{sweep_run_id}?{MODEL_TRAINING_VIEW}",
            "experiment": f"{base_url}/#/experiments/{experiment_id}?{MODEL_TRAINING_VIEW}",
            "compare": f"{base_url}/#/compare-runs?runs={runs}&experiments={exps}&{MODEL_TRAINING_VIEW}"}
