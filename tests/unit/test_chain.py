"""The one aux->main chain: TTA views, fold weights, post-processing, the leak check, and the contract that the
deployable CV is exactly what inference computes (fold k's validation images through fold k's models only)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from biomass.chain import ChainSettings, fold_weights, mass_balance, postprocess, views
from biomass.config.load import load_experiment
from biomass.constants import TARGETS
from biomass.cv.outputs import chain_is_leaky
from biomass.errors import ConfigError
from biomass.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"
TINY = ["main.image.size=[32,32]", "aux.image.size=[32,32]", "main.train.epochs=2", "aux.train.epochs=1",
        "main.train.batch_size=4", "aux.train.batch_size=4", "data.num_workers=0", "tracking.mlflow=false"]


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
    settings = ChainSettings("none", ("none",), mass_balance=False, clip=True)
    assert (postprocess(pred, settings) >= 0).all()
    assert np.array_equal(postprocess(pred, ChainSettings("none", ("none",), False, False)), pred)
    balanced = postprocess(pred, ChainSettings("none", ("none",), True, False))
    assert np.allclose(balanced[:, 3], balanced[:, 0] + balanced[:, 2])


def test_fold_weights(tmp_path):
    cfg = load_experiment(DEMO).config
    run = RunDir(tmp_path)
    assert np.allclose(list(fold_weights(cfg, run, [0, 1, 2]).values()), [1 / 3] * 3)
    cfg.infer.fold_weights = [2.0, 1.0, 1.0]
    assert fold_weights(cfg, run, [0, 1, 2]) == {0: 0.5, 1: 0.25, 2: 0.25}
    cfg.infer.fold_weights = [1.0, 1.0]
    with pytest.raises(ConfigError, match="2 values for 3 main folds"):
        fold_weights(cfg, run, [0, 1, 2])
    cfg.infer.fold_weights = [0.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="sum above 0"):
        fold_weights(cfg, run, [0, 1, 2])
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


# ------------------------------------------------------------------------------------------- CV == inference
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    from biomass.cv.experiment import train_experiment
    from biomass.data.synthetic import generate

    tmp = tmp_path_factory.mktemp("chain")
    root = generate(tmp / "data", n_train=18, n_test=3, seed=5, width=128, height=64)
    exp = load_experiment(DEMO, [*TINY, f"data.root={root}"])
    run = train_experiment(exp, run_dir=tmp / "run")
    return run, root


@pytest.mark.parametrize("fold", [0, 2])
def test_deployable_cv_is_what_inference_computes(tiny_run, tmp_path, fold):
    """Inference on fold k's validation images with fold k's aux and main models only gives the deployable OOF
    predictions for those images: the CV and the submission run one chain."""
    from biomass.submission import write_submission

    run, root = tiny_run
    folds = pd.read_csv(run / "folds.csv")
    assert (folds["main_fold"] == folds["aux_fold"]).all()  # the demo shares its splitter between the stages
    paths = folds.loc[folds["main_fold"] == fold, "image_path"]
    train = pd.read_csv(root / "train.csv")
    test_csv = train[train["image_path"].isin(paths)][["sample_id", "image_path", "target_name"]]
    data = tmp_path / "data"
    data.mkdir()
    test_csv.to_csv(data / "test.csv", index=False)
    shutil.copytree(root / "train", data / "train")  # a symlink out of the data root is refused (check_inside)
    sub = write_submission(run, data, tmp_path / "sub.csv", main_folds=[fold], aux_folds=[fold])
    oof = pd.read_csv(run / "oof_deployable.csv").set_index("sample_id")["target"]
    got = sub.set_index("sample_id")["target"]
    assert len(got) == 5 * len(paths)
    np.testing.assert_allclose(got.to_numpy(), oof.loc[got.index].to_numpy(), atol=1e-5, rtol=1e-5)


def fold_as_test_set(run: Path, root: Path, fold: int, data: Path) -> list[str]:
    """A data root whose test.csv is main fold `fold`'s validation images (train.csv and train/ beside it)."""
    folds = pd.read_csv(run / "folds.csv")
    paths = folds.loc[folds["main_fold"] == fold, "image_path"]
    train = pd.read_csv(root / "train.csv")
    data.mkdir()
    train[train["image_path"].isin(paths)][["sample_id", "image_path", "target_name"]].to_csv(data / "test.csv",
                                                                                             index=False)
    shutil.copytree(root / "train", data / "train")  # a symlink out of the data root is refused (check_inside)
    for name in ("train.csv", "crops.csv"):  # the training images infer.ttt fine-tunes on, framed as they trained
        os.symlink(root / name, data / name)
    return list(paths)


def test_test_time_training_in_the_cv_is_what_inference_computes(tiny_run, tmp_path):
    """`infer.ttt`: the deployable CV fine-tunes fold k on its training images + its held-out images pseudo-labelled,
    exactly as inference on those images (as the test set) with fold k's models does; and it changes the result."""

    from biomass.config.schema import TestTimeTraining
    from biomass.cv.outputs import deployable_predictions
    from biomass.data.source import load_train_data
    from biomass.engine.build import make_accelerator
    from biomass.stages import AUX, MAIN
    from biomass.submission import write_submission

    run, root = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = RunDir(copy).read_config()
    cfg.infer.ttt = TestTimeTraining(epochs=1, blend=0.6, lr=1e-3)
    RunDir(copy).write_config(cfg)
    cfg = RunDir(copy).read_config()  # as inference reads it
    assert cfg.infer.ttt.blend == 0.6
    data = load_train_data(cfg)
    ids = {s: RunDir(copy).fold_ids(s) for s in (MAIN, AUX)}
    deployable = deployable_predictions(make_accelerator(cfg), cfg, data, RunDir(copy), ids,
                                        {s: sorted(set(v.tolist())) for s, v in ids.items()})
    oof = pd.read_csv(run / "oof_deployable.csv").set_index("sample_id")["target"]  # the chain without ttt
    by_image = dict(zip(data.table["image_id"], deployable))
    ttt_oof = pd.Series({f"{i}__{t}": by_image[i][j] for i in data.table["image_id"] for j, t in enumerate(TARGETS)})
    assert np.abs(ttt_oof.loc[oof.index].to_numpy() - oof.to_numpy()).max() > 1e-3  # the fine-tuning did something

    fold = 1
    paths = fold_as_test_set(copy, root, fold, tmp_path / "data")
    sub = write_submission(copy, tmp_path / "data", tmp_path / "sub.csv", main_folds=[fold], aux_folds=[fold])
    got = sub.set_index("sample_id")["target"]
    assert len(got) == 5 * len(paths)
    np.testing.assert_allclose(got.to_numpy(), ttt_oof.loc[got.index].to_numpy(), atol=1e-4, rtol=1e-4)


def test_deployable_metric_scores_the_deployable_oof(tiny_run):
    from biomass.metrics import weighted_r2

    run, root = tiny_run
    metrics = json.loads((run / "metrics.json").read_text())
    train = pd.read_csv(root / "train.csv").set_index("sample_id")["target"]
    oof = pd.read_csv(run / "oof_deployable.csv").set_index("sample_id")["target"]
    ids = sorted({s.rsplit("__", 1)[0] for s in oof.index})
    keys = [f"{i}__{t}" for i in ids for t in TARGETS]
    y = train.loc[keys].to_numpy().reshape(-1, 5)
    p = oof.loc[keys].to_numpy().reshape(-1, 5)
    assert metrics["cv/weighted_r2_deployable"] == pytest.approx(weighted_r2(y, p), abs=1e-5)
    assert (p >= 0).all()  # the chain's post-processing (clip) ran in the CV too


def test_crop_policy_frames_each_stage_as_it_trained():
    cfg = load_experiment(REPO / "experiments/gold.yaml").config
    none = ChainSettings.of(cfg)
    assert none.crop == "none" and not none.crops(cfg.main) and not none.crops(cfg.aux)  # the seed: uncropped test
    cfg.infer.crop = "boxes"
    boxes = ChainSettings.of(cfg)
    assert boxes.crops(cfg.main) and not boxes.crops(cfg.aux)  # main trained cropped, aux on the originals


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


def test_bf16_weights_predict_close_to_fp32(tiny_run):
    """`infer.weights_dtype: bfloat16` holds each fold model in half the memory; predictions stay close."""
    from accelerate import Accelerator

    from biomass.chain import every_fold, run_chain
    from biomass.data.source import load_test_images

    run_path, root = tiny_run
    run = RunDir(run_path)
    cfg = run.read_config()
    _, images = load_test_images(cfg, root, need_boxes=False)
    acc = Accelerator(cpu=True)
    folds = [0, 1, 2]
    fp32, _ = run_chain(acc, run, cfg, images, every_fold(folds, len(images)), every_fold(folds, len(images)))
    cfg.infer.weights_dtype = "bfloat16"
    bf16, _ = run_chain(acc, run, cfg, images, every_fold(folds, len(images)), every_fold(folds, len(images)))
    assert not np.array_equal(fp32, bf16)
    np.testing.assert_allclose(bf16, fp32, rtol=0.1, atol=0.5)
