"""What every benchmark shares: the machine's description, the experiments the package ships, JSON or table output."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # the experiments shipped inside the package
GOLD = CONFIGS / "gold.yaml"
DEMO = CONFIGS / "demo.yaml"
# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, first match wins.
PEAK_BF16 = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("T4", 65e12)]


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version()}
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def gold_augment() -> list[dict[str, Any]]:
    """gold's main-stage train augmentation, read from the config the package ships."""
    from biomass.config.load import load_experiment

    return load_experiment(GOLD, ["data.root=/nonexistent"]).config.main.augment.train


def median_rate(times: list[float], n: int) -> float:
    return n / statistics.median(times)


def emit(result: dict[str, Any], as_json: bool, title: str, rows: list[tuple[str, str]]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, default=float) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)




def fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
