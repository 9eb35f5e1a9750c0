"""Benchmarks: `python -m biomass.bench {loader,train,infer,order,ridge} [options] [--json]`.

- `loader`: images/s per core (one thread, in-process) on 2000x1000 JPEGs for four pipelines: `decode` (cv2.imread
  alone, the limit), `seed` (the seed's order: full-resolution augmentation, A.Resize, float A.Normalize, ToTensorV2),
  `biomass` (ImageDataset over the JPEG reader with gold's train augmentations, uint8 CHW out) and `cached` (the same
  over the decoded-image cache, filled beforehand). Medians of interleaved repeats.
- `train`: training img/s and peak memory of our engine's step (engine.train_one_epoch: uint8 input normalised in the
  model, AdamW over trainable tensors, fused on CUDA, bf16 autocast and TF32 on CUDA, `--compile`: torch.compile)
  against a plain fp32 PyTorch loop in the seed's style (float input normalised on the CPU, loss.item() every step),
  each in its own process; MFU on CUDA; and the activations autograd keeps with and without the frozen prefix.
- `infer`: images/s of the whole `biomass.infer` chain on a run directory.
- `ridge`: an experiment (default the demo profile) trained on freshly rendered 2000x1000 data it has never seen,
  its submission scored beside the colour-histogram ridge's on the same split (biomass.baselines.versus_ridge).
- `order`: how far each augmentation is from commuting with the resize, and how the resize attenuates pixel noise.

`--json` prints exactly one JSON object on stdout; everything else goes to stderr. See docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GOLD = REPO / "experiments" / "gold.yaml"
# gold.yaml's main.augment.train, used when the experiments folder is not next to the package
GOLD_TRAIN_AUGMENT = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "VerticalFlip", "p": 0.5},
    {"name": "RandomBrightnessContrast", "brightness_limit": 0.2, "contrast_limit": 0.2, "p": 0.5},
    {"name": "HueSaturationValue", "hue_shift_limit": 10, "sat_shift_limit": 20, "val_shift_limit": 10, "p": 0.5},
    {"name": "GaussNoise", "std_range": [0.0124, 0.0277], "p": 0.3},
]
# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, first match wins.
PEAK_BF16 = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("T4", 65e12)]
TARGETS = {"biomass_vs_seed": 3.5, "biomass_vs_decode": 0.6, "cached_vs_decode": 3.0}


# ------------------------------------------------------------------------------------------------------ helpers
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
    if GOLD.is_file():
        import yaml

        return yaml.safe_load(GOLD.read_text())["main"]["augment"]["train"]
    return GOLD_TRAIN_AUGMENT


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


# ------------------------------------------------------------------------------------------------------- loader
def _image_set(data: Path | None, n: int, tmp: Path, crop: bool):
    """(root, image paths, {path: (h, w)}, crop boxes or None): `data` in Kaggle layout, a folder of JPEGs, or n
    fresh 2000x1000 demo images."""
    from biomass.data.table import check_images, read_crops, read_train

    if data is None:
        from biomass.data.synthetic import generate

        print(f"generating {n} 2000x1000 demo images into {tmp}", file=sys.stderr)
        root = generate(tmp / "data", n_train=n, n_test=1, seed=0, width=2000, height=1000)
    else:
        root = Path(data)
    if (root / "train.csv").is_file():
        paths = list(read_train(root)["image_path"])[:n]
    else:
        paths = sorted(str(p.relative_to(root)) for p in root.rglob("*.jp*g"))[:n]
    if not paths:
        raise SystemExit(f"no images under {root}")
    sizes = check_images(root, paths, "header")
    boxes = read_crops(root / "crops.csv", sizes) if crop and (root / "crops.csv").is_file() else None
    return root, paths, sizes, boxes


def _seed_pipeline(size: int):
    """The seed's train transform: augment at full resolution, then A.Resize, float A.Normalize, ToTensorV2."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    return A.Compose([
        A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomBrightnessContrast(0.2, 0.2, p=0.5),
        A.HueSaturationValue(10, 20, 10, p=0.5), A.GaussNoise(std_range=(0.0124, 0.0277), p=0.3),
        A.Resize(size, size), A.Normalize(), ToTensorV2(),
    ])


def loader_bench(data: Path | None, n: int, size: int, repeats: int, crop: bool, profile: bool) -> dict[str, Any]:
    import cv2
    import numpy as np
    import torch

    from biomass.data.cache import cached_reader
    from biomass.data.images import ImageDataset, build_augment, draw_seed, jpeg_reader

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root, paths, sizes, boxes = _image_set(data, n, tmp, crop)
        n = len(paths)
        files = [str(root / p) for p in paths]
        hw = (size, size)
        specs = gold_augment()
        zeros = np.zeros((n, 0), np.float32)
        ours = ImageDataset(jpeg_reader(root, paths, hw, boxes, sizes), n, zeros, None, build_augment(specs), 0)
        cache = cached_reader(tmp / "cache", root, paths, hw, boxes, sizes, quiet=True)  # filled here, untimed
        cached = ImageDataset(cache, n, zeros, None, build_augment(specs), 0)
        seed = _seed_pipeline(size)

        def run_seed(i: int, epoch: int):
            seed.set_random_seed(draw_seed(0, epoch, i))  # the draws ImageDataset makes for (epoch, i)
            img = cv2.cvtColor(cv2.imread(files[i], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            box = boxes.get(paths[i]) if boxes else None
            if box is not None:  # the seed trained on pre-cropped files; slicing costs nothing
                img = img[box[1]:box[3], box[0]:box[2]]
            return seed(image=img)["image"]

        pipelines = {
            "decode": lambda i, epoch: cv2.imread(files[i], cv2.IMREAD_COLOR),
            "seed": run_seed,
            "biomass": lambda i, epoch: ours[epoch * n + i],
            "cached": lambda i, epoch: cached[epoch * n + i],
        }
        for fn in pipelines.values():  # warm-up: page cache, lazy imports, the memory map
            fn(0, 0)
        times: dict[str, list[float]] = {k: [] for k in pipelines}
        for epoch in range(repeats):  # interleaved, so background load hits every pipeline alike
            for name, fn in pipelines.items():
                start = time.perf_counter()
                for i in range(n):
                    fn(i, epoch)
                times[name].append(time.perf_counter() - start)
        out: dict[str, Any] = {k: median_rate(v, n) for k, v in times.items()}
        out["biomass_vs_seed"] = out["biomass"] / out["seed"]
        out["biomass_vs_decode"] = out["biomass"] / out["decode"]
        out["cached_vs_decode"] = out["cached"] / out["decode"]
        out["targets"] = TARGETS
        out["met"] = {k: out[k] >= v for k, v in TARGETS.items()}
        src = sizes[paths[0]]
        out["settings"] = {"n": n, "size": [size, size], "source_hw": list(src), "crop_boxes": bool(boxes),
                           "repeats": repeats, "threads": 1, "unit": "images/s per core (median over repeats)",
                           "augment": specs, **machine()}
        out["runs_img_s"] = {k: [round(n / t, 2) for t in v] for k, v in times.items()}
        if profile:
            out["profile_ms"] = _profile(files[0], size, specs)
    return out


def _profile(file: str, size: int, specs: list[dict[str, Any]]) -> dict[str, float]:
    """Milliseconds per call of each step at this image and size (median of 15), transforms at p=1."""
    import albumentations as A
    import cv2

    from biomass.data.images import build_augment, draw_seed

    def ms(fn, k: int = 15) -> float:
        fn()
        t = []
        for _ in range(k):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
        return round(statistics.median(t) * 1000, 3)

    full = cv2.imread(file, cv2.IMREAD_COLOR)
    small = cv2.resize(full, (size, size), interpolation=cv2.INTER_LINEAR)
    out = {"imread_full": ms(lambda: cv2.imread(file, cv2.IMREAD_COLOR)),
           "resize_linear": ms(lambda: cv2.resize(full, (size, size), interpolation=cv2.INTER_LINEAR)),
           "resize_area": ms(lambda: cv2.resize(full, (size, size), interpolation=cv2.INTER_AREA)),
           "bgr2rgb_small": ms(lambda: cv2.cvtColor(small, cv2.COLOR_BGR2RGB))}
    aug = build_augment(specs)
    out["set_random_seed"] = ms(lambda: aug.set_random_seed(draw_seed(0, 1, 2)))
    for spec in specs:
        one = build_augment([{**spec, "p": 1.0}])
        out[f"{spec['name']}_p1_at_{size}"] = ms(lambda one=one: one(image=small))
        if spec["name"] == "GaussNoise":
            alb = A.Compose([A.GaussNoise(**{k: v for k, v in spec.items() if k not in ("name", "p")}, p=1.0)])
            out[f"GaussNoise_albumentations_p1_at_{size}"] = ms(lambda: alb(image=small))
    rgb = cv2.cvtColor(full, cv2.COLOR_BGR2RGB)
    for t in _seed_pipeline(size).transforms:
        name = type(t).__name__
        if name in ("Resize", "ToTensorV2"):
            continue
        one = A.Compose([t.__class__(**{**t.get_transform_init_args(), "p": 1.0})])
        src = small if name == "Normalize" else rgb
        out[f"seed_{name}_p1_at_{'size' if name == 'Normalize' else 'full'}"] = ms(lambda one=one, src=src:
                                                                                      one(image=src), 5)
    return out


# -------------------------------------------------------------------------------------------------------- train
def _stage(model: str, size: int, freeze: float, batch: int, grad_ckpt: bool):
    from biomass.config import load_experiment

    overrides = [f"main.model.backbone.model_name={model}", "main.model.backbone.weights=null",
                 f"main.model.backbone.freeze_fraction={freeze}", f"main.image.size=[{size},{size}]",
                 f"main.train.batch_size={batch}", f"main.model.backbone.grad_checkpointing={str(grad_ckpt).lower()}",
                 "aux=null"]
    return load_experiment(GOLD, overrides).config.main


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


def _peak_flops(device, override: float | None) -> float | None:
    import torch

    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16 if k in name), None)


def train_variant(variant: str, args) -> dict[str, Any]:
    """One measurement, in its own process (so the CPU peak RSS is this variant's)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from biomass.constants import IMAGENET_MEAN, IMAGENET_STD
    from biomass.engine import build_stage_model, make_optimizer, maybe_compile, train_one_epoch, unwrap
    from biomass.registry import load_components

    load_components()
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if variant == "saved":
        return {"variant": variant, "device": str(device), **_saved_activations(args)}
    stage = _stage(args.model, args.size, args.freeze, args.batch, args.grad_checkpointing)
    rss_before = _peak_memory(torch.device("cpu"))["peak_memory_mb"]
    torch.manual_seed(0)
    model, loss_fn = build_stage_model("main", stage, load_weights=False)
    loss_fn = loss_fn.to(device)
    g = torch.Generator().manual_seed(1)
    b, s = args.batch, args.size
    u8 = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g)
    tab, target = torch.randn(b, 2, generator=g), torch.randn(b, 5, generator=g)
    out: dict[str, Any] = {"variant": variant, "device": str(device)}
    if variant == "ours":
        from accelerate import Accelerator

        precision = args.precision or ("bf16" if cuda else "no")
        if cuda:  # as biomass.train does with runtime.tf32 (default true)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
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
        out["tf32"] = cuda
        out["compile"] = args.compile
        out["optimizer"] = f"AdamW over trainable tensors, fused={optimizer.defaults.get('fused')}"
    else:  # the seed's loop: fp32, normalised float input from the CPU, a host sync every step
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x32 = (u8.float() / 255 - mean) / std
        model.pixel_mean.zero_()  # the same model, fed already-normalised floats
        model.pixel_std.fill_(1.0)
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=stage.optim.lr, weight_decay=stage.optim.weight_decay)
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
        out["flops_per_step"] = flops
        out["achieved_tflops"] = flops / step_s / 1e12
        peak = _peak_flops(device, args.peak_tflops)
        if peak:
            out["mfu"] = flops / step_s / peak
            out["peak_tflops"] = peak / 1e12
    return out


def _saved_activations(args) -> dict[str, Any]:
    """Bytes autograd saves for backward in one training forward (batch 2: heads batch-normalise), frozen prefix
    vs nothing frozen. Each tensor counts once; parameters and their autocast copies are not counted (they exist
    anyway); a frozen prefix should save no activations at all."""
    import torch

    from biomass.models.model import build_model

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    freeze = args.freeze if args.freeze > 0 else 0.5
    out = {}
    for f in (0.0, freeze):
        torch.manual_seed(0)
        model = build_model(_stage(args.model, args.size, f, args.batch, args.grad_checkpointing), 5, 2,
                            load_weights=False).to(device).train()
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
    if "mfu" in ours:
        out["ours_mfu"], out["seed_mfu"] = ours["mfu"], seed.get("mfu")
    if "saved" in results:
        out["saved_activations"] = results["saved"]
    return out


# -------------------------------------------------------------------------------------------------------- infer
def infer_bench(run_dir: Path, data: Path, batch_size: int | None, repeats: int) -> dict[str, Any]:
    from biomass.config import load_yaml, validate
    from biomass.infer import infer

    cfg = validate(load_yaml(run_dir / "config.yaml"))
    times, n_images = [], 0
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        for _ in range(repeats):
            start = time.perf_counter()
            sub = infer(run_dir.resolve(), data.resolve(), Path(tmp) / "submission.csv", batch_size)
            times.append(time.perf_counter() - start)
            n_images = sub["sample_id"].str.rsplit("__", n=1).str[0].nunique()
    n_main = len(list(run_dir.glob("main/fold*/best.safetensors")))
    n_aux = len(list(run_dir.glob("aux/fold*/best.safetensors")))
    seconds = statistics.median(times)
    return {"images_per_s": n_images / seconds, "seconds": seconds, "images": int(n_images),
            "model_passes_per_image": n_main * len(cfg.infer.tta) + n_aux,
            "settings": {"run_dir": str(run_dir), "data": str(data), "repeats": repeats, "batch_size":
                         batch_size or cfg.infer.batch_size, "size": list(cfg.main.image.size),
                         "backbone": cfg.main.model.backbone.get("model_name"), "num_workers": cfg.data.num_workers,
                         "runs_s": times, **machine()}}


# -------------------------------------------------------------------------------------------------------- order
def order_bench(data: Path | None, size: int) -> dict[str, Any]:
    """Augment-then-resize (the seed) against resize-then-augment (ours), each transform alone with the same
    parameters, on one 2000x1000 demo image; and the resize's attenuation of per-pixel noise."""
    import albumentations as A
    import cv2
    import numpy as np

    from biomass.data.images import RESIZE, build_augment

    with tempfile.TemporaryDirectory() as tmp_name:
        root, paths, _, _ = _image_set(data, 1, Path(tmp_name), False)
        rgb = cv2.cvtColor(cv2.imread(str(root / paths[0]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]

    def resize(img, interp=RESIZE):
        return cv2.resize(img, (size, size), interpolation=interp)

    out: dict[str, Any] = {"source_hw": [h, w], "size": [size, size]}
    specs = [s for s in gold_augment() if s["name"] != "GaussNoise"]
    for spec in specs:
        diffs = []
        for seed in range(8):
            t = build_augment([{**spec, "p": 1.0}])
            t.set_random_seed(seed)
            a = resize(t(image=rgb)["image"]).astype(np.int16)
            t.set_random_seed(seed)
            b = t(image=resize(rgb))["image"].astype(np.int16)
            diffs.append(np.abs(a - b))
        d = np.stack(diffs)
        out[spec["name"]] = {"mean_abs": float(d.mean()), "max_abs": int(d.max()),
                             "share_differing": float((d > 0).mean())}
    noise = np.random.default_rng(0).standard_normal((h, w, 3)).astype(np.float32)
    out["noise_std_after_resize"] = {
        "linear": float(resize(noise, cv2.INTER_LINEAR).std()), "area": float(resize(noise, cv2.INTER_AREA).std())}
    lo, hi = next(s for s in gold_augment() if s["name"] == "GaussNoise")["std_range"]
    k = out["noise_std_after_resize"]["linear"]
    out["seed_noise_std_at_size_0_1"] = [lo * k, hi * k]
    grey = np.full((400, 400, 3), 128, np.uint8)
    for name, tr in (("ours", build_augment([{"name": "GaussNoise", "std_range": [0.02, 0.02], "p": 1.0}])),
                     ("albumentations", A.Compose([A.GaussNoise(std_range=(0.02, 0.02), p=1.0)]))):
        tr.set_random_seed(0)
        out[f"gaussnoise_std_{name}_nominal_5.1"] = float((tr(image=grey)["image"].astype(float) - 128).std())
    return out


# --------------------------------------------------------------------------------------------------------- main
def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biomass.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("loader", help="loader images/s per core: decode, seed, biomass, cached")
    p.add_argument("--data", type=Path, help="Kaggle-layout folder or folder of JPEGs (default: generate demo images)")
    p.add_argument("--n", type=int, default=24, help="images (default 24)")
    p.add_argument("--size", type=int, default=800, help="square output size (default 800, gold's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-crop", action="store_true", help="ignore crops.csv (gold's main stage uses it)")
    p.add_argument("--profile", action="store_true", help="also time each step alone (ms)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("train", help="training step: ours vs the seed's fp32 loop; MFU on CUDA")
    p.add_argument("--model", default="resnet18", help="timm model name (default resnet18)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--freeze", type=float, default=0.5, help="freeze_fraction (default 0.5, gold's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], help="ours (default: bf16 on CUDA, no on CPU)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile the prepared model (runtime.compile)")
    p.add_argument("--peak-tflops", type=float, help="device peak (dense bf16) for MFU, overrides the table")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (and MFU)")
    p.add_argument("--no-saved", action="store_true", help="skip the saved-activations check")
    p.add_argument("--variant", choices=["ours", "seed", "saved"], help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("infer", help="images/s of biomass.infer on a run directory")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("order", help="augment-then-resize vs resize-then-augment; noise attenuation")
    p.add_argument("--data", type=Path)
    p.add_argument("--size", type=int, default=800)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("ridge", help="an experiment vs the colour-histogram ridge on unseen data")
    p.add_argument("--experiment", type=Path, default=REPO / "experiments" / "demo.yaml")
    p.add_argument("--data", type=Path, help="Kaggle-layout folder with solution.csv (default: render a new one)")
    p.add_argument("--n-train", type=int, default=96)
    p.add_argument("--n-test", type=int, default=96)
    p.add_argument("--seed", type=int, default=123, help="render seed (default 123: used nowhere else)")
    p.add_argument("--width", type=int, default=2000)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--work", type=Path, help="keep data, run and submissions here (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for the experiment")
    p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    if args.cmd == "loader":
        r = loader_bench(args.data, args.n, args.size, args.repeats, not args.no_crop, args.profile)
        rows = [(k, f"{r[k]:.1f} img/s") for k in ("decode", "seed", "biomass", "cached")]
        rows += [(f"{k} (target >= {v:g})", f"{r[k]:.2f} {'ok' if r['met'][k] else 'MISSED'}")
                 for k, v in TARGETS.items()]
        rows += [(f"profile: {k}", f"{v:.2f} ms") for k, v in r.get("profile_ms", {}).items()]
        h, w = r["settings"]["source_hw"]
        emit(r, args.json, f"loader, images/s per core ({r['settings']['n']} images {w}x{h} -> "
                           f"{args.size}x{args.size})", rows)
    elif args.cmd == "train":
        if args.variant:
            sys.stdout.write(json.dumps(train_variant(args.variant, args), default=float) + "\n")
            return 0
        r = train_bench(args)
        rows = [("ours img/s", _fmt(r["ours_img_s"])), ("seed-style img/s", _fmt(r["seed_img_s"])),
                ("ours / seed", _fmt(r["ours_vs_seed"])),
                ("ours peak memory MB", _fmt(r["ours_peak_memory_mb"])),
                ("seed peak memory MB", _fmt(r["seed_peak_memory_mb"])), ("memory measure", r["peak_memory_kind"])]
        if "ours_mfu" in r:
            rows += [("ours MFU", f"{r['ours_mfu']:.1%}"), ("seed MFU (vs bf16 peak)", f"{r['seed_mfu']:.1%}")]
        if "saved_activations" in r:
            s = r["saved_activations"]
            rows += [(k, _fmt(v)) for k, v in s.items() if k.startswith("saved_mb")]
        emit(r, args.json, f"train step: {args.model} {args.size}px batch {args.batch} freeze {args.freeze}", rows)
    elif args.cmd == "ridge":
        from biomass.baselines import versus_ridge

        with tempfile.TemporaryDirectory() as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            r = versus_ridge(args.experiment, work, args.data, args.n_train, args.n_test, args.seed, args.width,
                             args.height, tuple(args.overrides))
        r["settings"] = {"n_train": args.n_train, "n_test": args.n_test, "seed": args.seed,
                         "size": [args.width, args.height], **machine()}
        emit(r, args.json, "experiment vs colour-histogram ridge (test weighted R2)",
             [(k, _fmt(r[k])) for k in ("ridge", "model", "margin", "cv", "cv_deployable")]
             + [(f"{k} s", _fmt(v)) for k, v in r["seconds"].items()])
    elif args.cmd == "infer":
        r = infer_bench(args.run_dir, args.data, args.batch_size, args.repeats)
        emit(r, args.json, "inference chain", [(k, _fmt(r[k])) for k in ("images_per_s", "seconds", "images",
                                                                           "model_passes_per_image")])
    else:
        r = order_bench(args.data, args.size)
        rows = []
        for k, v in r.items():
            rows.append((k, ", ".join(f"{a}={_fmt(b)}" for a, b in v.items()) if isinstance(v, dict) else _fmt(v)))
        emit(r, args.json, "augmentation order", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
