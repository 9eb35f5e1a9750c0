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


@pytest.mark.slow
def test_gpu_bench_runs_its_code_on_a_cpu(capsys):
    """`bench gpu` is run for real only where a GPU is lent; here its code runs end to end at a toy size."""
    args = ["gpu", "--cpu", "--model", "test_vit", "--size", "32", "--batch", "4", "--steps", "1", "--repeats", "1",
            "--n-test", "4", "--folds", "2", "--width", "128", "--height", "64", "--json"]
    assert bench_main(args) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["cuda"] is False
    assert set(r["train_step"]) == {"ours_fp32", "ours_bf16", "seed_fp32"}
    assert r["train_step"]["ours_fp32"]["precision"] == "no" and r["train_step"]["ours_bf16"]["precision"] == "bf16"
    assert r["inference_chain"]["images"] == 4 and r["inference_chain"]["model_passes_per_image"] == 2 * 3 + 2
    assert r["jpeg_decode"]["cpu_cv2_one_core_img_s"] > 0


@pytest.mark.slow
def test_memory_bench_cli_prints_gold_stages(capsys):
    assert bench_main(["memory", str(REPO / "experiments" / "gold.yaml"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {row["stage"] for row in r["stages"]} == {"main", "aux"}
