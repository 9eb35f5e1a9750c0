"""biomass.data.synthetic: Kaggle layout, real labels, determinism, CLI, and images whose content carries the labels."""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from biomass.constants import TARGETS, TEST_COLUMNS, TRAIN_COLUMNS
from biomass.data.synthetic import generate, load_label_table, render_quadrat
from biomass.data.synthetic.__main__ import main
from biomass.errors import DataError, run_cli

W, H = 200, 100


def _wide(df: pd.DataFrame) -> pd.DataFrame:
    """Long -> one row per image_path, TARGETS columns."""
    return df.pivot_table(index="image_path", columns="target_name", values="target", sort=False)[list(TARGETS)]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "data", n_train=12, n_test=4, seed=0, width=W, height=H)


def test_layout(small: Path) -> None:
    train = pd.read_csv(small / "train.csv")
    test = pd.read_csv(small / "test.csv")
    sub = pd.read_csv(small / "sample_submission.csv")
    sol = pd.read_csv(small / "solution.csv")
    crops = pd.read_csv(small / "crops.csv")

    assert tuple(train.columns) == TRAIN_COLUMNS and len(train) == 60
    assert tuple(test.columns) == TEST_COLUMNS and len(test) == 20
    assert list(sub.columns) == ["sample_id", "target"] and (sub["target"] == 0.0).all()
    assert sub["sample_id"].tolist() == test["sample_id"].tolist()
    assert list(sol.columns[:2]) == ["sample_id", "target"]
    assert sorted(sol["sample_id"]) == sorted(test["sample_id"]) and sol["sample_id"].is_unique

    for df, split in ((train, "train"), (test, "test")):
        assert df["sample_id"].is_unique
        assert df["image_path"].str.fullmatch(rf"{split}/ID\d+\.jpg").all()
        assert (df["sample_id"] == df["image_path"].str[len(split) + 1:-4] + "__" + df["target_name"]).all()
        per_image = df.groupby("image_path")["target_name"].agg(lambda s: tuple(sorted(s)))
        assert (per_image == tuple(sorted(TARGETS))).all()
    assert train["image_path"].nunique() == 12 and test["image_path"].nunique() == 4
    assert not set(train["image_path"].str[6:]) & set(test["image_path"].str[5:])

    paths = list(dict.fromkeys(train["image_path"])) + list(dict.fromkeys(test["image_path"]))
    assert sorted(p.relative_to(small).as_posix() for p in small.glob("*/*.jpg")) == sorted(paths)
    for path in paths:
        img = cv2.imread(str(small / path), cv2.IMREAD_COLOR)
        assert img is not None and img.shape == (H, W, 3)

    assert list(crops.columns) == ["image_path", "x0", "y0", "x1", "y1"]
    assert crops["image_path"].tolist() == paths
    assert ((0 <= crops.x0) & (crops.x0 < crops.x1) & (crops.x1 <= W)).all()
    assert ((0 <= crops.y0) & (crops.y0 < crops.y1) & (crops.y1 <= H)).all()

    wide = _wide(train)
    assert np.allclose(wide["GDM_g"], wide["Dry_Green_g"] + wide["Dry_Clover_g"], atol=0.5)
    assert "SYNTHETIC" in (small / "README.md").read_text() and "CC BY-SA 4.0" in (small / "README.md").read_text()


def test_labels_are_real_rows(small: Path) -> None:
    """Every image's rows equal the real table's rows for that ID (first use of a row keeps its real ID)."""
    real = load_label_table().copy()
    real["id"] = real["image_path"].str.split("/").str[-1].str[:-4]
    cols = ["Sampling_Date", "State", "Species", "Pre_GSHH_NDVI", "Height_Ave_cm", "target_name", "target"]
    sol = pd.read_csv(small / "solution.csv")
    for df in (pd.read_csv(small / "train.csv"), sol):
        df = df.assign(id=df["image_path"].str.split("/").str[-1].str[:-4])
        merged = df.merge(real, on=["id", "target_name"], suffixes=("", "_real"), validate="one_to_one")
        assert len(merged) == len(df)
        for col in cols:
            if col != "target_name":
                assert (merged[col] == merged[f"{col}_real"]).all(), col


def test_oversampling_gives_fresh_unique_ids(tmp_path: Path) -> None:
    root = generate(tmp_path / "big", n_train=355, n_test=5, seed=1, width=32, height=16)
    ids = pd.concat([pd.read_csv(root / "train.csv"), pd.read_csv(root / "solution.csv")])["image_path"]
    ids = ids.str.split("/").str[-1].drop_duplicates()
    assert len(ids) == 360
    fresh = ids[~ids.isin(load_label_table()["image_path"].str.split("/").str[-1])]
    assert len(fresh) == 3 and fresh.str.fullmatch(r"ID9\d{9}\.jpg").all()


def test_deterministic(tmp_path: Path) -> None:
    kwargs = dict(n_train=5, n_test=2, width=96, height=48)
    a = _files(generate(tmp_path / "a", seed=7, **kwargs))
    b = _files(generate(tmp_path / "b", seed=7, **kwargs))
    c = _files(generate(tmp_path / "c", seed=8, **kwargs))
    assert len(a) == 5 + 2 + 6 and a == b
    assert a["train.csv"] != c["train.csv"]


def test_render_full_size() -> None:
    labels = {"Dry_Green_g": 30.0, "Dry_Dead_g": 10.0, "Dry_Clover_g": 5.0, "GDM_g": 35.0, "Dry_Total_g": 45.0,
              "Pre_GSHH_NDVI": 0.7, "Height_Ave_cm": 6.0}
    start = time.perf_counter()
    img = render_quadrat(np.random.default_rng(0), labels, 2000, 1000, (100, 40, 1900, 1000), "2015/09/04")
    elapsed = time.perf_counter() - start
    assert img.shape == (1000, 2000, 3) and img.dtype == np.uint8
    assert elapsed < 5.0  # ~0.15 s on one core; the bound only catches a pathological slowdown
    # The cardboard band is flat and bright; the pasture is textured.
    band, pasture = img[:, :90].astype(float), img[40:, 100:1900].astype(float)
    assert band.mean() > pasture.mean() and band.std() < pasture.std()


def test_render_rejects_bad_box() -> None:
    labels = {"Dry_Green_g": 1.0, "Dry_Dead_g": 1.0, "Dry_Clover_g": 1.0, "Pre_GSHH_NDVI": 0.5, "Height_Ave_cm": 2.0}
    with pytest.raises(DataError):
        render_quadrat(np.random.default_rng(0), labels, 64, 32, (10, 10, 80, 20), None)


def test_cli(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    assert main([str(out), "--n-train", "3", "--n-test", "1", "--seed", "2", "--width", "64", "--height", "32"]) == 0
    assert len(pd.read_csv(out / "train.csv")) == 15 and len(pd.read_csv(out / "test.csv")) == 5
    assert "--n-train 3 --n-test 1 --seed 2 --width 64 --height 32" in (out / "README.md").read_text()
    assert cv2.imread(str(out / pd.read_csv(out / "test.csv")["image_path"][0])).shape == (32, 64, 3)
    capsys.readouterr()

    # A non-empty directory is refused with one error line and exit code 2.
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(out), "--width", "64", "--height", "32"])
    assert exit_info.value.code == 2
    assert str(out) in capsys.readouterr().err


def test_non_empty_dir_refused(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(DataError, match=str(tmp_path)):
        generate(tmp_path, n_train=1, n_test=0, width=32, height=16)
    assert (tmp_path / "x.txt").read_text() == "keep me"
    assert generate(tmp_path / "new" / "empty", n_train=1, n_test=0, width=32, height=16).is_dir()


def _fractions(img_bgr: np.ndarray) -> tuple[float, float, float]:
    """Shares of grass-green, straw and clover pixels by hue/saturation/value (OpenCV HSV: hue in 0..179)."""
    h, s, v = (c.astype(int) for c in cv2.split(cv2.cvtColor(img_bgr, cv2.COLOR_BGR2HSV)))
    green = (h >= 30) & (h < 60) & (s >= 77) & (v >= 64)
    straw = (h >= 15) & (h < 30) & (v >= 150) & (s >= 30) & (s < 160)
    clover = (h >= 62) & (h < 80) & (s >= 77)
    return float(green.mean()), float(straw.mean()), float(clover.mean())


def test_content_carries_labels(tmp_path: Path) -> None:
    """Green / straw / clover pixel shares inside the crop box rank images like their grams do."""
    root = generate(tmp_path / "rank", n_train=40, n_test=0, seed=3, width=W, height=H)
    wide = _wide(pd.read_csv(root / "train.csv"))
    crops = pd.read_csv(root / "crops.csv").set_index("image_path")
    rows = []
    for path in wide.index:
        x0, y0, x1, y1 = crops.loc[path]
        rows.append(_fractions(cv2.imread(str(root / path))[y0:y1, x0:x1]))
    frac = pd.DataFrame(rows, index=wide.index, columns=["green", "straw", "clover"])
    assert frac["green"].corr(wide["Dry_Green_g"], method="spearman") > 0.6
    assert frac["straw"].corr(wide["Dry_Dead_g"], method="spearman") > 0.6
    assert frac["clover"].corr(wide["Dry_Clover_g"], method="spearman") > 0.6


def test_more_grams_more_cover() -> None:
    """Holding everything else fixed, more grams of a component give more pixels of its colour."""
    base = {"Dry_Green_g": 10.0, "Dry_Dead_g": 10.0, "Dry_Clover_g": 10.0, "Pre_GSHH_NDVI": 0.7, "Height_Ave_cm": 5.0}
    for key, j in (("Dry_Green_g", 0), ("Dry_Dead_g", 1), ("Dry_Clover_g", 2)):
        shares = []
        for grams in (0.0, 5.0, 20.0, 60.0):
            img = render_quadrat(np.random.default_rng(1), {**base, key: grams}, 320, 160, None, None)
            shares.append(_fractions(img[:, :, ::-1].copy())[j])
        assert shares == sorted(shares) and shares[-1] > shares[0] + 0.1, (key, shares)
