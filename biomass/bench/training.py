"""Training-step benchmark: our engine's step against a plain fp32 loop in the seed's style, each in its own process."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from biomass.bench.common import GOLD, machine, peak_tflops

def _stage(model: str, size: int, freeze: float, batch: int, grad_ckpt: bool, stage: str = "main"):
    """gold's `stage` section at this backbone, size, batch and freeze fraction (random init, no weights file)."""
    from biomass.config.load import load_experiment

    overrides = [f"{stage}.model.backbone.model_name={model}", "main.model.backbone.weights=null",
                 f"{stage}.model.backbone.freeze_fraction={freeze}", f"{stage}.image.size=[{size},{size}]",
                 f"{stage}.train.batch_size={batch}",
                 f"{stage}.model.backbone.grad_checkpointing={str(grad_ckpt).lower()}"]
    if stage == "main":
        overrides.append("aux=null")
    return getattr(load_experiment(GOLD, overrides).config, stage)


class _Batches:
    """`steps` copies of one batch, moved to the device each step as the prepared DataLoader would."""

    def __init__(self, batch: dict, steps: int, device):
        self.batch, self.steps, self.device = batch, steps, device

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield {k: v.to(self.device, non_blocking=True) for k, v in self.batch.items()}


def _peak_memory(device) -> dict[str, Any]:
    import resource

    import torch

    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
                "peak_memory_kind": "torch.cuda.max_memory_allocated"}
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_memory_kind": "process peak RSS (CPU approximation: includes Python, torch and the model)"}


def _peak(device, precision: str, override: float | None) -> float | None:
    """TFLOP/s the device can do in `precision` (`--peak-tflops` overrides the table); None: unknown (a CPU)."""
    import torch

    if override:
        return override
    return peak_tflops(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else None


FLOPS_COUNTED = ("executed FLOPs of one training step (torch FlopCounterMode: forward, backward and no weight "
                 "gradients for the frozen half); MFU = achieved / the dense peak of the precision that ran")


def train_variant(variant: str, args) -> dict[str, Any]:
    """One measurement, in its own process (so the CPU peak RSS is this variant's)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from biomass.constants import IMAGENET_MEAN, IMAGENET_STD
    from biomass.engine.build import build_stage_model, make_optimizer, maybe_compile, unwrap
    from biomass.engine.loop import train_one_epoch
    from biomass.stages import by_name
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if variant == "saved":
        return {"variant": variant, "device": str(device), **_saved_activations(args)}
    stage_name = getattr(args, "stage", "main")
    stage = _stage(args.model, args.size, args.freeze, args.batch, args.grad_checkpointing, stage_name)
    rss_before = _peak_memory(torch.device("cpu"))["peak_memory_mb"]
    torch.manual_seed(0)
    model, loss_fn = build_stage_model(by_name(stage_name), stage, load_weights=False)
    loss_fn = loss_fn.to(device)
    g = torch.Generator().manual_seed(1)
    b, s = args.batch, args.size
    u8 = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g)
    n_tab, n_target = len(by_name(stage_name).inputs), len(by_name(stage_name).targets)
    tab, target = torch.randn(b, n_tab, generator=g), torch.randn(b, n_target, generator=g)
    out: dict[str, Any] = {"variant": variant, "stage": stage_name, "device": str(device), "batch": b,
                           "size": s, "freeze": args.freeze}
    if variant == "ours":
        from accelerate import Accelerator

        precision = args.precision or ("bf16" if cuda else "no")
        tf32 = cuda and precision != "no"  # fp32 as the seed: no TF32 (gold's runtime.tf32: false)
        if cuda:  # as engine.build.make_accelerator does with runtime.tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        accelerator = Accelerator(mixed_precision=precision, cpu=not cuda)
        optimizer = make_optimizer(model, stage, accelerator.device)
        model, optimizer = accelerator.prepare(model, optimizer)
        model = maybe_compile(model, args.compile)
        batch = {"image": u8, "tabular": tab, "target": target}
        if cuda:
            batch = {k: v.pin_memory() for k, v in batch.items()}

        def run(steps: int, net=None) -> None:
            net = model if net is None else net
            train_one_epoch(accelerator, net, _Batches(batch, steps, device), loss_fn, optimizer, stage)

        def one_step() -> None:  # FLOPs are counted on the eager module: compiled kernels hide their aten ops
            run(1, unwrap(accelerator, model))

        out["precision"] = precision
        out["tf32"] = tf32
        matmuls = "bf16" if precision in ("bf16", "fp16") else "tf32" if tf32 else "fp32"  # fp16 peak = bf16's
        out["compile"] = args.compile
        out["optimizer"] = f"AdamW over trainable tensors, fused={optimizer.defaults.get('fused')}"
    else:  # the seed's loop: fp32 (no TF32), normalised float input from the CPU, a host sync every step
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x32 = (u8.float() / 255 - mean) / std
        model.pixel_mean.zero_()  # the same model, fed already-normalised floats
        model.pixel_std.fill_(1.0)
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=stage.optim["lr"], weight_decay=stage.optim["weight_decay"])
        batch = {"image": x32, "tabular": tab, "target": target}
        if cuda:
            batch = {k: v.pin_memory() for k, v in batch.items()}

        def run(steps: int) -> None:
            running = 0.0
            for item in _Batches(batch, steps, device):
                optimizer.zero_grad()
                loss = loss_fn(model(item["image"], item["tabular"]), item["target"])
                loss.backward()
                optimizer.step()
                running += loss.item()

        one_step = lambda: run(1)  # noqa: E731
        out["precision"] = "fp32"
        out["tf32"] = False
        matmuls = "fp32"
        out["optimizer"] = "AdamW over trainable tensors, default (foreach) implementation"
    run(args.warmup)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run(args.steps)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times) / args.steps
    out.update({"img_s": b / step_s, "step_ms": step_s * 1000, **_peak_memory(device),
                "rss_before_model_mb": rss_before,
                "trainable_tensors": sum(p.requires_grad for p in model.parameters()),
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6})
    if not args.no_flops:
        with FlopCounterMode(display=False) as counter:
            one_step()
        flops = counter.get_total_flops()
        peak = _peak(device, matmuls, args.peak_tflops)
        out.update({"flops_per_step": flops, "achieved_tflops": flops / step_s / 1e12, "peak_tflops": peak,
                    "peak_precision": matmuls, "mfu": flops / step_s / (peak * 1e12) if peak else None,
                    "flops_counted": FLOPS_COUNTED})
        if not peak:
            out["mfu_note"] = f"no {matmuls} peak known for {device.type}: MFU not computed"
    return out


def _saved_activations(args) -> dict[str, Any]:
    """Bytes autograd saves for backward in one training forward (batch 2: heads batch-normalise), frozen prefix
    vs nothing frozen. Each tensor counts once; parameters and their autocast copies are not counted (they exist
    anyway); a frozen prefix should save no activations at all."""
    import torch

    from biomass.engine.build import build_stage_model
    from biomass.stages import MAIN

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    freeze = args.freeze if args.freeze > 0 else 0.5
    out = {}
    for f in (0.0, freeze):
        torch.manual_seed(0)
        model = build_stage_model(MAIN, _stage(args.model, args.size, f, args.batch, args.grad_checkpointing),
                                  load_weights=False)[0].to(device).train()
        seen = {p.data_ptr() for p in model.parameters()}
        total = [0]

        def pack(t: torch.Tensor):
            fn = t.grad_fn  # an autocast copy of a parameter: ToCopyBackward0 fed by AccumulateGrad
            param_copy = fn is not None and fn.name() == "ToCopyBackward0" and any(
                f is not None and "AccumulateGrad" in f.name() for f, _ in fn.next_functions)
            if t.data_ptr() not in seen and not param_copy:
                seen.add(t.data_ptr())
                total[0] += t.numel() * t.element_size()
            return t

        x = torch.randint(0, 256, (2, 3, args.size, args.size), dtype=torch.uint8, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                model(x, torch.zeros(2, 2, device=device)).sum().backward()
        out[f"saved_mb_freeze_{f:g}"] = total[0] / 2**20
    out["saved_ratio"] = out[f"saved_mb_freeze_{freeze:g}"] / max(out["saved_mb_freeze_0"], 1e-12)
    out["saved_freeze"] = freeze
    return out


def train_bench(args) -> dict[str, Any]:
    common = ["--model", args.model, "--size", str(args.size), "--batch", str(args.batch), "--freeze",
              str(args.freeze), "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats",
              str(args.repeats)]
    for flag in ("cpu", "no_flops", "grad_checkpointing", "compile"):
        if getattr(args, flag):
            common.append("--" + flag.replace("_", "-"))
    for opt in ("precision", "peak_tflops", "threads"):
        if getattr(args, opt):
            common += ["--" + opt.replace("_", "-"), str(getattr(args, opt))]
    variants = ["ours", "seed"] + ([] if args.no_saved else ["saved"])
    results = {}
    for v in variants:
        print(f"train bench: running {v} ...", file=sys.stderr)
        proc = subprocess.run([sys.executable, "-m", "biomass.bench", "train", "--variant", v, "--json", *common],
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
        if proc.returncode:
            raise SystemExit(f"train bench variant {v} failed (exit {proc.returncode})")
        results[v] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, seed = results["ours"], results["seed"]
    out = {"ours_img_s": ours["img_s"], "seed_img_s": seed["img_s"], "ours_vs_seed": ours["img_s"] / seed["img_s"],
           "ours_peak_memory_mb": ours["peak_memory_mb"], "seed_peak_memory_mb": seed["peak_memory_mb"],
           "peak_memory_kind": ours["peak_memory_kind"], "ours": ours, "seed": seed,
           "settings": {"model": args.model, "size": args.size, "batch": args.batch, "freeze": args.freeze,
                        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                        "grad_checkpointing": args.grad_checkpointing, "compile": args.compile, **machine()}}
    if ours.get("mfu") is not None:
        out["ours_mfu"], out["seed_mfu"] = ours["mfu"], seed.get("mfu")
    if "saved" in results:
        out["saved_activations"] = results["saved"]
    return out


