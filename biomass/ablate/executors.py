"""Where a sweep's children run: on this machine, N at a time (`local`), or as Ray tasks (`ray`), one machine or a
cluster. Either way a child is one `accelerate launch ... -m biomass.run` process in its own session (so that a stop
takes its whole process tree), with its own devices, CPU threads and accelerate port; its stdout/stderr and command go
to its folder. Ray is optional and imported only by RayExecutor.
"""
from __future__ import annotations

import concurrent.futures as futures
import os
import queue
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from biomass.errors import BiomassError, ConfigError
from biomass.tracking.server import free_port

LAUNCH_MODULE = "accelerate.commands.launch"
PID_FILE = "child.pid"  # the child's process group while it runs: a resumed sweep stops leftovers of a killed one
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # torch sizes its intra-op pool from OMP_NUM_THREADS


@dataclass
class ChildJob:
    key: str
    cmd: list[str]            # `python -m accelerate.commands.launch ... -m biomass.run ...`, without a port
    env: dict[str, str]       # added to the environment the child runs in (tracking URI, ...)
    folder: Path              # logs (child.out, child.err, child.cmd) and the pid file go here


@dataclass
class Outcome:
    exit_code: int | None
    submitted: float          # when the executor handed the child to a slot or to Ray (epoch seconds)
    spawned: float = 0.0      # when its process started
    ended: float = 0.0
    where: dict[str, str] = field(default_factory=dict)  # host, devices, threads, port


def with_port(cmd: list[str], port: int) -> list[str]:
    """The launch command with accelerate's `--main_process_port` (children running at once must not share one)."""
    i = cmd.index(LAUNCH_MODULE) + 1
    return [*cmd[:i], "--main_process_port", str(port), *cmd[i:]]


def stop_group(pgid: int, grace_s: float = 20.0) -> None:
    """SIGINT to a process group (accelerate and biomass.run stop cleanly), SIGKILL whatever is left after grace_s."""
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)


def stop_leftover(folder: Path) -> None:
    """Stop the process group a killed sweep left running for this child (its pid file names it), if it is still a
    biomass child; a recycled pid that is now another program is left alone."""
    pid_file = folder / PID_FILE
    try:
        pgid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return
    if "biomass.run" in cmdline:
        stop_group(pgid, grace_s=5.0)
    pid_file.unlink(missing_ok=True)


def run_child(cmd: list[str], env: dict[str, str], folder: Path) -> tuple[int, float, float]:
    """Run one child to the end in its own session; returns (exit code, spawn time, end time). Interrupted (Ctrl-C,
    a cancelled Ray task), it stops the child's whole process group first."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "child.cmd").write_text(shlex.join(cmd) + "\n")
    with open(folder / "child.out", "w") as out, open(folder / "child.err", "w") as err:
        spawned = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        (folder / PID_FILE).write_text(f"{proc.pid}\n")
        try:
            code = proc.wait()
        except BaseException:
            stop_group(proc.pid)
            proc.wait()
            raise
        finally:
            (folder / PID_FILE).unlink(missing_ok=True)
    return code, spawned, time.time()


def thread_env(threads: int) -> dict[str, str]:
    return {var: str(threads) for var in THREAD_VARS}


# ------------------------------------------------------------------------------------------------------- local
def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else every device torch sees."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [d for d in named.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def local_slots(parallel: int, child_gpus: int | None, child_cpus: int | None, gpus: list[str] | None = None,
                cpus: int | None = None) -> list[dict[str, str]]:
    """One environment per concurrent child: its own GPUs (split evenly unless --child-gpus) and its share of the
    cores as torch threads (unless --child-cpus)."""
    gpus = visible_gpus() if gpus is None else gpus
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    threads = child_cpus or max(1, cpus // parallel)
    slots = [thread_env(threads) for _ in range(parallel)]
    if gpus:
        per_child = child_gpus if child_gpus is not None else len(gpus) // parallel
        if per_child < 1 or per_child * parallel > len(gpus):
            raise ConfigError(f"--parallel {parallel} with {per_child or child_gpus} GPU(s) per child needs "
                              f"{parallel * max(per_child, 1)} GPUs; this machine shows {len(gpus)} "
                              f"({','.join(gpus)}); lower --parallel or --child-gpus")
        for i, slot in enumerate(slots):
            slot["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * per_child:(i + 1) * per_child])
    elif child_gpus:
        raise ConfigError(f"--child-gpus {child_gpus}: this machine shows no GPU")
    return slots


class LocalExecutor:
    name = "local"

    def __init__(self, parallel: int = 1, child_gpus: int | None = None, child_cpus: int | None = None):
        self.parallel = parallel
        self.slots = local_slots(parallel, child_gpus, child_cpus)
        self._ports: set[int] = set()
        self._lock = threading.Lock()

    def _port(self) -> int:
        with self._lock:  # two children starting together must not pick the same free port
            while (port := free_port()) in self._ports:
                pass
            self._ports.add(port)
            return port

    def _run(self, job: ChildJob, free: queue.Queue) -> Outcome:
        slot = free.get()
        submitted = time.time()
        port = self._port()
        try:
            code, spawned, ended = run_child(with_port(job.cmd, port), {**os.environ, **job.env, **slot}, job.folder)
        finally:
            with self._lock:
                self._ports.discard(port)
            free.put(slot)
        where = {"host": socket.gethostname(), "port": str(port),
                 **{k: v for k, v in slot.items() if k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}}
        return Outcome(code, submitted, spawned, ended, where)

    def run(self, jobs: Iterable[ChildJob], on_done: Callable[[ChildJob, Outcome], None]) -> None:
        """Run every job, at most `parallel` at a time; on_done is called in this thread as each one ends."""
        free: queue.Queue = queue.Queue()
        for slot in self.slots:
            free.put(slot)
        pool = futures.ThreadPoolExecutor(self.parallel, thread_name_prefix="child")
        pending = {pool.submit(self._run, job, free): job for job in jobs}
        try:
            for done in futures.as_completed(pending):
                on_done(pending[done], done.result())
        except BaseException:
            for f in pending:
                f.cancel()
            for f, job in pending.items():  # Ctrl-C reaches only this thread: stop the children still running
                if not f.done():
                    stop_leftover(job.folder)
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------------- ray
def _ray_child(cmd: list[str], env: dict[str, str], folder: str, submitted: float) -> dict[str, Any]:
    """Body of the Ray task: run the child on the devices Ray assigned to this worker (CUDA_VISIBLE_DEVICES)."""
    port = free_port()
    code, spawned, ended = run_child(with_port(cmd, port), {**os.environ, **env}, Path(folder))
    return {"exit_code": code, "submitted": submitted, "spawned": spawned, "ended": ended,
            "where": {"host": socket.gethostname(), "port": str(port),
                      "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                      "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "")}}


def import_ray():
    try:
        import ray
    except ImportError:
        raise BiomassError('--executor ray needs Ray: pip install -e ".[ray]"') from None
    return ray


class RayExecutor:
    """Each child a Ray task asking for num_gpus/num_cpus; at most `parallel` in flight. Without an address a local
    Ray starts here and stops with the sweep; `auto` or host:port joins a running cluster."""
    name = "ray"

    def __init__(self, parallel: int = 1, child_gpus: int | None = None, child_cpus: int | None = None,
                 address: str | None = None):
        ray = import_ray()
        import logging

        self.ray, self.parallel, self.address = ray, parallel, address
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline: no usage report
        # workers import this module to run the task: give a local Ray this checkout (a cluster installs biomass)
        root = str(Path(__file__).resolve().parents[2])
        pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "logging_level": logging.WARNING, "configure_logging": True}
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                gpus = visible_gpus()
                os.environ["PYTHONPATH"] = pythonpath  # the local raylet and its workers inherit it
                ray.init(num_cpus=os.cpu_count() or 1, num_gpus=len(gpus), **kwargs)
        except Exception as err:  # a wrong address, a cluster that is down
            raise BiomassError(f"Ray: cannot {'join ' + address if address else 'start'} "
                               f"({' '.join(str(err).split())[:300]})") from None
        total_cpus = int(ray.cluster_resources().get("CPU", 1))
        total_gpus = int(ray.cluster_resources().get("GPU", 0))
        self.gpus = child_gpus if child_gpus is not None else (total_gpus // parallel if total_gpus else 0)
        self.cpus = child_cpus or max(1, total_cpus // parallel)
        if total_gpus and not self.gpus:
            raise ConfigError(f"--parallel {parallel} exceeds the cluster's {total_gpus} GPUs; lower --parallel")
        self.task = ray.remote(_ray_child).options(num_gpus=self.gpus, num_cpus=self.cpus, max_retries=0)

    def run(self, jobs: Iterable[ChildJob], on_done: Callable[[ChildJob, Outcome], None]) -> None:
        ray = self.ray
        waiting = list(jobs)[::-1]
        in_flight: dict[Any, ChildJob] = {}
        try:
            while waiting or in_flight:
                while waiting and len(in_flight) < self.parallel:
                    job = waiting.pop()
                    env = {**job.env, **thread_env(self.cpus)}
                    in_flight[self.task.remote(job.cmd, env, str(job.folder), time.time())] = job
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                job = in_flight.pop(ref)
                try:
                    r = ray.get(ref)
                    outcome = Outcome(r["exit_code"], r["submitted"], r["spawned"], r["ended"], r["where"])
                except ray.exceptions.RayError as err:  # the worker or its node died
                    outcome = Outcome(None, time.time(), ended=time.time(), where={"error": str(err)[:300]})
                on_done(job, outcome)
        except BaseException:
            for ref in in_flight:
                ray.cancel(ref, force=False)  # KeyboardInterrupt in the task: run_child stops the child's group
            raise

    def close(self) -> None:
        if self.ray.is_initialized():
            self.ray.shutdown()


def make_executor(kind: str, parallel: int, child_gpus: int | None, child_cpus: int | None,
                  address: str | None):
    if parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {parallel}")
    if kind == "local":
        if address:
            raise ConfigError("--address is for --executor ray")
        return LocalExecutor(parallel, child_gpus, child_cpus)
    return RayExecutor(parallel, child_gpus, child_cpus, address)
