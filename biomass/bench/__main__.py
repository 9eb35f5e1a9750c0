"""Benchmarks: `python -m biomass.bench {loader,train,infer,order,ridge,gpu,wheelhouse,memory,sweep} [options]`.

- `loader`: images/s per core (one thread, in-process) on 2000x1000 JPEGs for four pipelines: `decode` (cv2.imread
  alone, the limit), `seed` (the seed's order: full-resolution augmentation, A.Resize, float A.Normalize, ToTensorV2),
  `biomass` (ImageDataset over the JPEG reader with gold's train augmentations, uint8 CHW out) and `cached` (the same
  over the decoded-image cache, filled beforehand). Medians of interleaved repeats.
- `train`: training img/s and peak memory of our engine's step (engine.train_one_epoch: uint8 input normalised in the
  model, AdamW over trainable tensors, fused on CUDA, bf16 autocast and TF32 on CUDA, `--compile`: torch.compile)
  against a plain fp32 PyTorch loop in the seed's style (float input normalised on the CPU, loss.item() every step),
  each in its own process; MFU on CUDA; and the activations autograd keeps with and without the frozen prefix.
- `infer`: images/s of the whole inference chain (`biomass.infer`) on a run directory.
- `ridge`: an experiment (default the demo profile) trained on freshly rendered 2000x1000 data it has never seen,
  its submission scored beside the colour-histogram ridge's and the linear probe's on the same split
  (biomass.baselines.versus_baselines).
- `gpu --budget S --out DIR`: what only a GPU shows, within a budget, each part's line in DIR/results.jsonl as it
  ends: gold's train step (bf16, fp32 as the seed, the seed's loop) with MFU against the peak of the precision that
  ran, the inference chain on a subset sized to the time left and its extrapolation to 800 images x 5+5 folds, the
  aux stage's step beside its memory estimate, GPU JPEG decode (biomass.bench.gpu).
- `wheelhouse DIR`: the wheels the lent GPU machine's image lacks (biomass.pack.wheels), for scripts/gpu_check.sh.
- `memory`: each stage's peak GPU memory at its real size and batch (fp32/bf16, with and without gradient
  checkpointing), estimated on the meta device, and which common GPUs fit training and fold-at-a-time inference.
- `sweep`: 4 tiny children as one ablation sweep at --parallel 1 and 2 (local executor, and Ray when installed):
  the wall-time ratio and the per-child overhead (process start, Ray task start).
- `order`: how far each augmentation is from commuting with the resize, and how the resize attenuates pixel noise.

`--json` prints exactly one JSON object on stdout; everything else goes to stderr. See docs/BENCHMARKS.md.
Nothing here imports mlflow or ray at module level: `gpu` runs on an image that has neither.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from biomass.bench.common import DEMO, emit, fmt, machine
from biomass.errors import run_cli


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
    p.add_argument("--peak-tflops", type=float,
                   help="device peak (dense TFLOP/s) of the precision that runs; overrides the table")
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
    p = sub.add_parser("ridge", help="an experiment vs the colour ridge and its linear probe on unseen data")
    p.add_argument("experiment_file", nargs="?", type=Path, metavar="EXPERIMENT", help="default: the demo")
    p.add_argument("--experiment", type=Path, help=argparse.SUPPRESS)  # the older spelling
    p.add_argument("--data", type=Path, help="Kaggle-layout folder with solution.csv (default: render a new one)")
    p.add_argument("--n-train", type=int, default=96)
    p.add_argument("--n-test", type=int, default=96)
    p.add_argument("--seed", type=int, default=123, help="render seed (default 123: used nowhere else)")
    p.add_argument("--width", type=int, default=2000)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--work", type=Path, help="keep data, run and submissions here (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for the experiment")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("gpu", help="within --budget: gold's train steps, the chain, the aux step, GPU decode")
    from biomass.bench.gpu import add_arguments

    add_arguments(p)
    p = sub.add_parser("sweep", help="4 tiny children at --parallel 1 and 2: wall-time ratio, per-child overhead")
    p.add_argument("--executor", action="append", choices=["local", "ray"],
                   help="repeat for several (default: local, and ray when installed)")
    p.add_argument("--work", type=Path, help="keep data and sweeps here (default: a temporary folder)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("wheelhouse", help="download the wheels the lent GPU machine's image lacks (pydantic ...)")
    p.add_argument("dest", type=Path, help="folder for the wheels (carry it to the device call, e.g. .whl)")
    p.add_argument("--image", default="gpu", help="which offline image (biomass.pack.wheels.IMAGES; default gpu)")
    p.add_argument("--python-version", help="e.g. 3.11 to rehearse on this machine (default: the image's Python)")
    p = sub.add_parser("memory", help="peak GPU memory per stage (meta-device estimate) and which GPUs fit it")
    p.add_argument("experiment", type=Path)
    p.add_argument("overrides", nargs="*", help="key=value overrides for the experiment")
    p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "gpu" and args.part:  # one part, in the process bench gpu started for it
        import contextlib
        import json

        from biomass.bench.gpu_parts import run_part

        with contextlib.redirect_stdout(sys.stderr):
            r = run_part(args)
        sys.stdout.write(json.dumps(r, default=float) + "\n")
        return 0
    if args.cmd == "gpu":
        from biomass.bench.gpu import gpu_bench

        r = gpu_bench(args, sys.argv[2:] if argv is None else argv[1:])
        rows = [(f"{part} {k}", fmt(v)) for part, line in r["parts"].items() for k, v in line.items()
                if k in ("status", "reason", "error", "img_s", "mfu", "achieved_tflops", "peak_memory_gib",
                         "estimate_train_peak_gib", "images_per_s", "extrapolated_800_images_5+5_folds_s",
                         "cpu_cv2_all_cores_img_s", "gpu_decode_jpeg_img_s", "gpu")]
        emit(r, args.json, f"GPU checks ({r['device']}), every line in {r['results']}", rows)
        return 0
    if args.cmd == "wheelhouse":
        from biomass.pack.wheels import MiB, download, image_named, install_line

        image = image_named(args.image)
        wheels = download(image, args.dest, args.python_version)
        total = sum(w.stat().st_size for w in wheels) / MiB
        print(f"{len(wheels)} wheels, {total:.1f} MiB, for the {image.name} image (Python "
              f"{args.python_version or image.python}) in {args.dest}:", *(f"  {w.name}" for w in wheels),
              "install there with:", f"  {install_line(args.dest)}", sep="\n")
        return 0
    if args.cmd == "memory":
        import json

        from biomass.bench.memory import experiment_memory, print_report
        from biomass.config.load import load_experiment

        r = experiment_memory(load_experiment(args.experiment, args.overrides).config)
        print(json.dumps(r, indent=1, default=float)) if args.json else print_report(r)
        return 0

    if args.cmd == "sweep":
        from biomass.bench.sweep import sweep_bench

        with tempfile.TemporaryDirectory() as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            r = {**sweep_bench(work, args.executor), "machine": machine()}
        rows = []
        for ex, v in r.items():
            if ex == "machine":
                continue
            rows += [(f"{ex}: wall parallel 1 / 2 (s)", f"{v['parallel_1']['wall_s']:.1f} / {v['parallel_2']['wall_s']:.1f}"),
                     (f"{ex}: speedup (goal >= 1.6)", fmt(v["speedup"])),
                     (f"{ex}: process start per child (s, median)", fmt(v["parallel_2"]["process_start_s_median"]))]
            if "task_start_s_median" in v["parallel_2"]:
                rows.append((f"{ex}: Ray task start per child (s, median)",
                             fmt(v["parallel_2"]["task_start_s_median"])))
        emit(r, args.json, "sweep: 4 tiny children, --parallel 1 vs 2", rows)
        return 0

    if args.cmd == "loader":
        from biomass.bench.loader import TARGETS, loader_bench

        r = loader_bench(args.data, args.n, args.size, args.repeats, not args.no_crop, args.profile)
        rows = [(k, f"{r[k]:.1f} img/s") for k in ("decode", "seed", "biomass", "cached")]
        rows += [(f"{k} (target >= {v:g})", f"{r[k]:.2f} {'ok' if r['met'][k] else 'MISSED'}")
                 for k, v in TARGETS.items()]
        rows += [(f"profile: {k}", f"{v:.2f} ms") for k, v in r.get("profile_ms", {}).items()]
        h, w = r["settings"]["source_hw"]
        emit(r, args.json, f"loader, images/s per core ({r['settings']['n']} images {w}x{h} -> "
                           f"{args.size}x{args.size})", rows)
    elif args.cmd == "train":
        from biomass.bench.training import train_bench, train_variant

        if args.variant:
            import json

            sys.stdout.write(json.dumps(train_variant(args.variant, args), default=float) + "\n")
            return 0
        r = train_bench(args)
        rows = [("ours img/s", fmt(r["ours_img_s"])), ("seed-style img/s", fmt(r["seed_img_s"])),
                ("ours / seed", fmt(r["ours_vs_seed"])),
                ("ours peak memory MB", fmt(r["ours_peak_memory_mb"])),
                ("seed peak memory MB", fmt(r["seed_peak_memory_mb"])), ("memory measure", r["peak_memory_kind"])]
        if "ours_mfu" in r:
            rows += [("ours MFU", f"{r['ours_mfu']:.1%}"), ("seed MFU (vs fp32 peak)", f"{r['seed_mfu']:.1%}")]
        if "saved_activations" in r:
            s = r["saved_activations"]
            rows += [(k, fmt(v)) for k, v in s.items() if k.startswith("saved_mb")]
        emit(r, args.json, f"train step: {args.model} {args.size}px batch {args.batch} freeze {args.freeze}", rows)
    elif args.cmd == "ridge":
        from biomass.baselines import versus_baselines

        experiment = args.experiment_file or args.experiment or DEMO
        with tempfile.TemporaryDirectory() as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            r = versus_baselines(experiment, work, args.data, args.n_train, args.n_test, args.seed, args.width,
                             args.height, tuple(args.overrides))
        r["settings"] = {"n_train": args.n_train, "n_test": args.n_test, "seed": args.seed,
                         "size": [args.width, args.height], **machine()}
        emit(r, args.json, "experiment vs colour-histogram ridge and linear probe (test weighted R2)",
             [(k, fmt(r[k])) for k in ("ridge", "probe", "model", "margin_ridge", "margin_probe", "cv",
                                        "cv_deployable")]
             + [(f"{k} s", fmt(v)) for k, v in r["seconds"].items()])
    elif args.cmd == "infer":
        from biomass.bench.inference import infer_bench

        r = infer_bench(args.run_dir, args.data, args.batch_size, args.repeats)
        emit(r, args.json, "inference chain", [(k, fmt(r[k])) for k in ("images_per_s", "seconds", "images",
                                                                           "model_passes_per_image")])
    else:
        from biomass.bench.loader import order_bench

        r = order_bench(args.data, args.size)
        rows = []
        for k, v in r.items():
            parts = {f"{k} {a}": b for a, b in v.items()} if isinstance(v, dict) and all(
                isinstance(b, dict) for b in v.values()) else {k: v}
            for name, value in parts.items():
                rows.append((name, ", ".join(f"{a}={fmt(b)}" for a, b in value.items()) if isinstance(value, dict)
                             else fmt(value)))
        emit(r, args.json, "augmentation order", rows)
    return 0


if __name__ == "__main__":
    run_cli(main)
