"""`python -m biomass.bench gpu`: everything only a GPU shows, from a fresh checkout, in minutes on one H100/H200.

1. gold's stage-1 train step (vit_huge_plus_patch16_dinov3, 800 px, batch 10, random init, first half frozen):
   img/s, MFU and peak memory of our step in fp32 without TF32 (as the seed ran) and in bf16 + TF32 (gold_bf16),
   against the seed-style fp32 loop; each in its own process (biomass.bench.training).
2. The inference chain on N rendered test images (default 800) with gold's models at their real size: a run
   directory whose fold checkpoints are one random-init model per stage, hard-linked for every fold (the chain's
   work does not depend on the weights' values), through biomass.submission as `biomass.infer` runs it.
3. GPU JPEG decode: torchvision.io.decode_jpeg on the device against cv2 on one CPU core, 2000x1000 JPEGs.

`--cpu --model test_vit --size 64 --n-test 8 --folds 2` runs the same code on a CPU in seconds (the test suite does).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from biomass.bench.common import GOLD, machine

GOLD_MODEL = "vit_huge_plus_patch16_dinov3.lvd1689m"


def train_steps(args) -> dict[str, Any]:
    """Our step in fp32 and bf16, and the seed-style fp32 loop, at gold's size and batch."""
    common = ["--model", args.model, "--size", str(args.size), "--batch", str(args.batch), "--freeze", "0.5",
              "--steps", str(args.steps), "--warmup", "1", "--repeats", str(args.repeats), "--json"]
    if args.cpu:
        common += ["--cpu", "--no-flops"]
    runs = {"ours_fp32": ["--variant", "ours", "--precision", "no"],
            "ours_bf16": ["--variant", "ours", "--precision", "bf16"],
            "seed_fp32": ["--variant", "seed"]}
    out: dict[str, Any] = {}
    for name, extra in runs.items():
        print(f"bench gpu: train step {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "biomass.bench", "train", *extra, *common],
                              stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            out[name] = {"error": f"exit {proc.returncode}"}
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        out[name] = {k: r.get(k) for k in ("img_s", "step_ms", "mfu", "peak_memory_mb", "peak_memory_kind",
                                           "precision", "tf32", "optimizer")}
    if "img_s" in out.get("seed_fp32", {}):
        for name in ("ours_fp32", "ours_bf16"):
            if "img_s" in out.get(name, {}):
                out[name]["vs_seed_fp32"] = out[name]["img_s"] / out["seed_fp32"]["img_s"]
    return out


def fake_run(root: Path, model: str, size: int, folds: int) -> Path:
    """A completed run directory of gold at `size` with `folds` main and aux folds, one random-init model per
    stage hard-linked as every fold's checkpoint; config, folds table and status as training writes them."""
    import numpy as np
    import pandas as pd
    import torch

    from biomass.config.load import load_experiment
    from biomass.data.scalers import Scaler
    from biomass.engine.build import build_stage_model
    from biomass.engine.checkpoint import save_checkpoint
    from biomass.rundir import RunDir
    from biomass.stages import STAGES

    cfg = load_experiment(GOLD, [f"data.root={root}", "main.model.backbone.weights=null",
                                 f"main.model.backbone.model_name={model}", f"aux.model.backbone.model_name={model}",
                                 f"main.image.size=[{size},{size}]", f"aux.image.size=[{size},{size}]",
                                 f"main.folds.splitter.n_splits={folds}", f"aux.folds.splitter.n_splits={folds}",
                                 f"infer.fold_weights=[{', '.join(['1.0'] * folds)}]"]).config
    run = RunDir.create("bench_gpu", root / "run", force=False)
    run.write_config(cfg)
    images = [f"train/{i}.jpg" for i in range(folds)]
    run.write_folds(pd.DataFrame({"image_id": [str(i) for i in range(folds)], "image_path": images}),
                    {stage: np.arange(folds) for stage in STAGES})
    for stage in STAGES:
        torch.manual_seed(0)
        m, _ = build_stage_model(stage, stage.config(cfg), load_weights=False)
        scalers = {"targets": Scaler(np.zeros(len(stage.targets)), np.ones(len(stage.targets)))}
        if stage.inputs:
            scalers["tabular"] = Scaler(np.zeros(len(stage.inputs)), np.ones(len(stage.inputs)))
        meta = {"stage": stage.name, "scalers": {k: s.to_dict() for k, s in scalers.items()}}
        save_checkpoint(m, run.checkpoint(stage, 0), meta)
        for k in range(1, folds):
            run.fold_dir(stage, k).mkdir(parents=True, exist_ok=True)
            os.link(run.checkpoint(stage, 0), run.checkpoint(stage, k))
            os.link(run.checkpoint_meta(stage, 0), run.checkpoint_meta(stage, k))
        del m
    run.write_status({"status": "completed"})
    return run.path


def test_images(root: Path, n: int, unique: int, width: int, height: int) -> Path:
    """Kaggle's test layout with n images: `unique` rendered photos, linked under n names."""
    import pandas as pd

    from biomass.constants import TARGETS
    from biomass.data.synthetic import generate

    src = generate(root / "rendered", n_train=1, n_test=unique, seed=7, width=width, height=height)
    photos = sorted((src / "test").glob("*.jpg"))
    data = root / "test_data"
    (data / "test").mkdir(parents=True)
    rows = []
    for i in range(n):
        name = f"ID{i:09d}"
        os.link(photos[i % len(photos)], data / "test" / f"{name}.jpg")
        rows += [(f"{name}__{t}", f"test/{name}.jpg", t) for t in TARGETS]
    pd.DataFrame(rows, columns=["sample_id", "image_path", "target_name"]).to_csv(data / "test.csv", index=False)
    return data


def inference_chain(args, work: Path) -> dict[str, Any]:
    from biomass.submission import write_submission

    print(f"bench gpu: inference chain, {args.n_test} images, {args.folds}+{args.folds} folds ...", file=sys.stderr,
          flush=True)
    run = fake_run(work, args.model, args.size, args.folds)
    data = test_images(work, args.n_test, min(args.n_test, 40), args.width, args.height)
    import torch

    if torch.cuda.is_available() and not args.cpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    write_submission(run, data, work / "submission.csv")
    seconds = time.perf_counter() - start
    out = {"images": args.n_test, "folds": args.folds, "seconds": seconds, "images_per_s": args.n_test / seconds,
           "model_passes_per_image": args.folds * 3 + args.folds}
    if torch.cuda.is_available() and not args.cpu:
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def jpeg_decode(args, work: Path) -> dict[str, Any]:
    """decode_jpeg on the device (batched) against cv2.imdecode on one CPU core, images/s."""
    import cv2
    import numpy as np
    import torch

    from biomass.data.synthetic import generate

    src = generate(work / "jpegs", n_train=min(args.n_test, 16), n_test=0, seed=11, width=args.width,
                   height=args.height)
    blobs = [p.read_bytes() for p in sorted((src / "train").glob("*.jpg"))]
    cv2.setNumThreads(1)
    start = time.perf_counter()
    for b in blobs:
        cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
    out: dict[str, Any] = {"cpu_cv2_one_core_img_s": len(blobs) / (time.perf_counter() - start),
                           "size": [args.height, args.width]}
    if not torch.cuda.is_available() or args.cpu:
        out["gpu"] = "no CUDA device: GPU decode not measured"
        return out
    from torchvision.io import decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    decode_jpeg(data, device="cuda")  # warm-up: nvJPEG handles
    torch.cuda.synchronize()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        decode_jpeg(data, device="cuda")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    out["gpu_decode_jpeg_img_s"] = len(blobs) / statistics.median(times)
    return out


def gpu_bench(args) -> dict[str, Any]:
    import torch

    result: dict[str, Any] = {"machine": machine(), "cuda": torch.cuda.is_available() and not args.cpu,
                              "settings": {"model": args.model, "size": args.size, "batch": args.batch,
                                           "n_test": args.n_test, "folds": args.folds}}
    start = time.perf_counter()
    result["train_step"] = train_steps(args)
    with tempfile.TemporaryDirectory() as tmp:
        result["inference_chain"] = inference_chain(args, Path(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        result["jpeg_decode"] = jpeg_decode(args, Path(tmp))
    result["seconds"] = time.perf_counter() - start
    return result


def add_arguments(p) -> None:
    p.add_argument("--model", default=GOLD_MODEL, help=f"timm model (default gold's {GOLD_MODEL})")
    p.add_argument("--size", type=int, default=800)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-test", type=int, default=800, help="test images for the inference chain (default 800)")
    p.add_argument("--folds", type=int, default=5, help="main and aux folds of the inference chain (default 5)")
    p.add_argument("--width", type=int, default=2000)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--cpu", action="store_true", help="run on the CPU (a check of this code, not a measurement)")
    p.add_argument("--json", action="store_true")
