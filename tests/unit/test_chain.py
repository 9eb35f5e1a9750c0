"""The one aux->main chain: TTA views, fold weights, post-processing, the leak check, and the contract that the
deployable CV is exactly what inference computes (fold k's validation images through fold k's models only)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import DEMO, REPO

from biomass.chain import ChainSettings, fold_weights, postprocess, views
from biomass.config.load import load_experiment
from biomass.cv.outputs import chain_is_leaky
from biomass.errors import ConfigError
from biomass.post import project_mass_balance as mass_balance
from biomass.rundir import RunDir



def test_views_flip_the_right_axes():
    x = torch.arange(2 * 3 * 2 * 4).view(2, 3, 2, 4)
    out = dict(zip(["none", "hflip", "vflip", "hvflip"], views(x, ["none", "hflip", "vflip", "hvflip"])))
    assert torch.equal(out["none"], x)
    assert torch.equal(out["hflip"], x.flip(-1))
    assert torch.equal(out["vflip"], x.flip(-2))
    assert torch.equal(out["hvflip"], x.flip(-1).flip(-2))


def test_mass_balance_projection():
    rng = np.random.default_rng(0)
    pred = rng.uniform(0, 50, size=(20, 5))
    out = mass_balance(pred)
    green, dead, clover, gdm, total = out.T
    assert np.allclose(gdm, green + clover) and np.allclose(total, green + dead + clover)
    balanced = out.copy()
    assert np.allclose(mass_balance(balanced), balanced)  # a projection: balanced input is unchanged


def test_postprocess_clips_after_the_mass_balance():
    pred = np.array([[-1.0, 2.0, 3.0, 1.0, 4.0]])
    settings = ChainSettings("none", ("none",), clip=True)
    assert (postprocess(pred, settings) >= 0).all()
    assert np.array_equal(postprocess(pred, ChainSettings("none", ("none",), False)), pred)
    balanced = postprocess(pred, ChainSettings("none", ("none",), False, ({"name": "mass_balance"},)))
    assert np.allclose(balanced[:, 3], balanced[:, 0] + balanced[:, 2])


def test_mass_balance_alias_is_the_first_post_step():
    """`infer.mass_balance: true` (deprecated, old run directories) loads as `infer.post: [mass_balance, ...]`."""
    cfg = load_experiment(DEMO, ["infer.mass_balance=true", "infer.post=[{clover_scale: 0.8}]"]).config
    assert [n["name"] for n in cfg.infer.post] == ["mass_balance", "clover_scale"]
    assert load_experiment(DEMO, ["infer.mass_balance=false"]).config.infer.post == []


def test_fold_weights(tmp_path):
    cfg = load_experiment(DEMO).config
    run = RunDir(tmp_path)
    assert np.allclose(list(fold_weights(cfg, run, [0, 1, 2]).values()), [1 / 3] * 3)
    cfg.infer.fold_weights = [2.0, 1.0, 1.0]
    assert fold_weights(cfg, run, [0, 1, 2]) == {0: 0.5, 1: 0.25, 2: 0.25}
    cfg.infer.fold_weights = [1.0, 1.0]
    with pytest.raises(ConfigError, match="2 values for 3 main folds"):
        fold_weights(cfg, run, [0, 1, 2])
    with pytest.raises(ConfigError, match="sum above 0"):  # checked once, when the config loads
        load_experiment(DEMO, ["infer.fold_weights=[0.0, 0.0, 0.0]"])
    cfg.infer.fold_weights = "cv"
    (tmp_path / "metrics.json").write_text(json.dumps(
        {"folds": {"main": {"0": {"score": 0.6}, "1": {"score": 0.2}, "2": {"score": -0.1}}}}))
    assert np.allclose(list(fold_weights(cfg, run, [0, 1, 2]).values()), [0.75, 0.25, 0.0])


def test_gold_fold_weights_are_the_seeds():
    cfg = load_experiment(REPO / "experiments/gold.yaml").config
    assert cfg.infer.fold_weights == [0.264901, 0.174089, 0.157770, 0.231843, 0.171397]
    assert cfg.infer.tta == ["none", "hflip", "vflip"]


def test_leak_check():
    gold = load_experiment(REPO / "experiments/gold.yaml").config
    same = np.array([0, 1, 2, 0, 1, 2])
    other = np.array([1, 0, 2, 2, 1, 0])
    assert "fold-0" in chain_is_leaky(gold, same, other)  # the seed's chain: init from main/fold0
    demo = load_experiment(REPO / "experiments/demo.yaml").config
    assert demo.aux.init_from == "main/same_fold"
    assert chain_is_leaky(demo, same, same) is None
    assert "differ" in chain_is_leaky(demo, same, other)
    demo.aux.init_from = None
    assert chain_is_leaky(demo, same, other) is None


def test_crop_policy_frames_each_stage_as_it_trained():
    cfg = load_experiment(REPO / "experiments/gold.yaml").config
    from biomass.stages import AUX, MAIN

    assert cfg.infer.crop == "none" and MAIN.crops(cfg, training=True)  # the seed: trained cropped ...
    assert not MAIN.crops(cfg, training=False) and not AUX.crops(cfg, training=False)  # ... uncropped test
    cfg.infer.crop = "boxes"
    assert MAIN.crops(cfg, training=False) and not AUX.crops(cfg, training=False)  # aux trained on the originals


def test_gold_without_crop_boxes_names_the_detector(tmp_path):
    import shutil

    from biomass.data.source import load_train_data
    from biomass.data.synthetic import generate
    from biomass.errors import DataError

    root = generate(tmp_path / "data", n_train=3, n_test=1, seed=0, width=64, height=32)
    (root / "crops.csv").unlink()
    cfg = load_experiment(REPO / "experiments/gold.yaml", [f"data.root={root}"]).config
    with pytest.raises(DataError, match=f"python -m biomass.crops detect {root}"):
        load_train_data(cfg)
    shutil.rmtree(root)


# Every registered post-processing step, run through the chain's postprocess on one row, with what it must give.
ROW = np.array([[10.0, 4.0, 0.1, 12.0, 30.0]])  # Green, Dead, Clover, GDM, Total: unbalanced on purpose
POST_EXPECTED = {
    "mass_balance": ({"name": "mass_balance"}, None),  # checked by its identities below
    "clover_scale": ({"name": "clover_scale", "factor": 0.5}, [[10.0, 4.0, 0.05, 11.95, 29.95]]),
    "zero_below": ({"name": "zero_below", "threshold": 0.2}, [[10.0, 4.0, 0.0, 12.0, 30.0]]),
    "blend_sums": ({"name": "blend_sums", "weight": 0.5}, [[10.0, 4.0, 0.1, 11.05, 22.05]]),
}


def test_every_post_step_is_checked():
    from biomass.registry import POSTS

    assert set(POST_EXPECTED) == set(POSTS.names())


@pytest.mark.parametrize("name", sorted(POST_EXPECTED))
def test_each_post_step_runs_in_the_chain(name):
    node, expected = POST_EXPECTED[name]
    out = postprocess(ROW.copy(), ChainSettings("none", ("none",), clip=False, post=(node,)))
    if expected is None:  # mass balance: GDM = Green + Clover, Total = Green + Dead + Clover, and it moved
        green, dead, clover, gdm, total = out[0]
        assert gdm == pytest.approx(green + clover) and total == pytest.approx(green + dead + clover)
        assert not np.allclose(out, ROW)
    else:
        np.testing.assert_allclose(out, expected, rtol=1e-12)
