"""The winning solutions' ideas as components (issue 18): view fusion, multi-layer features + multi_stat pooling,
ratio and interval heads, EMA, layer-wise LR decay, frozen-head warm-up, LoRA/DoRA, stratified_group folds,
post-processing steps. Each is built here on timm's tiny random-init models."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import biomass.components  # noqa: F401
from helpers import DEMO, REPO

from biomass.config.load import load_experiment
from biomass.data.scalers import Scaler
from biomass.engine.build import build_stage_model
from biomass.errors import ConfigError
from biomass.models.model import TargetSpace
from biomass.registry import BACKBONES, FUSIONS, HEADS, LOSSES, POOLINGS, SPLITTERS
from biomass.stages import MAIN

VIT = "{name: timm, model_name: test_vit, freeze_fraction: 0.0}"


def main_stage(*overrides: str, size=(32, 32)):
    exp = load_experiment(DEMO, ["data.root=/tmp/unused", f"main.image.size=[{size[0]},{size[1]}]",
                                 f"main.model.backbone={VIT}", *overrides])
    return exp.config.main


def fitted(model, n=40, seed=0):
    """Fit the model's target space on random grams, as FoldTrainer.fit does."""
    rng = np.random.default_rng(seed)
    y = np.abs(rng.normal(20, 10, size=(n, 5)))
    y[:, 3] = y[:, 0] + y[:, 2]
    y[:, 4] = y[:, 3] + y[:, 1]
    scaler = Scaler.fit(y)
    model.target_space.fit(scaler, scaler.transform(y))
    return scaler, y


def images(b=2, h=32, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------- 1. views and fusion
@pytest.mark.parametrize("node, width", [("{name: concat}", 2), ("{name: mean}", 1),
                                         ("{name: cross_attention, heads: 4}", 2),
                                         ("{name: cross_attention, over: pooled, heads: 4, merge: mean}", 1)])
def test_fusions_build_on_halves(node, width):
    cfg = main_stage("main.image.layout=halves", f"main.model.fusion={node}")
    model, _ = build_stage_model(MAIN, cfg)
    assert model.head.fusion[0].in_features == 64 * width + 128  # test_vit: 64 channels (gap); tabular 128
    assert model(images(), torch.zeros(2, 2)).shape == (2, 5)


def test_cross_attention_mixes_the_views_and_concat_does_not():
    torch.manual_seed(0)
    for node, mixes in (("{name: concat}", False), ("{name: cross_attention, heads: 4}", True)):
        model, _ = build_stage_model(MAIN, main_stage("main.image.layout=halves", f"main.model.fusion={node}"))
        model.eval()
        a = images(1)
        b = a.clone()
        b[..., 32:] = 255 - b[..., 32:]  # change the right half only
        with torch.no_grad():
            fa, fb = model.features(a), model.features(b)
        left_a, left_b = fa[:, :64], fb[:, :64]
        assert torch.allclose(left_a, left_b, atol=1e-6) is not mixes, node


def test_views_merge_is_a_deprecated_alias_of_fusion_mean():
    cfg = main_stage("main.image.layout=halves", "main.model.views_merge=mean")
    assert cfg.model.fusion == {"name": "mean"}
    with pytest.raises(ConfigError, match="heads=3 must divide"):
        FUSIONS.build("cross_attention", BACKBONES.build("timm", (32, 32), model_name="test_vit").spec, 64, heads=3)


def test_fusion_works_for_a_dinov3_style_vit_with_registers():
    cfg = main_stage("main.image.layout=halves", "main.model.fusion={name: cross_attention, heads: 4}",
                     "main.model.backbone={name: timm, model_name: vit_small_patch16_dinov3, "
                     "freeze_fraction: 0.0, model_kwargs: {depth: 2}}")
    model, _ = build_stage_model(MAIN, cfg)
    assert model.backbone.spec.num_prefix_tokens == 5
    assert model(images(), torch.zeros(2, 2)).shape == (2, 5)


# ------------------------------------------------------------------------------- 2. multi-layer features, multi_stat
def test_out_indices_concatenate_the_blocks_tokens():
    torch.manual_seed(0)
    bb = BACKBONES.build("timm", (32, 32), model_name="test_vit", out_indices=(1, 3, 5)).eval()
    assert bb.spec.layers == 3 and bb.spec.dim == 3 * 64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = bb(x)
        last = bb.model.forward_features(x)
    assert tokens.shape == (2, 1 + 4, 192)
    assert torch.allclose(tokens[..., 128:], last, atol=1e-5)  # block 5 + the final norm = forward_features


def test_out_indices_on_a_cnn_pool_every_stage_to_the_last_grid():
    bb = BACKBONES.build("timm", (64, 64), model_name="test_resnet", out_indices=(2, 3))
    assert bb(torch.randn(1, 3, 64, 64)).shape == (1, bb.spec.grid[0] * bb.spec.grid[1], bb.spec.dim)


def test_multi_stat_pooling_per_layer():
    bb = BACKBONES.build("timm", (32, 32), model_name="test_vit", out_indices=(4, 5))
    pool = POOLINGS.build("multi_stat", bb.spec)
    assert pool.out_dim == 4 * 128
    tokens = torch.randn(2, 5, 128)
    out = pool(tokens)
    patches = tokens[:, 1:]
    gem = patches.clamp(min=1e-6).pow(3).mean(1).pow(1 / 3)
    expected = torch.cat([patches.mean(1), patches.amax(1), patches.amin(1), gem], dim=1)
    assert torch.allclose(out, expected, atol=1e-5)
    with pytest.raises(ConfigError, match="median"):
        POOLINGS.build("multi_stat", bb.spec, stats=("mean", "median"))


# ---------------------------------------------------------------------------------------------------------- 3. heads
def test_ratio_head_holds_the_mass_balance_by_construction():
    torch.manual_seed(0)
    model, _ = build_stage_model(MAIN, main_stage("main.model.head={name: ratio}"))
    fitted(model)
    model.eval()
    with torch.no_grad():
        grams = model.predict(images(4, 32, 32), torch.randn(4, 2)).double()
    green, dead, clover, gdm, total = grams.unbind(1)
    assert (grams >= 0).all()
    assert torch.allclose(gdm, green + clover, atol=1e-3) and torch.allclose(total, gdm + dead, atol=1e-3)
    with pytest.raises(ConfigError, match="five biomass targets"):
        HEADS.build("ratio", 8, 0, 2, TargetSpace(2))


def test_interval_head_and_ce_loss():
    torch.manual_seed(0)
    cfg = main_stage("main.model.head={name: interval_aux}",
                     "main.loss={name: weighted_smooth_l1_ce, bins: 4, ce_weight: 0.5}")
    model, loss = build_stage_model(MAIN, cfg)
    scaler, y = fitted(model)
    edges = model.target_space.bin_edges
    assert edges.shape == (5, 3) and "target_space.bin_edges" in model.state_dict()  # checkpoints carry the bins
    y_std = torch.as_tensor(scaler.transform(y), dtype=torch.float32)
    counts = np.stack([np.bincount(loss.classes(y_std)[:, j].numpy(), minlength=4) for j in range(5)])
    assert counts.min() >= 8 and counts.max() <= 12  # quantile bins: about 10 of 40 training rows each
    raw = model(images(3, 32, 32), torch.randn(3, 2))
    assert raw.shape == (3, 5 * 5)
    target = y_std[:3]
    out = raw.view(3, 5, 5)
    w = torch.tensor([0.1, 0.1, 0.1, 0.2, 0.5])
    ce = F.cross_entropy(out[..., 1:].reshape(-1, 4), loss.classes(target).reshape(-1), reduction="none").view(3, 5)
    expected = (F.smooth_l1_loss(out[..., 0], target, reduction="none") * w).mean() + 0.5 * (ce * w).mean()
    assert torch.allclose(loss(raw, target), expected, atol=1e-6)
    assert torch.equal(loss.point(raw), out[..., 0])  # the regression output is what is scored
    with pytest.raises(ConfigError, match="weighted_smooth_l1_ce"):
        build_stage_model(MAIN, main_stage("main.model.head={name: interval_aux}"))


# ---------------------------------------------------------------------------------------------- 4. training knobs
def _batches(n=2, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8),
             "tabular": torch.randn(b, 2, generator=g), "target": torch.randn(b, 5, generator=g)} for _ in range(n)]


def test_layer_decay_scales_each_block_and_keeps_the_head_at_full_rate():
    from biomass.engine.build import make_optimizer

    cfg = main_stage("main.optim={name: adamw, lr: 1.0, weight_decay: 0.0, layer_decay: 0.5}")
    model, _ = build_stage_model(MAIN, cfg)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    blocks = model.backbone.model.blocks
    lrs = [lr_of[id(blocks[i].attn.qkv.weight)] for i in range(len(blocks))]
    assert all(a < b for a, b in zip(lrs, lrs[1:])) and lrs[-1] / lrs[-2] == pytest.approx(2.0)
    assert lr_of[id(model.backbone.model.patch_embed.proj.weight)] < lrs[0]
    assert all(lr_of[id(p)] == 1.0 for p in model.head.parameters())
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)
    plain = make_optimizer(model, main_stage(), torch.device("cpu"))
    assert len(plain.param_groups) == 1  # off by default


def test_ema_is_updated_every_step_and_warm_up_skips_the_backbone():
    from accelerate import Accelerator

    from biomass.engine.build import make_optimizer
    from biomass.engine.loop import make_ema, train_one_epoch

    torch.manual_seed(0)
    cfg = main_stage("main.train.ema={decay: 0.5}", "main.optim={name: adamw, lr: 0.01, weight_decay: 0.1}")
    model, loss = build_stage_model(MAIN, cfg)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    ema = make_ema(model, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    acc = Accelerator(cpu=True)
    train_one_epoch(acc, model, _batches(1), loss, opt, cfg, ema=ema, skip=backbone)  # timm: 1st update copies
    first = {k: v.clone() for k, v in model.state_dict().items()}
    train_one_epoch(acc, model, _batches(1, seed=1), loss, opt, cfg, ema=ema, skip=backbone)
    after = model.state_dict()
    assert ema.steps == 2
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.5 * first[k] + 0.5 * after[k], atol=1e-6), k
    assert all(torch.equal(before[f"backbone.{n}"], p) for n, p in model.backbone.named_parameters())  # rested
    assert not torch.equal(before["head.outputs.0.weight"], after["head.outputs.0.weight"])  # the head trained
    assert make_ema(model, main_stage()) is None  # off by default


# ------------------------------------------------------------------------------------------------------- 5. PEFT
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_adapters_on_the_last_blocks_only(method):
    bb = BACKBONES.build("timm", (32, 32), model_name="test_vit",
                         peft={"method": method, "r": 2, "alpha": 4, "blocks": 2, "targets": ["qkv", "proj"]})
    trainable = [n for n, p in bb.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert {int(n.split(".")[2]) for n in trainable} == {4, 5}  # test_vit has 6 blocks
    assert any("magnitude" in n for n in trainable) is (method == "dora")
    assert bb(torch.randn(1, 3, 32, 32)).shape == (1, 5, 64)
    with pytest.raises(ConfigError, match="no linear or conv layer"):
        BACKBONES.build("timm", (32, 32), model_name="test_vit", peft={"targets": ["nope"]})
    with pytest.raises(ConfigError, match="peft freezes"):
        BACKBONES.build("timm", (32, 32), model_name="test_vit", peft={}, freeze_fraction=0.5)


# ------------------------------------------------------------------------------------------------------ 6. folds
def _wide_labels():
    t = pd.read_csv(REPO / "biomass" / "data" / "labels" / "csiro_train.csv")
    wide = t.pivot_table(index=["image_path", "Sampling_Date", "State", "Species"], columns="target_name",
                         values="target").reset_index()
    return wide


def test_stratified_group_keeps_groups_whole_and_beats_one_seed(capsys):
    from biomass.data.folds import fold_balance

    table = _wide_labels()
    folds = SPLITTERS.build("stratified_group", n_splits=5, search=20)(table)
    assert "balance" in capsys.readouterr().out
    groups = table["State"].astype(str) + "|" + table["Sampling_Date"].astype(str)
    assert (pd.Series(folds).groupby(groups.to_numpy()).nunique() == 1).all()  # no group straddles two folds
    assert set(folds) == set(range(5))
    y = table["Dry_Total_g"].to_numpy()
    labels = np.searchsorted(np.quantile(y, [0.2, 0.4, 0.6, 0.8]), y, side="right")
    one = SPLITTERS.build("stratified_group", n_splits=5, search=1)(table)
    assert fold_balance(folds, labels, 5) <= fold_balance(one, labels, 5)
    with pytest.raises(ConfigError, match="no column"):
        SPLITTERS.build("stratified_group", target="nope")(table)


# ------------------------------------------------------------------------------------------- 7. post-processing
def test_post_steps_in_the_chain_and_the_shorthand():
    from biomass.chain import ChainSettings, postprocess

    cfg = load_experiment(DEMO, ["data.root=/tmp/unused",
                                 "infer.post=[mass_balance, {clover_scale: 0.5}, {zero_below: 3.0}]"]).config
    assert cfg.infer.post[1] == {"name": "clover_scale", "factor": 0.5, "rebalance": True}
    pred = np.array([[10.0, 2.0, 4.0, 14.0, 16.0], [10.0, 5.0, 8.0, 18.0, 23.0]])
    out = postprocess(pred, ChainSettings.of(cfg))
    np.testing.assert_allclose(out[:, 2], [0.0, 4.0])  # clover halved, then 2 g < 3 g zeroed
    np.testing.assert_allclose(out[1], [10.0, 5.0, 4.0, 14.0, 19.0])  # GDM and Total follow the clover removed
    assert load_experiment(DEMO, ["data.root=/tmp/unused"]).config.infer.post == []  # off by default
    with pytest.raises(ConfigError, match="post"):
        load_experiment(DEMO, ["data.root=/tmp/unused", "infer.post=[{clover_scal: 0.5}]"])


# ------------------------------------------------------------------------------------------------------ 8. recipes
@pytest.mark.parametrize("place", ["first", "sixth", "ninth"])
def test_recipes_equal_their_ablation_variant_and_build(place):
    from biomass.ablate.spec import load_ablation

    recipe = load_experiment(REPO / "experiments" / "recipes" / f"{place}_place.yaml", ["data.root=/tmp/x"]).config
    ablation = load_ablation(REPO / "ablations" / "recipes.yaml", None, ["data.root=/tmp/x"])
    variant = next(v for v in ablation.variants if v.name == f"{place}_place").config
    strip = lambda d: {k: v for k, v in d.items() if k not in ("name", "tracking")}  # noqa: E731
    assert strip(recipe.dump()) == strip(variant.dump())
    demo = load_ablation(REPO / "ablations" / "recipes.yaml", DEMO, ["main.image.size=[32,32]",
                                                                     "aux.image.size=[32,32]"])
    cfg = next(v for v in demo.variants if v.name == f"{place}_place").config
    model, loss = build_stage_model(MAIN, cfg.main)  # the demo-scale recipe builds on the demo's CNN
    h, w = cfg.main.image.size
    out = model(torch.zeros(2, 3, h, w * (2 if cfg.main.image.layout == "halves" else 1), dtype=torch.uint8),
                torch.zeros(2, 2))
    assert out.shape == (2, 5 * loss.outputs_per_target)


KNOB_EXAMPLES = {  # one valid value per knob of schema.WINNERS_KNOBS, as a command-line override would give it
    "main.model.backbone.out_indices": "[-2, -1]",
    "main.model.backbone.peft": "{method: lora, r: 4, alpha: 8, targets: [conv2]}",
    "main.image.layout": "halves",
    "main.train.ema": "{decay: 0.99}",
    "main.train.warmup_frozen_epochs": "2",
    "main.optim.layer_decay": "0.8",
    "main.augment.train": "[{name: DateStamp}, {name: RedDot}, {name: VerticalStripShuffle}]",
    "infer.post": "[mass_balance, {clover_scale: 0.8}]",
    "infer.ttt": "{epochs: 1, blend: 0.8}",
}


def test_every_listed_winners_knob_is_a_config_key():
    """What `python -m biomass.components` lists as the winners' knobs resolves through the schema: each path set on
    the demo validates (unknown keys are refused) and reads back."""
    import yaml

    from biomass.config.schema import WINNERS_KNOBS

    assert {path for path, _, _ in WINNERS_KNOBS} == set(KNOB_EXAMPLES)
    for path, value in KNOB_EXAMPLES.items():
        cfg = load_experiment(DEMO, [f"{path}={value}"]).config.dump()
        node = cfg
        for part in path.split("."):
            node = node[part]
        expected = yaml.safe_load(value)
        assert node == expected or (isinstance(node, dict) and expected.items() <= node.items()) or \
            (isinstance(node, list) and len(node) == len(expected)), (path, node)
