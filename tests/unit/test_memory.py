"""biomass.bench.memory: the meta-device estimate against CPU measurements, exact resident bytes, and the GPU table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import DEMO
import torch

from biomass.bench import memory
from biomass.config.load import load_experiment

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
GiB = 2**30
# What README.md says the estimate is checked to: keep the two in step.
TOLERANCE_FP32 = 0.005  # 0.5 %
TOLERANCE_BF16 = 0.25  # 25 %


def demo_stage(size: int = 96, freeze: float = 0.5, model: str = "test_vit", aux: bool = False, *extra: str):
    """The demo profile's main (or aux) stage on a small timm ViT; freeze 0.5 as gold (frozen patch embedding)."""
    cfg = load_experiment(DEMO, [
        f"main.model.backbone.model_name={model}", f"main.image.size=[{size},{size}]",
        f"main.model.backbone.freeze_fraction={freeze}", *([] if aux else ["aux=null"]), *extra]).config
    return cfg


@pytest.mark.parametrize("size, ckpt", [(64, False), (96, True), pytest.param(96, False, marks=pytest.mark.slow)])
def test_estimate_matches_cpu_measurement(size, ckpt):
    """Meta-device estimate vs the profiler-measured peak of two real AdamW steps in a fresh process; batch 16 so
    that activations, not AdamW's step, set the peak. The whole peak and the part above the resident state (params
    + AdamW state + batch) must agree within TOLERANCE_FP32, the figure README.md states (measured: within 0.15 %;
    the CPU runs the same ops)."""
    stage = demo_stage(size).main
    est = memory.stage_memory("main", stage, "fp32", ckpt, batch=16, target="cpu")
    measured = memory.measure_peak_cpu("main", stage, 16, "fp32", ckpt)
    resident = est["params"] + est["optimizer"] + est["batch_bytes"]
    print(f"{size} px ckpt={ckpt}: estimate {est['train_peak']} measured {measured} "
          f"({est['train_peak'] / measured:.4f}); above resident {est['train_peak'] - resident} vs "
          f"{measured - resident}")
    assert est["method"] == "meta device"
    assert abs(est["train_peak"] / measured - 1) < TOLERANCE_FP32
    assert abs((est["train_peak"] - resident) / (measured - resident) - 1) < TOLERANCE_FP32
    if not ckpt:  # the simulated forward/backward, not AdamW's step, sets the peak: the check is about activations
        assert est["activations"] > est["gradients"] + est["optimizer_step_temp"]


def test_readme_states_the_tolerances_tested():
    readme = (EXPERIMENTS.parent / "README.md").read_text()
    assert f"{TOLERANCE_FP32 * 100:g} % in fp32" in readme and f"{TOLERANCE_BF16 * 100:g} % in bf16" in readme


@pytest.mark.slow
def test_bf16_estimate_matches_cpu_measurement():
    """bf16 under CPU autocast: within TOLERANCE_BF16, as README.md states (oneDNN's bf16 convolution scratch,
    invisible to the simulation, makes the CPU measurement ~10 % higher at this tiny size)."""
    stage = demo_stage(96).main
    est = memory.stage_memory("main", stage, "bf16", False, batch=16, target="cpu")
    assert abs(est["train_peak"] / memory.measure_peak_cpu("main", stage, 16, "bf16") - 1) < TOLERANCE_BF16


def test_autocast_emulation_matches_real_cpu_autocast():
    """The meta emulation of autocast (CPU op lists) saves exactly what real CPU autocast saves, with and without
    checkpointing; the simulated peak agrees to a few hundred bytes."""
    stage = demo_stage(96).main
    for ckpt in (False, True):
        with torch.device("meta"):
            model, loss, n_tab, n_tgt = memory._build("main", stage)
        memory.set_grad_checkpointing(model, ckpt)
        emulated = memory._simulate(model, loss, n_tab, n_tgt, stage, 4, "bf16", True, "cpu", "meta")
        torch.manual_seed(0)
        model, loss, n_tab, n_tgt = memory._build("main", stage)
        memory.set_grad_checkpointing(model, ckpt)
        image, tab, tgt = memory._inputs(4, stage, n_tab, n_tgt, "cpu")
        live = memory._Live()
        with live:
            with torch.autograd.graph.saved_tensors_hooks(live.mark_saved, lambda t: t):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model.train()(image, tab).float()
                loss = loss(out, tgt)
            saved = live.live_saved
            loss.backward()
        assert emulated["activations"] == saved
        assert abs(emulated["peak"] - live.peak) < 4096


def test_parameter_gradient_optimizer_bytes_exact():
    """Against a real model and a real AdamW step: parameters + buffers, trainable gradients, optimizer state."""
    stage = demo_stage(64).main
    est = memory.stage_memory("main", stage, "fp32", False, batch=2)
    torch.manual_seed(0)
    model, loss_fn, n_tab, n_tgt = memory._build("main", stage)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert est["params"] == params + buffers
    assert est["n_params"] == sum(p.numel() for p in model.parameters())
    assert est["gradients"] == sum(p.numel() * 4 for p in trainable) == est["gradients_simulated"]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    image, tab, tgt = memory._inputs(2, stage, n_tab, n_tgt, "cpu")
    loss_fn(model(image, tab), tgt).backward()
    assert sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None) \
        == est["gradients"]
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    assert est["optimizer"] == sum(t.numel() * t.element_size() for t in state)


def test_frozen_parameters_add_no_gradient_or_optimizer_bytes():
    """Freezing moves bytes from 'trainable' to 'frozen': parameters unchanged, gradients and AdamW state drop by
    exactly the frozen tensors' bytes (x2 and a step each for AdamW)."""
    full = memory.stage_memory("main", demo_stage(64, 0.0).main, "fp32", False, batch=2)
    half = memory.stage_memory("main", demo_stage(64, 0.5).main, "fp32", False, batch=2)
    stage = demo_stage(64, 0.5).main
    with torch.device("meta"):
        model = memory._build("main", stage)[0]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and full["params"] == half["params"]
    assert full["gradients"] - half["gradients"] == sum(p.numel() * 4 for p in frozen)
    assert full["optimizer"] - half["optimizer"] == sum(p.numel() * 8 + 4 for p in frozen)
    assert half["activations"] < full["activations"]  # the frozen prefix runs under no_grad: nothing saved


def test_checkpointing_and_bf16_lower_saved_activations():
    stage = demo_stage(128).main
    rows = {(p, c): memory.stage_memory("main", stage, p, c, batch=4) for p in memory.PRECISIONS for c in (0, 1)}
    for p in memory.PRECISIONS:
        assert rows[p, 1]["activations"] < rows[p, 0]["activations"] / 2
        assert rows[p, 1]["train_peak"] < rows[p, 0]["train_peak"]
    assert rows["bf16", 0]["activations"] < 0.85 * rows["fp32", 0]["activations"]
    # checkpointed: the saved block inputs are the fp32 residual stream either way; bf16 adds at most the autocast
    # copies of trainable weights that the graph keeps (this tiny ViT's head), never more
    assert rows["bf16", 1]["activations"] - rows["fp32", 1]["activations"] <= rows["bf16", 1]["gradients"] // 2


def test_gpu_fits_thresholds():
    usable16 = int(16 * 0.9 * GiB)
    fits = memory.gpu_fits(usable16)
    assert fits["T4/V100-16"]["fits"] and fits["T4/V100-16"]["usable_gib"] == pytest.approx(14.4)
    fits = memory.gpu_fits(usable16 + 1)
    assert not fits["T4/V100-16"]["fits"] and fits["L4/A10/3090/4090-24"]["fits"]
    fits = memory.gpu_fits(int(80 * 0.9 * GiB) + 1)
    assert [n for n, f in fits.items() if f["fits"]] == ["H200-141"]
    assert not any(f["fits"] for f in memory.gpu_fits(int(141 * 0.9 * GiB) + 1).values())
    assert memory.gpu_fits(0)["A100-40"]["use"] == 0


def test_fallback_scales_cpu_runs_in_pixels(monkeypatch):
    """When the meta run fails, CPU runs at 1/8 and 1/4 of each side are scaled linearly in pixels, and say so."""
    stage = demo_stage(256).main
    meta = memory.stage_memory("main", stage, "fp32", False, batch=2)
    real = memory._simulate

    def no_meta(*args, **kwargs):
        if kwargs.get("device", args[9] if len(args) > 9 else "meta") == "meta":
            raise NotImplementedError("no meta kernel for this op")
        return real(*args, **kwargs)

    monkeypatch.setattr(memory, "_simulate", no_meta)
    scaled = memory.stage_memory("main", stage, "fp32", False, batch=2)
    assert "scaled linearly in pixels" in scaled["method"] and "no meta kernel" in scaled["method"]
    assert scaled["gradients"] == meta["gradients"] and scaled["optimizer"] == meta["optimizer"]
    assert scaled["activations"] == pytest.approx(meta["activations"], rel=0.1)
    assert meta["train_peak"] <= scaled["train_peak"] <= 1.25 * meta["train_peak"]  # an upper bound, not far off


def test_experiment_memory_is_json_and_prints(capsys):
    cfg = demo_stage(64, 0.5, "test_vit", True, "aux.model.backbone.model_name=test_vit", "aux.image.size=[64,64]",
                     "aux.model.backbone.freeze_fraction=0.25")
    result = memory.experiment_memory(cfg)
    assert len(result["stages"]) == 8 and {r["stage"] for r in result["stages"]} == {"main", "aux"}
    assert sum(r["configured"] for r in result["stages"]) == 4
    inf = result["inference"]["fp32"]
    assert inf["folds"] == {"main": 3, "aux": 3} and inf["all_folds_resident"] > inf["fold_at_a_time"]
    json.dumps(result)
    from rich.console import Console

    memory.print_report(result, Console(width=160, record=True))
    assert "smallest GPU" in capsys.readouterr().out


def test_gold_main_stage_on_meta():
    """The real vit_huge_plus_patch16_dinov3 architecture at 800 px, batch 10, no weights file (meta device)."""
    cfg = load_experiment(EXPERIMENTS / "gold.yaml", ["data.root=/tmp/nowhere"]).config
    r = memory.stage_memory("main", cfg.main, "bf16", False)
    assert r["method"] == "meta device" and r["batch"] == 10 and r["image_size"] == [800, 800]
    assert 0.8e9 < r["n_params"] < 0.9e9 and 0.4 < r["n_trainable"] / r["n_params"] < 0.6
    assert r["optimizer"] == pytest.approx(2 * r["gradients"], rel=1e-6)
    assert r["activations"] > r["params"]  # 800 px, batch 10: activations dominate
    assert not r["fits"]["A100-40"]["fits"]


@pytest.mark.slow
def test_gold_experiment_memory():
    cfg = load_experiment(EXPERIMENTS / "gold.yaml", ["data.root=/tmp/nowhere"]).config
    result = memory.experiment_memory(cfg)
    memory.print_report(result)
    print(json.dumps(result))
    assert all(r["method"] == "meta device" for r in result["stages"])
