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
# Dense peaks in TFLOP/s by device-name substring (first match wins) and by the precision the matmuls ran in: MFU
# divides by the peak of the precision that ran (fp32 without TF32 has about 1/15 of H100's bf16 peak).
PEAK_TFLOPS = [("H200", {"bf16": 989, "tf32": 495, "fp32": 67}), ("H100", {"bf16": 989, "tf32": 495, "fp32": 67}),
               ("A100", {"bf16": 312, "tf32": 156, "fp32": 19.5}), ("L4", {"bf16": 121, "tf32": 60, "fp32": 30}),
               ("T4", {"bf16": 65, "tf32": 8.1, "fp32": 8.1})]  # T4: fp16 tensor cores; no bf16 or TF32 units


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The device's dense peak for `precision` ('bf16', 'tf32' or 'fp32'); None for a device not in the table."""
    return next((peaks[precision] for key, peaks in PEAK_TFLOPS if key in device_name), None)


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
