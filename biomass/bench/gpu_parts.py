"""The parts of `bench gpu`, each run in its own process (`bench gpu --part NAME --limit S`), printing one JSON object.

Train steps go through biomass.bench.training's measurement; the chain through biomass.submission as
`biomass.infer` runs it, on a run directory whose fold checkpoints are one random-init model per stage hard-linked
for every fold (the chain's work does not depend on the weights' values).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from biomass.bench.common import GOLD

GiB = 2**30
UNIQUE_PHOTOS = 16  # rendered test photos (0.2 s each at 2000x1000), hard-linked under as many names as needed
GOLD_IMAGES, GOLD_FOLDS = 800, 5  # Kaggle's hidden test set (about 800 photos) and gold's folds per stage
# Chain subsets, largest first: (images, folds per stage); the first whose predicted time fits is run.
CHAIN_SUBSETS = ((800, 5), (400, 3), (200, 2), (100, 2), (40, 1), (16, 1), (8, 1))
TRAIN_PARTS = {"train_bf16": ("ours", "bf16", "main"), "train_fp32": ("ours", "no", "main"),
               "seed_fp32": ("seed", None, "main"), "aux_fp32": ("ours", "no", "aux"),
               "aux_bf16": ("ours", "bf16", "aux")}
# The chain's precision settings, as experiments/gold.yaml and experiments/gold_bf16.yaml set them.
CHAIN_PRECISION = {"chain_bf16": ["runtime.mixed_precision=bf16", "runtime.tf32=true", "infer.weights_dtype=bfloat16"],
                   "chain_fp32": ["runtime.mixed_precision='no'", "runtime.tf32=false"]}


def run_part(args) -> dict[str, Any]:
    if args.part in TRAIN_PARTS:
        return train_part(args, *TRAIN_PARTS[args.part])
    if args.part in CHAIN_PRECISION:
        return chain_part(args, CHAIN_PRECISION[args.part])
    return jpeg_decode(args, Path(args.work))


def _gold_stage(stage: str):
    from biomass.config.load import load_experiment

    return getattr(load_experiment(GOLD, ["main.model.backbone.weights=null"]).config, stage)


def train_part(args, variant: str, precision: str | None, stage: str) -> dict[str, Any]:
    """One train step measurement (training.train_variant), with `bench memory`'s estimate of the same step."""
    from biomass.bench.training import _stage, train_variant

    gold = _gold_stage(stage)
    batch = args.batch if stage == "main" else args.aux_batch
    freeze = gold.model.backbone.get("freeze_fraction", 0.0)
    step = argparse.Namespace(model=args.model, size=args.size, batch=batch, freeze=freeze, steps=args.steps,
                              warmup=1, repeats=args.repeats, precision=precision, grad_checkpointing=False,
                              compile=False, peak_tflops=None, threads=None, cpu=args.cpu, no_flops=False,
                              stage=stage)
    out = train_variant(variant, step)
    out["peak_memory_gib"] = out["peak_memory_mb"] / 1024
    if variant == "ours":  # the estimate beside the measurement: a failed estimate costs no measurement
        try:
            from biomass.bench.memory import stage_memory

            est = stage_memory(stage, _stage(args.model, args.size, freeze, batch, False, stage),
                               "bf16" if precision == "bf16" else "fp32", False)
            out.update(estimate_train_peak_gib=est["train_peak"] / GiB, estimate_method=est["method"],
                       measured_over_estimate=out["peak_memory_gib"] / (est["train_peak"] / GiB))
        except Exception as err:  # noqa: BLE001
            out["estimate_error"] = f"{type(err).__name__}: {err}"[:300]
    return out


def fake_run(root: Path, model: str, size: int, folds: int, overrides: list[str]) -> Path:
    """A completed run directory of gold at `size` with `folds` main and aux folds, one random-init model per
    stage hard-linked as every fold's checkpoint; config, folds table and status as training writes them. A run
    built earlier in `root/models` lends its checkpoints (a second chain part builds no model)."""
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
                                 f"infer.fold_weights=[{', '.join(['1.0'] * folds)}]", *overrides]).config
    models = RunDir(root / "models")
    run = RunDir.create("bench_gpu", root / f"run_{len(list(root.glob('run_*')))}", force=False)
    run.write_config(cfg)
    images = [f"train/{i}.jpg" for i in range(folds)]
    run.write_folds(pd.DataFrame({"image_id": [str(i) for i in range(folds)], "image_path": images}),
                    {stage: np.arange(folds) for stage in STAGES})
    for stage in STAGES:
        if not (models.checkpoint(stage, 0).is_file() and models.checkpoint_meta(stage, 0).is_file()):
            torch.manual_seed(0)
            m, _ = build_stage_model(stage, stage.config(cfg), load_weights=False)
            scalers = {"targets": Scaler(np.zeros(len(stage.targets)), np.ones(len(stage.targets)))}
            if stage.inputs:
                scalers["tabular"] = Scaler(np.zeros(len(stage.inputs)), np.ones(len(stage.inputs)))
            meta = {"stage": stage.name, "scalers": {k: s.to_dict() for k, s in scalers.items()}}
            save_checkpoint(m, models.checkpoint(stage, 0), meta)
            del m
        for k in range(folds):
            run.fold_dir(stage, k).mkdir(parents=True, exist_ok=True)
            os.link(models.checkpoint(stage, 0), run.checkpoint(stage, k))
            os.link(models.checkpoint_meta(stage, 0), run.checkpoint_meta(stage, k))
    run.write_status({"status": "completed"})
    return run.path


def rendered_photos(root: Path, unique: int, width: int, height: int) -> list[Path]:
    """`unique` rendered test photos, rendered once per scratch folder (every later part reuses them)."""
    from biomass.data.synthetic import generate

    rendered = root / "rendered"
    if not rendered.is_dir():
        generate(rendered, n_train=1, n_test=unique, seed=7, width=width, height=height)
    return sorted((rendered / "test").glob("*.jpg"))


def kaggle_layout(root: Path, n: int, photos: list[Path]) -> Path:
    """Kaggle's test layout with n images: the photos hard-linked under n names."""
    import pandas as pd

    from biomass.constants import TARGETS

    data = root / f"test_data_{n}"
    (data / "test").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"ID{i:09d}"
        if not (data / "test" / f"{name}.jpg").exists():
            os.link(photos[i % len(photos)], data / "test" / f"{name}.jpg")
        rows += [(f"{name}__{t}", f"test/{name}.jpg", t) for t in TARGETS]
    pd.DataFrame(rows, columns=["sample_id", "image_path", "target_name"]).to_csv(data / "test.csv", index=False)
    return data


def fold_load_seconds(run_dir: Path) -> dict[str, float]:
    """Seconds to build and load one fold model of each stage as the chain does (biomass.chain.Chain.load), to the
    device, in the config's inference dtype."""
    import torch

    from biomass.chain import Chain
    from biomass.engine.build import make_accelerator
    from biomass.rundir import RunDir
    from biomass.stages import STAGES

    run = RunDir(run_dir)
    cfg = run.completed()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = cfg.model_copy(deep=True)
    cfg.infer.ttt = None  # loading a fold model does not involve test-time training
    chain = Chain(make_accelerator(cfg), run, cfg)  # the accelerator the submission's chain uses, too
    out = {}
    for stage in STAGES:
        start = time.perf_counter()
        fm = chain.load(stage, 0, getattr(torch, cfg.infer.weights_dtype))
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[stage.name] = time.perf_counter() - start
        del fm
    return out


def _decode_seconds(photos: list[Path]) -> float:
    """Seconds to read and decode one photo on one core (the chain decodes each test image once)."""
    import cv2

    start = time.perf_counter()
    for p in photos[:8]:
        cv2.imread(str(p), cv2.IMREAD_COLOR)
    return (time.perf_counter() - start) / len(photos[:8])


def chain_part(args, overrides: list[str]) -> dict[str, Any]:
    """The chain on the largest subset predicted to fit half the time left, and its extrapolation to gold's."""
    import torch

    from biomass.rundir import RunDir
    from biomass.submission import write_submission

    start = time.monotonic()
    work = Path(args.work)
    run = fake_run(work, args.model, args.size, args.folds, overrides)
    load = fold_load_seconds(run)
    tta = len(RunDir(run).completed().infer.tta)
    photos = rendered_photos(work, min(args.n_test, UNIQUE_PHOTOS), args.width, args.height)  # before sizing
    decode_s = _decode_seconds(photos)
    pass_s, left = args.pass_s, args.limit - (time.monotonic() - start)
    candidates = [(min(n, args.n_test), min(f, args.folds)) for n, f in ((args.n_test, args.folds), *CHAIN_SUBSETS)]
    if pass_s:
        predict = lambda n, f: (n * (decode_s + f * (1 + tta) * pass_s)  # noqa: E731
                                + f * (load["aux"] + load["main"]))
        n, f = next(((n, f) for n, f in candidates if predict(n, f) <= 0.5 * left), candidates[-1])
    elif args.cpu:  # a check of the code: the sizes asked for
        n, f = candidates[0]
    else:  # no train step of this precision to size by: the small subsets the issue names
        n, f = (200, 2) if "bf16" in args.part else (40, 1)
        n, f = min(n, args.n_test), min(f, args.folds)
    data = kaggle_layout(work, n, photos)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    write_submission(run, data, work / "submission.csv", main_folds=list(range(f)), aux_folds=list(range(f)))
    chain_s = time.perf_counter() - t0
    passes = f * (1 + tta)  # per image: f aux models, f main models x tta views
    measured_pass_s = (chain_s - f * (load["aux"] + load["main"])) / (n * passes)
    gold_passes = GOLD_FOLDS * (1 + tta)
    out = {"images": n, "folds": f, "tta_views": tta, "model_passes_per_image": passes, "chain_s": chain_s,
           "images_per_s": n / chain_s, "fold_load_aux_s": load["aux"], "fold_load_main_s": load["main"],
           "fold_loads_s": f * (load["aux"] + load["main"]), "pass_s": measured_pass_s,
           "pass_s_predicted": pass_s, "decode_s": decode_s, "subset_rule": "the largest of CHAIN_SUBSETS "
           "predicted to fit half the time left: images x (decode_s + folds x (1 + tta) x pass_s_predicted) + "
           "folds x (fold_load_aux_s + fold_load_main_s)",
           "precision_overrides": overrides,
           "extrapolation_formula": f"{GOLD_FOLDS} x fold_load_aux_s + {GOLD_FOLDS} x fold_load_main_s + "
                                    f"{GOLD_IMAGES} x ({GOLD_FOLDS} + {GOLD_FOLDS} x {tta}) x pass_s, pass_s = "
                                    "(chain_s - fold_loads_s) / (images x model_passes_per_image)",
           f"extrapolated_{GOLD_IMAGES}_images_{GOLD_FOLDS}+{GOLD_FOLDS}_folds_s":
               GOLD_FOLDS * (load["aux"] + load["main"]) + GOLD_IMAGES * gold_passes * measured_pass_s}
    if cuda:
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / GiB
    return out


def jpeg_decode(args, work: Path) -> dict[str, Any]:
    """cv2.imdecode on one core and on all cores (a thread each: cv2 releases the GIL), against torchvision's
    decode_jpeg on the device, batched, where it works; images/s of 2000x1000 JPEGs held in memory."""
    import cv2
    import numpy as np
    import torch

    photos = rendered_photos(work, min(args.n_test, UNIQUE_PHOTOS), args.width, args.height)
    unique = [p.read_bytes() for p in photos]
    cores = os.cpu_count() or 1
    blobs = (unique * (4 * cores // len(unique) + 1))[:max(4 * cores, len(unique))]
    decode = lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)  # noqa: E731
    cv2.setNumThreads(1)
    start = time.perf_counter()
    for b in blobs[:len(unique)]:
        decode(b)
    one_core = len(unique) / (time.perf_counter() - start)
    with ThreadPoolExecutor(cores) as pool:
        start = time.perf_counter()
        list(pool.map(decode, blobs))
        all_cores = len(blobs) / (time.perf_counter() - start)
    h, w = decode(unique[0]).shape[:2]
    out: dict[str, Any] = {"size": [h, w], "cpu_cores": cores, "cpu_cv2_one_core_img_s": one_core,
                           "cpu_cv2_all_cores_img_s": all_cores, "images": len(blobs)}
    if not torch.cuda.is_available():
        out["gpu"] = "no CUDA device: GPU decode not measured"
        return out
    try:
        from torchvision.io import decode_jpeg

        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        decode_jpeg(data[:1], device="cuda")  # does it work here at all (nvJPEG), and warm its handles
        torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 - the finding is that it does not work here
        out["gpu"] = f"torchvision decode_jpeg on cuda failed: {type(err).__name__}: {err}"[:300]
        return out
    times = []
    for _ in range(3):
        start = time.perf_counter()
        decode_jpeg(data, device="cuda")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    out["gpu_decode_jpeg_img_s"] = len(blobs) / statistics.median(times)
    out["gpu_vs_cpu_all_cores"] = out["gpu_decode_jpeg_img_s"] / all_cores
    return out
