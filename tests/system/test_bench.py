"""`python -m biomass.bench`: each subcommand's `--json` is exactly one JSON object on stdout; tables otherwise."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from biomass.bench import common as bench_common
from biomass.bench import loader as bench_loader
from biomass.bench.__main__ import main as bench_main
from biomass.errors import BiomassError

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: int = 300) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "biomass.bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-2000:]  # exactly one object; progress goes to stderr
    out = json.loads(lines[0])
    assert isinstance(out, dict)
    return out


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@pytest.mark.slow
def test_loader_json(tmp_path):
    r = run_cli("loader", "--json", "--n", "3", "--size", "64", "--repeats", "1")
    for key in ("decode", "seed", "biomass", "cached", "biomass_vs_seed", "biomass_vs_decode", "cached_vs_decode"):
        assert positive(r[key]), key
    assert r["biomass_vs_seed"] == pytest.approx(r["biomass"] / r["seed"])
    assert r["cached_vs_decode"] == pytest.approx(r["cached"] / r["decode"])
    assert set(r["met"]) == set(r["targets"]) == set(bench_loader.TARGETS)
    s = r["settings"]
    assert s["n"] == 3 and s["size"] == [64, 64] and s["source_hw"] == [1000, 2000] and s["crop_boxes"] is True
    assert s["augment"] == bench_common.gold_augment()
    assert set(r["runs_img_s"]) == {"decode", "seed", "biomass", "cached"}


def test_gold_augment_is_read_from_the_packaged_gold():
    """The bench reads gold's list from the config the package ships (no copy of it to drift)."""
    assert bench_common.GOLD.is_file() and bench_common.GOLD.parent.name == "configs"
    assert bench_common.gold_augment()[0] == {"name": "HorizontalFlip", "p": 0.5}


def test_order_json_and_table(capsys):
    assert bench_main(["order", "--json", "--size", "32"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    r = json.loads(out[0])
    assert r["source_hw"] == [1000, 2000] and r["size"] == [32, 32]
    assert r["HorizontalFlip"]["max_abs"] == 0 and r["VerticalFlip"]["max_abs"] == 0  # flips commute with resize
    for name in ("RandomBrightnessContrast", "HueSaturationValue"):
        assert 0 <= r[name]["share_differing"] <= 1
    assert 0 < r["noise_std_after_resize"]["area"] < r["noise_std_after_resize"]["linear"] <= 1
    assert r["gaussnoise_std_ours_nominal_5.1"] == pytest.approx(5.1, rel=0.1)

    assert bench_main(["order", "--size", "32"]) == 0
    table = capsys.readouterr().out
    assert "augmentation order" in table and "HueSaturationValue" in table and "{" not in table


def test_saved_activations_frozen_prefix_saves_less(capsys):
    """The `saved` variant in-process on a tiny ViT: half the parameter tensors frozen keeps fewer activations."""
    assert bench_main(["train", "--variant", "saved", "--json", "--model", "test_vit", "--size", "32",
                       "--batch", "2", "--freeze", "0.5"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["variant"] == "saved" and r["saved_freeze"] == 0.5
    assert 0 < r["saved_mb_freeze_0.5"] < r["saved_mb_freeze_0"]
    assert 0 < r["saved_ratio"] < 1


@pytest.mark.slow
def test_train_json():
    r = run_cli("train", "--json", "--model", "resnet18", "--size", "32", "--batch", "2", "--steps", "1",
                "--warmup", "1", "--repeats", "1", "--no-saved", "--threads", "1")
    for key in ("ours_img_s", "seed_img_s", "ours_vs_seed", "ours_peak_memory_mb", "seed_peak_memory_mb"):
        assert positive(r[key]), key
    assert r["ours_vs_seed"] == pytest.approx(r["ours_img_s"] / r["seed_img_s"])
    assert r["ours"]["variant"] == "ours" and r["seed"]["variant"] == "seed"
    assert r["ours"]["trainable_tensors"] == r["seed"]["trainable_tensors"] > 0
    assert positive(r["ours"]["flops_per_step"]) and r["ours"]["flops_per_step"] == r["seed"]["flops_per_step"]
    assert r["settings"]["model"] == "resnet18" and r["settings"]["compile"] is False
    assert "saved_activations" not in r


@pytest.mark.slow
def test_infer_json(tmp_path):
    """`infer` on a freshly trained tiny run (both stages: inference needs the aux stage's NDVI and Height)."""
    from helpers import TINY, train

    from biomass.data.synthetic import generate

    data = generate(tmp_path / "data", n_train=6, n_test=2, seed=1, width=128, height=64)
    run_dir = train(tmp_path / "run", data, *TINY, "main.train.epochs=1", "tracking.mlflow=false",
                    "main.model.backbone.model_name=test_resnet", "aux.model.backbone.model_name=test_resnet")
    r = run_cli("infer", str(run_dir), "--data", str(data), "--json")
    assert positive(r["images_per_s"]) and positive(r["seconds"]) and r["images"] == 2
    assert r["model_passes_per_image"] == 3 * 3 + 3  # 3 main folds x 3 TTA views + 3 aux folds


TOY = ["--cpu", "--model", "test_vit", "--size", "32", "--batch", "4", "--aux-batch", "4", "--steps", "1",
       "--repeats", "1", "--n-test", "4", "--folds", "2", "--width", "128", "--height", "64"]
PARTS = ["train_bf16", "train_fp32", "seed_fp32", "chain_bf16", "chain_fp32", "aux_fp32", "aux_bf16", "jpeg_decode"]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def blocker(folder: Path) -> dict:
    """An environment in which `import mlflow` and `import ray` fail (stand-in packages first on PYTHONPATH)."""
    for name in ("mlflow", "ray"):
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked by the test')\n")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}


def test_gpu_bench_part_order_is_by_value():
    from biomass.bench.gpu import PARTS as parts

    assert [p.name for p in parts] == PARTS


def test_gpu_bench_skips_what_the_budget_cannot_hold(tmp_path, capsys):
    """A budget too small for any part: one `skipped` line per part, with its reason, and exit 0."""
    assert bench_main(["gpu", *TOY, "--budget", "1", "--out", str(tmp_path), "--json"]) == 0
    lines = read_lines(tmp_path / "results.jsonl")
    assert [x["part"] for x in lines] == PARTS
    assert all(x["status"] == "skipped" and "needs at least" in x["reason"] for x in lines)
    assert all(x["device"].startswith("cpu") and x["versions"]["torch"] and "--budget 1" in x["command"]
               for x in lines)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["parts"]["jpeg_decode"]["status"] == "skipped"


def test_gpu_bench_runs_the_parts_asked_for(tmp_path, capsys):
    assert bench_main(["gpu", *TOY, "--budget", "1", "--out", str(tmp_path), "--parts", "jpeg_decode,aux_fp32"]) == 0
    assert [x["part"] for x in read_lines(tmp_path / "results.jsonl")] == ["aux_fp32", "jpeg_decode"]
    with pytest.raises(BiomassError, match="unknown part 'aux_fp33'.*did you mean 'aux_fp32'"):
        bench_main(["gpu", *TOY, "--budget", "1", "--out", str(tmp_path / "b"), "--parts", "aux_fp33"])


@pytest.mark.slow
def test_gpu_bench_runs_every_part_with_mlflow_and_ray_unimportable(tmp_path):
    """`bench gpu` is run for real only where a GPU is lent (whose image has neither mlflow nor ray); here its code
    runs end to end at a toy size where importing either fails."""
    env = blocker(tmp_path / "block")
    probe = subprocess.run([sys.executable, "-c", "import mlflow"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked by the test" in probe.stderr
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "biomass.bench", "gpu", *TOY, "--budget", "600", "--out", str(out),
                           "--json"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {x["part"]: x for x in read_lines(out / "results.jsonl")}
    assert list(lines) == PARTS
    statuses = {k: v["status"] for k, v in lines.items()}
    assert statuses == dict.fromkeys(PARTS, "ok"), (out / "log.txt").read_text()[-3000:]
    for name in ("train_bf16", "train_fp32", "seed_fp32", "aux_fp32", "aux_bf16"):
        line = lines[name]
        assert line["flops_per_step"] > 0 and line["achieved_tflops"] > 0 and "peak_tflops" in line
        assert "mfu" in line and line["peak_precision"] == ("bf16" if name.endswith("bf16") else "fp32")
    assert lines["train_bf16"]["precision"] == "bf16" and lines["train_fp32"]["precision"] == "no"
    assert lines["aux_fp32"]["stage"] == "aux" and lines["aux_fp32"]["freeze"] == 0.25
    assert lines["aux_fp32"]["estimate_train_peak_gib"] > 0 and lines["train_bf16"]["estimate_train_peak_gib"] > 0
    chain = lines["chain_bf16"]
    assert chain["images"] == 4 and chain["folds"] == 2 and chain["model_passes_per_image"] == 2 * 3 + 2
    assert chain["fold_load_main_s"] > 0 and chain["extrapolated_800_images_5+5_folds_s"] > chain["chain_s"]
    assert "800 x (5 + 5 x 3) x pass_s" in chain["extrapolation_formula"]
    loads = chain["fold_load_aux_s"] + chain["fold_load_main_s"]
    assert chain["pass_s"] == pytest.approx((chain["chain_s"] - 2 * loads) / (4 * 8))
    assert chain["extrapolated_800_images_5+5_folds_s"] == pytest.approx(5 * loads + 800 * 20 * chain["pass_s"])
    decode = lines["jpeg_decode"]
    assert decode["cpu_cv2_all_cores_img_s"] > 0 and "GPU decode not measured" in decode["gpu"]
    assert "train_bf16: ok" in (out / "log.txt").read_text()


@pytest.mark.slow
def test_gpu_bench_a_failing_part_leaves_its_error_and_the_next_part_runs(tmp_path):
    out = tmp_path / "out"
    args = [a if a != "test_vit" else "no_such_model" for a in TOY]
    proc = subprocess.run([sys.executable, "-m", "biomass.bench", "gpu", *args, "--budget", "600", "--out", str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {x["part"]: x for x in read_lines(out / "results.jsonl")}
    assert list(lines) == PARTS
    assert lines["train_bf16"]["status"] == "error" and "no_such_model" in lines["train_bf16"]["error"]
    assert lines["jpeg_decode"]["status"] == "ok"  # needs no model: runs after every failure before it


@pytest.mark.slow
def test_gpu_bench_killed_half_way_keeps_every_finished_part(tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "biomass.bench", "gpu", *TOY, "--budget", "600", "--out", str(out)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not results.exists() or len(results.read_text().splitlines()) < 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # the part running then dies with its parent (PR_SET_PDEATHSIG) and writes nothing
    lines = read_lines(results)
    assert 2 <= len(lines) < len(PARTS)
    assert [x["part"] for x in lines] == PARTS[:len(lines)] and all(x["status"] == "ok" for x in lines)
    assert len(read_lines(results)) == len(lines)


@pytest.mark.slow
def test_memory_bench_cli_prints_gold_stages(capsys):
    assert bench_main(["memory", str(REPO / "experiments" / "gold.yaml"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {row["stage"] for row in r["stages"]} == {"main", "aux"}
