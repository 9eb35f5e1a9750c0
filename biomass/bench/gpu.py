"""`python -m biomass.bench gpu --budget SECONDS --out DIR`: everything only a GPU shows, inside one short device call.

Parts, in the order of their value, each in its own process under its own time limit (biomass.bench.gpu_parts):
  train_bf16, train_fp32   gold's stage-1 train step (vit_huge_plus_patch16_dinov3, 800 px, batch 10, random init,
                           first half frozen) through our engine: bf16 + TF32 (gold_bf16), fp32 without TF32 (gold)
  seed_fp32                the same step in a plain fp32 loop in the seed's style
  chain_bf16, chain_fp32   the inference chain on a subset sized to the time left, fold-load time apart, and its
                           extrapolation to 800 images x (5 aux + 5 main folds)
  aux_fp32, aux_bf16       the aux stage's train step at its real size and batch, peak memory beside the
                           `bench memory` estimate (as the train_* lines show the main stage's)
  jpeg_decode              torchvision's GPU decode (where it works) against cv2 on all cores

Each part's result is appended to DIR/results.jsonl the moment it ends (one JSON object a line, with the device,
the versions and the command), so killing the command keeps every finished part; children's stderr goes to
DIR/log.txt. A part gets what is left of the budget less the least the parts after it need; one whose least need
no longer fits is written as skipped with the reason; one that fails or runs past its limit is written with its
error line and the next part runs. Nothing here imports mlflow or ray (tracking stays off).

`--cpu --model test_vit --size 64 --n-test 8 --folds 2` runs the same code on a CPU in a minute (the tests do).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from biomass.bench.common import machine
from biomass.errors import BiomassError, suggest

GOLD_MODEL = "vit_huge_plus_patch16_dinov3.lvd1689m"


@dataclass(frozen=True)
class Part:
    name: str
    floor_gpu_s: float  # the least time for a useful result on an H100 (gold's sizes)
    floor_cpu_s: float  # ... with --cpu at a toy size

    def floor(self, cpu: bool) -> float:
        return self.floor_cpu_s if cpu else self.floor_gpu_s


PARTS = (Part("train_bf16", 60, 8), Part("train_fp32", 90, 8), Part("seed_fp32", 90, 8),
         Part("chain_bf16", 120, 15), Part("chain_fp32", 90, 15), Part("aux_fp32", 75, 8), Part("aux_bf16", 60, 8),
         Part("jpeg_decode", 25, 5))


def versions() -> dict[str, Any]:
    """What the figures depend on: Python, torch (+ CUDA, cuDNN), timm, accelerate, the driver's device."""
    import importlib.metadata as md

    out: dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "timm", "accelerate", "torchvision", "opencv-python-headless", "pydantic",
                 "albumentations", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["cuda"], out["cudnn"] = torch.version.cuda, torch.backends.cudnn.version()
    except Exception as err:  # noqa: BLE001 - a broken torch is itself the finding
        out["torch_error"] = f"{type(err).__name__}: {err}"
    return out


def _die_with_parent() -> None:
    """In the child: SIGKILL when the parent dies (a killed bench leaves no part running on the device)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setsid()  # its own process group, so a time-out kills its workers too


class GpuBench:
    """One `bench gpu` call: the budget's clock, DIR/results.jsonl and DIR/log.txt, and what each part returned."""

    def __init__(self, args, argv: list[str]):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_path, self.log_path = self.out / "results.jsonl", self.out / "log.txt"
        self.deadline = time.monotonic() + args.budget
        info = machine()
        device = info.get("gpu") if not args.cpu and "gpu" in info else f"cpu: {info['cpu']} x{info['nproc']}"
        self.header = {"device": device, "versions": versions(),
                       "command": shlex.join([sys.executable, "-m", "biomass.bench", "gpu", *argv])}
        self.done: dict[str, dict[str, Any]] = {}

    def log(self, message: str) -> None:
        print(f"bench gpu: {message}", file=sys.stderr, flush=True)
        with open(self.log_path, "a") as f:
            f.write(f"bench gpu: {message}\n")

    def write(self, record: dict[str, Any]) -> None:
        """One line, written whole and synced: a kill after this returns cannot lose it."""
        line = json.dumps({**record, **self.header}, default=float) + "\n"
        with open(self.results_path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.done[record["part"]] = record

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self) -> dict[str, dict[str, Any]]:
        parts = selected(self.args.parts)
        with tempfile.TemporaryDirectory(prefix="bench_gpu_", dir=self.args.work) as work:
            for i, part in enumerate(parts):
                left = self.left()
                later = sum(p.floor(self.args.cpu) for p in parts[i + 1:])
                floor = part.floor(self.args.cpu)
                if left < floor:
                    self.write({"part": part.name, "status": "skipped", "reason": f"needs at least {floor:.0f} s, "
                                f"{max(left, 0):.0f} s left of the {self.args.budget:.0f} s budget"})
                    self.log(f"{part.name} skipped ({left:.0f} s left, needs {floor:.0f} s)")
                    continue
                self.run_part(part, max(floor, left - later), Path(work))
        return self.done

    def run_part(self, part: Part, limit: float, work: Path) -> None:
        cmd = [sys.executable, "-m", "biomass.bench", "gpu", "--part", part.name, "--limit", f"{limit:.1f}",
               "--work", str(work), *self.forwarded()]
        estimate = self.pass_estimate(part.name)
        if estimate:
            cmd += ["--pass-s", f"{estimate:.6g}"]
        self.log(f"{part.name}: limit {limit:.0f} s ...")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.args.cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        start = time.monotonic()
        with open(self.log_path, "a") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                    preexec_fn=_die_with_parent)
            try:
                stdout, _ = proc.communicate(timeout=limit)
                error = f"exit {proc.returncode}: {_last_error(self.log_path)}" if proc.returncode else None
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, _ = proc.communicate()
                error = f"ran past its limit of {limit:.0f} s and was killed"
        record: dict[str, Any] = {"part": part.name, "seconds": time.monotonic() - start, "limit_s": limit}
        if error is None:
            try:
                record.update(status="ok", **json.loads(stdout.strip().splitlines()[-1]))
            except (ValueError, IndexError):
                error = f"printed no result: {stdout[-300:]!r}"
        if error is not None:
            record.update(status="error", error=error)
        self.write(record)
        self.log(f"{part.name}: {record['status']} in {record['seconds']:.1f} s" +
                 (f" ({record['error']})" if "error" in record else ""))

    def forwarded(self) -> list[str]:
        a = self.args
        out = ["--model", a.model, "--size", str(a.size), "--batch", str(a.batch), "--aux-batch", str(a.aux_batch),
               "--steps", str(a.steps), "--repeats", str(a.repeats), "--n-test", str(a.n_test), "--folds",
               str(a.folds), "--width", str(a.width), "--height", str(a.height)]
        return out + (["--cpu"] if a.cpu else [])

    def pass_estimate(self, name: str) -> float | None:
        """Seconds one image takes through one model at inference, guessed from the train step of the same
        precision (a forward is about a third of a step; half is kept as margin): sizes the chain's subset."""
        if not name.startswith("chain_"):
            return None
        step = self.done.get("train_" + name.split("_")[1], {})
        return step["step_ms"] / 1000 / step["batch"] / 2 if step.get("status") == "ok" else None


def selected(names: str | None) -> tuple[Part, ...]:
    """The parts `--parts a,b` names, in the order of their value; all of them by default."""
    if not names:
        return PARTS
    asked = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in asked if n not in {p.name for p in PARTS}]
    if unknown:
        raise BiomassError(f"--parts: unknown part {unknown[0]!r}{suggest(unknown[0], [p.name for p in PARTS])}; "
                           f"the parts are {', '.join(p.name for p in PARTS)}")
    return tuple(p for p in PARTS if p.name in asked)


def _last_error(log: Path) -> str:
    """The child's last stderr line that says what went wrong (its `error: ...` line, or the exception)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines[-200:]):
        if ln.startswith("error:") or "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]:
            return ln[:500]
    return lines[-1][:500] if lines else "no stderr"


def gpu_bench(args, argv: list[str]) -> dict[str, Any]:
    """Run every part that fits the budget; returns {part: its line}. Each line is in DIR/results.jsonl already."""
    bench = GpuBench(args, argv)
    bench.log(f"budget {args.budget:.0f} s, results -> {bench.results_path}, {bench.header['device']}")
    start = time.perf_counter()
    parts = bench.run()
    return {"device": bench.header["device"], "versions": bench.header["versions"], "budget_s": args.budget,
            "seconds": time.perf_counter() - start, "results": str(bench.results_path), "parts": parts}


def add_arguments(p) -> None:
    p.add_argument("--budget", type=float, default=420, help="seconds for all parts together (default 420)")
    p.add_argument("--out", type=Path, default=Path("bench_gpu"),
                   help="folder for results.jsonl and log.txt (default ./bench_gpu)")
    p.add_argument("--model", default=GOLD_MODEL, help=f"timm model (default gold's {GOLD_MODEL})")
    p.add_argument("--size", type=int, default=800)
    p.add_argument("--batch", type=int, default=10, help="main stage's train batch (default gold's 10)")
    p.add_argument("--aux-batch", type=int, default=8, help="aux stage's train batch (default gold's 8)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-test", type=int, default=800, help="most test images for the chain (default 800)")
    p.add_argument("--folds", type=int, default=5, help="most main and aux folds for the chain (default 5)")
    p.add_argument("--width", type=int, default=2000)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--parts", help="comma-separated parts to run (default all), e.g. aux_fp32,aux_bf16 for a rerun")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (a check of this code, not a measurement)")
    p.add_argument("--work", type=Path, help="scratch folder for the chain's run directory (default: a temporary one)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--part", choices=[p.name for p in PARTS], help=argparse.SUPPRESS)
    p.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    p.add_argument("--pass-s", type=float, help=argparse.SUPPRESS)

