"""The deployable CV is exactly what inference computes, with gold's chain structure at toy size: crop boxes on
(main trained cropped, test images framed alike), `infer.post` steps, aux folds split with a different seed from the
main folds, TTA, fold weights that blend several models per image; and `infer.ttt`, bf16 weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from biomass.config.load import load_experiment
from biomass.constants import TARGETS
from biomass.rundir import RunDir

# gold's structure: cropped main stage framed by its boxes at test time, post-processing, aux folds of their own
GOLD_LIKE = ["main.image.crop=true", "infer.crop=boxes", "aux.folds.splitter.seed=7", "aux.init_from=null",
             "infer.post=[mass_balance, {clover_scale: 0.8}]", "infer.tta=[none, hflip]",
             "infer.fold_weights=[0.5, 0.3, 0.2]", "tracking.mlflow=false"]


@pytest.fixture(scope="module")
def gold_like_run(tmp_path_factory, demo, tiny) -> tuple[Path, Path]:
    from biomass.cv.experiment import train_experiment
    from biomass.data.synthetic import generate

    tmp = tmp_path_factory.mktemp("chain")
    root = generate(tmp / "data", n_train=18, n_test=3, seed=5, width=128, height=64)
    exp = load_experiment(demo, [*tiny, *GOLD_LIKE, f"data.root={root}"])
    return train_experiment(exp, run_dir=tmp / "run"), root


def as_test_set(root: Path, paths, data: Path) -> Path:
    """A data root whose test.csv holds the training images `paths` (train.csv, crops.csv and train/ beside it)."""
    train = pd.read_csv(root / "train.csv")
    data.mkdir(parents=True)
    train[train["image_path"].isin(paths)][["sample_id", "image_path", "target_name"]].to_csv(data / "test.csv",
                                                                                             index=False)
    shutil.copytree(root / "train", data / "train")  # a symlink out of the data root is refused (check_inside)
    for name in ("train.csv", "crops.csv"):
        shutil.copy(root / name, data / name)
    return data


def test_the_run_has_golds_structure(gold_like_run):
    run, _ = gold_like_run
    cfg = RunDir(run).read_config()
    folds = pd.read_csv(run / "folds.csv")
    assert not (folds["main_fold"] == folds["aux_fold"]).all()  # the aux folds are their own split
    assert cfg.main.image.crop and cfg.infer.crop == "boxes" and len(cfg.infer.post) == 2
    assert len(cfg.infer.tta) == 2


def test_deployable_cv_is_what_inference_computes(gold_like_run, tmp_path):
    """Every training image, predicted at inference by exactly the aux and main fold models that held it out,
    equals its deployable OOF prediction: the CV and the submission run one chain."""
    from biomass.submission import write_submission

    run, root = gold_like_run
    folds = pd.read_csv(run / "folds.csv")
    oof = pd.read_csv(run / "oof_deployable.csv").set_index("sample_id")["target"]
    checked = 0
    for (main_fold, aux_fold), group in folds.groupby(["main_fold", "aux_fold"]):
        data = as_test_set(root, group["image_path"], tmp_path / f"data{main_fold}{aux_fold}")
        sub = write_submission(run, data, tmp_path / "sub.csv", main_folds=[int(main_fold)],
                               aux_folds=[int(aux_fold)])
        got = sub.set_index("sample_id")["target"]
        np.testing.assert_allclose(got.to_numpy(), oof.loc[got.index].to_numpy(), atol=1e-5, rtol=1e-5)
        checked += len(group)
    assert checked == len(folds)


def test_fold_weights_blend_every_main_model(gold_like_run, tmp_path):
    """With every main fold predicting every image, the submission is the fold-weighted mean of the single folds'
    predictions (the post steps here are linear, so they commute with the blend; clip off)."""
    from biomass.submission import write_submission

    run_path, root = gold_like_run
    run = tmp_path / "run"
    shutil.copytree(run_path, run)
    cfg = RunDir(run).read_config()
    cfg.infer.clip = False
    RunDir(run).write_config(cfg)
    paths = pd.read_csv(run / "folds.csv")["image_path"][:6]
    data = as_test_set(root, paths, tmp_path / "data")
    blend = write_submission(run, data, tmp_path / "all.csv")["target"].to_numpy()
    single = [write_submission(run, data, tmp_path / f"{k}.csv", main_folds=[k])["target"].to_numpy()
              for k in range(3)]
    expected = 0.5 * single[0] + 0.3 * single[1] + 0.2 * single[2]
    assert np.abs(single[0] - single[1]).max() > 1e-3  # the folds disagree: the weights matter
    np.testing.assert_allclose(blend, expected, atol=2e-5, rtol=1e-5)


def test_deployable_metric_scores_the_deployable_oof(gold_like_run):
    from biomass.metrics import weighted_r2

    run, root = gold_like_run
    metrics = json.loads((run / "metrics.json").read_text())
    train = pd.read_csv(root / "train.csv").set_index("sample_id")["target"]
    oof = pd.read_csv(run / "oof_deployable.csv").set_index("sample_id")["target"]
    ids = sorted({s.rsplit("__", 1)[0] for s in oof.index})
    keys = [f"{i}__{t}" for i in ids for t in TARGETS]
    y = train.loc[keys].to_numpy().reshape(-1, 5)
    p = oof.loc[keys].to_numpy().reshape(-1, 5)
    assert metrics["cv/weighted_r2_deployable"] == pytest.approx(weighted_r2(y, p), abs=1e-5)
    assert (p >= 0).all()  # the chain's post-processing (clip) ran in the CV too


def test_test_time_training_in_the_cv_is_what_inference_computes(gold_like_run, tmp_path):
    """`infer.ttt`: the deployable CV fine-tunes main fold k on its training images + its held-out images
    pseudo-labelled, exactly as inference on those images (as the test set) does; and it changes the result."""
    from biomass.config.schema import TestTimeTraining
    from biomass.cv.experiment import deployable_predictions
    from biomass.data.source import load_train_data
    from biomass.engine.build import make_accelerator
    from biomass.stages import AUX, MAIN
    run, root = gold_like_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = RunDir(copy).read_config()
    cfg.infer.ttt = TestTimeTraining(epochs=1, blend=0.6, lr=1e-3)
    RunDir(copy).write_config(cfg)
    cfg = RunDir(copy).read_config()  # as inference reads it
    data = load_train_data(cfg)
    ids = {s: RunDir(copy).fold_ids(s) for s in (MAIN, AUX)}
    deployable = deployable_predictions(make_accelerator(cfg), cfg, data, RunDir(copy), ids,
                                        {s: sorted(set(v.tolist())) for s, v in ids.items()})
    oof = pd.read_csv(run / "oof_deployable.csv").set_index("sample_id")["target"]  # the chain without ttt
    by_image = dict(zip(data.table["image_id"], deployable))
    ttt_oof = pd.Series({f"{i}__{t}": by_image[i][j] for i in data.table["image_id"] for j, t in enumerate(TARGETS)})
    assert np.abs(ttt_oof.loc[oof.index].to_numpy() - oof.to_numpy()).max() > 1e-3  # the fine-tuning did something

    # main fold 1's held-out images as a test set, read as inference reads one; each image's NDVI/Height from the
    # aux fold that held it out (aux folds are split apart from the main folds)
    from biomass.chain import Assignment, Chain
    from biomass.data.source import load_test_images
    from biomass.ttt import labelled_from

    folds = pd.read_csv(copy / "folds.csv")
    group = folds[folds["main_fold"] == 1]
    data_dir = as_test_set(root, group["image_path"], tmp_path / "data")
    _, images = load_test_images(cfg, data_dir, need_boxes=True)
    aux_of = dict(zip(group["image_path"], group["aux_fold"]))
    aux = {int(j): np.array([r for r, p in enumerate(images.image_paths) if aux_of[p] == j]) for j in set(aux_of.values())}
    labelled = labelled_from(cfg, data, ids[MAIN], [1])
    chain = Chain(make_accelerator(cfg), RunDir(copy), cfg, labelled=labelled)
    pred, _ = chain.predict(images, Assignment({1: np.arange(len(images))}, aux))
    got = pd.Series({f"{p.split('/')[-1].rsplit('.', 1)[0]}__{t}": pred[r][j] for r, p in enumerate(images.image_paths)
                     for j, t in enumerate(TARGETS)})
    assert len(got) == 5 * len(group)
    np.testing.assert_allclose(got.to_numpy(), ttt_oof.loc[got.index].to_numpy(), atol=1e-4, rtol=1e-4)


def test_bf16_weights_predict_close_to_fp32(gold_like_run):
    """`infer.weights_dtype: bfloat16` holds each fold model in half the memory; predictions stay close."""
    from accelerate import Accelerator

    from biomass.chain import Assignment, Chain
    from biomass.data.source import load_test_images

    run_path, root = gold_like_run
    run = RunDir(run_path)
    cfg = run.read_config()
    _, images = load_test_images(cfg, root, need_boxes=True)
    acc = Accelerator(cpu=True)
    every = Assignment.every_fold([0, 1, 2], [0, 1, 2], len(images))
    fp32, _ = Chain(acc, run, cfg).predict(images, every)
    cfg.infer.weights_dtype = "bfloat16"
    bf16, _ = Chain(acc, run, cfg).predict(images, every)
    assert not np.array_equal(fp32, bf16)
    np.testing.assert_allclose(bf16, fp32, rtol=0.1, atol=0.5)
