"""gold's train step in plain torch + timm, for a device where `biomass` does not import (scripts/gpu_check.sh).

    python scripts/torch_step.py --out DIR [--model M --size S --batch B --steps N --cpu]

The backbone as timm builds it (random init), a 5-output linear head, the first half of the parameter tensors frozen
(gold's freeze_fraction 0.5), AdamW over the rest; bf16 autocast + TF32 and fp32 without TF32, forward + backward +
step. Appends one JSON line per precision to DIR/results.jsonl (img/s, peak memory, executed FLOPs, MFU where the
device's peak is known). Imports nothing of biomass but its dependency-free peak table, when that imports.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode


def measure(args, precision: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    backbone = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.size)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, 5)).to(device).train()
    params = list(model.parameters())
    for p in params[: len(params) // 2]:
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=5e-5, fused=device.type == "cuda")
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randn(args.batch, 5, device=device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "bf16"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.smooth_l1_loss(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    matmuls = "bf16" if precision == "bf16" else "fp32"
    peak = None
    if device.type == "cuda":
        try:
            from biomass.bench.common import peak_tflops
            peak = peak_tflops(torch.cuda.get_device_name(0), matmuls)
        except ImportError:
            pass
    return {"part": f"fallback_{precision}", "status": "ok", "model": args.model, "size": args.size,
            "batch": args.batch, "img_s": args.batch / step_s, "step_ms": step_s * 1000,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "flops_per_step": flops, "achieved_tflops": flops / step_s / 1e12, "peak_tflops": peak,
            "peak_precision": matmuls, "mfu": flops / step_s / (peak * 1e12) if peak else None,
            "flops_counted": "executed FLOPs of one step (FlopCounterMode; no weight gradients for the frozen half)"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="vit_huge_plus_patch16_dinov3.lvd1689m")
    p.add_argument("--size", type=int, default=800)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cpu", action="store_true")
    args, _ = p.parse_known_args()  # bench gpu's other options are not ours
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    header = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu x{os.cpu_count()}",
              "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                           "cuda": torch.version.cuda}, "command": " ".join([sys.executable, *sys.argv])}
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for precision in ("bf16", "fp32"):
        try:
            line = measure(args, precision, device)
        except Exception as err:  # noqa: BLE001 - write it and go on to the next precision
            error = f"{type(err).__name__}: {err}"[:500]
            line, failed = {"part": f"fallback_{precision}", "status": "error", "error": error}, 1
        with open(args.out / "results.jsonl", "a") as f:
            f.write(json.dumps({**line, **header}) + "\n")
        print(json.dumps(line), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return failed


if __name__ == "__main__":
    sys.exit(main())
