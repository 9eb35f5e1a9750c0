"""biomass.data: CSV validation (one test per bad input), images, crops, folds, scalers, augmentation, sampling."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.model_selection import KFold, StratifiedGroupKFold

from helpers import smooth_rgb

from biomass.constants import META, TABULAR, TARGETS, TEST_COLUMNS
from biomass.data import folds as folds_mod
from biomass.data.images import EpochSampler, ImageDataset, build_augment
from biomass.data.scalers import Scaler
from biomass.data.table import read_test, read_train
from biomass.errors import ConfigError, DataError
from biomass.registry import SPLITTERS

W, H = 64, 32  # the synthetic_root fixture's image size


# ----------------------------------------------------------------------------------------------------------- helpers
def long_train(root: Path) -> pd.DataFrame:
    """train.csv as raw text, so a mutated copy differs from the original only where a test changes it."""
    return pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)


def write_csv(df: pd.DataFrame, folder: Path, name: str = "train.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(folder / name, index=False)
    return folder


def bad_train(df: pd.DataFrame, tmp_path: Path) -> str:
    """read_train on a mutated train.csv; returns the DataError message (and fails if none is raised)."""
    write_csv(df, tmp_path)
    with pytest.raises(DataError) as err:
        read_train(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "train.csv") in msg, msg  # every table error names the file
    return msg


def row_of(df: pd.DataFrame, image_index: int = 3, target: str = "Dry_Dead_g") -> int:
    """Row label of one (image, target) in the long table."""
    image = pd.unique(df["image_path"])[image_index]
    return int(df.index[(df["image_path"] == image) & (df["target_name"] == target)][0])


# ------------------------------------------------------------------------------------------------ CSV: bad inputs
def test_missing_csv(tmp_path):
    with pytest.raises(DataError, match="train.csv.*not found"):
        read_train(tmp_path)


def test_empty_csv(tmp_path):
    (tmp_path / "train.csv").write_bytes(b"")
    with pytest.raises(DataError, match=r"train\.csv: the file is empty"):
        read_train(tmp_path)


def test_header_only_csv(tmp_path, synthetic_root):
    write_csv(long_train(synthetic_root).iloc[:0], tmp_path)
    with pytest.raises(DataError, match=r"train\.csv: has a header but no rows"):
        read_train(tmp_path)


@pytest.mark.parametrize("column", ["State", "target", "Pre_GSHH_NDVI", "sample_id"])
def test_missing_column(tmp_path, synthetic_root, column):
    msg = bad_train(long_train(synthetic_root).drop(columns=[column]), tmp_path)
    assert f"missing column {column!r}" in msg


def test_unknown_target_name(tmp_path, synthetic_root):
    df = long_train(synthetic_root)
    r = row_of(df)
    df.loc[r, "target_name"] = "Dry_Weed_g"
    msg = bad_train(df, tmp_path)
    assert df.loc[r, "sample_id"] in msg and "'Dry_Weed_g'" in msg and "unknown target_name" in msg


@pytest.mark.parametrize("text", ["", "nan", "inf", "-inf", "abc", "1,5"])
def test_bad_target_value(tmp_path, synthetic_root, text):
    df = long_train(synthetic_root)
    r = row_of(df, 4, "GDM_g")
    df.loc[r, "target"] = text
    msg = bad_train(df, tmp_path)
    assert repr(df.loc[r, "sample_id"]) in msg and "'target'" in msg


def test_negative_target(tmp_path, synthetic_root):
    df = long_train(synthetic_root)
    r = row_of(df, 2, "Dry_Clover_g")
    df.loc[r, "target"] = "-0.5"
    msg = bad_train(df, tmp_path)
    assert repr(df.loc[r, "sample_id"]) in msg and "negative target" in msg


@pytest.mark.parametrize("column", TABULAR)
def test_non_numeric_tabular(tmp_path, synthetic_root, column):
    df = long_train(synthetic_root)
    r = row_of(df, 1)
    df.loc[r, column] = "n/a"
    msg = bad_train(df, tmp_path)
    assert repr(df.loc[r, "sample_id"]) in msg and repr(column) in msg


def test_duplicate_sample_id(tmp_path, synthetic_root):
    df = long_train(synthetic_root)
    r = row_of(df, 5, "Dry_Green_g")
    df = pd.concat([df, df.loc[[r]]], ignore_index=True)
    msg = bad_train(df, tmp_path)
    assert f"duplicate sample_id {df.loc[r, 'sample_id']!r}" in msg


def test_sample_id_not_matching_its_row(tmp_path, synthetic_root):
    df = long_train(synthetic_root)
    r = row_of(df, 6, "Dry_Total_g")
    image_id = Path(df.loc[r, "image_path"]).stem
    df.loc[r, "sample_id"] = f"{image_id}__Dry_Total"  # unique, but not image_id__target_name
    msg = bad_train(df, tmp_path)
    assert f"'{image_id}__Dry_Total'" in msg and f"'{image_id}__Dry_Total_g'" in msg


def test_target_missing_for_an_image(tmp_path, synthetic_root):
    df = long_train(synthetic_root)
    r = row_of(df, 7, "Dry_Clover_g")
    image = df.loc[r, "image_path"]
    msg = bad_train(df.drop(index=r), tmp_path)
    assert repr(image) in msg and "'Dry_Clover_g'" in msg


@pytest.mark.parametrize("column", [*TABULAR, "State"])
def test_inconsistent_value_within_an_image(tmp_path, synthetic_root, column):
    df = long_train(synthetic_root)
    r = row_of(df, 8, "Dry_Dead_g")
    df.loc[r, column] = "7.25" if column in TABULAR else "WA"
    msg = bad_train(df, tmp_path)
    assert repr(df.loc[r, "image_path"]) in msg and repr(column) in msg and "inconsistent" in msg


def test_empty_key_cell(tmp_path, synthetic_root):
    df = long_train(synthetic_root)
    df.loc[12, "image_path"] = ""
    msg = bad_train(df, tmp_path)
    assert "row 14" in msg and "'image_path'" in msg  # 1-based, after the header


def test_test_csv_errors_name_the_file(tmp_path, synthetic_root):
    df = pd.read_csv(synthetic_root / "test.csv", dtype=str)
    df.loc[0, "target_name"] = "Dry_Moss_g"
    write_csv(df, tmp_path, "test.csv")
    with pytest.raises(DataError, match=r"test\.csv: sample_id .* unknown target_name 'Dry_Moss_g'"):
        read_test(tmp_path)


# ------------------------------------------------------------------------------------------------ CSV: good inputs
def test_read_train_wide_table(synthetic_root):
    table = read_train(synthetic_root)
    long = pd.read_csv(synthetic_root / "train.csv")
    assert list(table.columns) == ["image_id", "image_path", *META, *TABULAR, *TARGETS]
    assert len(table) == long["image_path"].nunique() == 10
    assert table["image_path"].tolist() == sorted(long["image_path"].unique())
    assert table["image_id"].tolist() == [Path(p).stem for p in table["image_path"]]
    for row in table.itertuples(index=False):
        rows = long[long["image_path"] == row.image_path].set_index("target_name")
        for t in TARGETS:
            assert getattr(row, t) == pytest.approx(rows.loc[t, "target"])
        assert row.Pre_GSHH_NDVI == pytest.approx(rows["Pre_GSHH_NDVI"].iloc[0])
        assert row.State == rows["State"].iloc[0]
    assert table[list(TARGETS)].dtypes.map(lambda d: d == np.float64).all()


def test_read_train_ignores_row_order(tmp_path, synthetic_root):
    df = long_train(synthetic_root).sample(frac=1.0, random_state=3)
    write_csv(df, tmp_path)
    pd.testing.assert_frame_equal(read_train(tmp_path), read_train(synthetic_root))


def test_read_test(synthetic_root):
    rows, images = read_test(synthetic_root)
    raw = pd.read_csv(synthetic_root / "test.csv")
    assert list(rows.columns) == list(TEST_COLUMNS) and len(rows) == 15
    assert rows["sample_id"].tolist() == raw["sample_id"].tolist()
    assert images["image_path"].tolist() == list(dict.fromkeys(raw["image_path"]))  # first-appearance order
    assert images["image_id"].tolist() == [Path(p).stem for p in images["image_path"]]


# -------------------------------------------------------------------------------------------------------- folds
def group_table(n_dates: int = 20, per_date: int = 3, seed: int = 0) -> pd.DataFrame:
    """Images in date groups; each date belongs to one State (a quarter of the dates to the rare 'WA')."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n_dates):
        state = "WA" if d % 4 == 0 else ("Vic" if d % 2 else "NSW")
        for _ in range(int(per_date + rng.integers(0, 2))):
            rows.append({"State": state, "Sampling_Date": f"2015/1/{d + 1}", "Species": "Ryegrass"})
    return pd.DataFrame(rows)


def test_splitters_registered():
    assert {"kfold", "grouped"} <= set(SPLITTERS.names())


@pytest.mark.parametrize("n_splits, seed", [(5, 42), (3, 7)])
def test_kfold_reproduces_sklearn(synthetic_root, n_splits, seed):
    table = read_train(synthetic_root)
    folds = SPLITTERS.build("kfold", n_splits=n_splits, seed=seed)(table)
    expected = np.full(len(table), -1)
    for k, (_, val) in enumerate(KFold(n_splits, shuffle=True, random_state=seed).split(np.arange(len(table)))):
        expected[val] = k
    assert np.array_equal(folds, expected)
    assert set(folds) == set(range(n_splits))


def test_kfold_default_is_the_seeds_split():
    table = group_table(40, 1)
    expected = np.full(len(table), -1)
    for k, (_, val) in enumerate(KFold(5, shuffle=True, random_state=42).split(np.zeros(len(table)))):
        expected[val] = k
    assert np.array_equal(folds_mod.kfold()(table), expected)


def test_kfold_too_few_images():
    with pytest.raises(ConfigError, match="5 folds need at least 5 images, the data has 3"):
        folds_mod.kfold()(pd.DataFrame({"State": ["NSW"] * 3}))


@pytest.mark.parametrize("by", [("State",), ("Sampling_Date",), ("State", "Sampling_Date")])
def test_grouped_keeps_groups_together(by):
    table = group_table()
    n_splits = 3
    folds = folds_mod.grouped(n_splits=n_splits, by=by)(table)
    assert set(folds) == set(range(n_splits))
    key = table[list(by)].astype(str).agg("|".join, axis=1)
    assert (pd.Series(folds).groupby(key).nunique() == 1).all()


def test_grouped_fewer_groups_than_folds(synthetic_root):
    table = read_train(synthetic_root)  # 3 States
    n_states = table["State"].nunique()
    assert n_states < 5
    with pytest.raises(ConfigError, match=f"5 folds need at least 5 groups of State, the data has {n_states}"):
        folds_mod.grouped(n_splits=5, by=("State",))(table)


def test_grouped_bad_column():
    with pytest.raises(ConfigError, match="cannot group by 'Height'"):
        folds_mod.grouped(by=("Height",))
    with pytest.raises(ConfigError, match="cannot group by 'Colour'"):
        folds_mod.grouped(by=("State",), stratify="Colour")


def test_grouped_stratified():
    table = group_table(24, 3)
    folds = folds_mod.grouped(n_splits=4, by=("Sampling_Date",), stratify="State", seed=5)(table)
    assert (pd.Series(folds).groupby(table["Sampling_Date"]).nunique() == 1).all()
    expected = np.full(len(table), -1)
    cv = StratifiedGroupKFold(4, shuffle=True, random_state=5)
    for k, (_, val) in enumerate(cv.split(np.zeros(len(table)), table["State"], table["Sampling_Date"])):
        expected[val] = k
    assert np.array_equal(folds, expected)
    for k in range(4):  # every fold sees every State, the rare one included
        assert set(table.loc[folds == k, "State"]) == {"WA", "Vic", "NSW"}


# ------------------------------------------------------------------------------------------------------- scaler
def test_scaler_round_trip_and_population_std():
    rng = np.random.default_rng(0)
    y = rng.gamma(2.0, 20.0, size=(50, 5))
    s = Scaler.fit(y)
    np.testing.assert_allclose(s.mean, y.mean(axis=0))
    np.testing.assert_allclose(s.scale, y.std(axis=0, ddof=0))
    z = s.transform(y)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-12)
    np.testing.assert_allclose(s.inverse(z), y, rtol=1e-12)


def test_scaler_log1p():
    y = np.random.default_rng(1).gamma(1.5, 30.0, size=(40, 5))
    y[0, 2] = 0.0
    s = Scaler.fit(y, log1p=True)
    np.testing.assert_allclose(s.mean, np.log1p(y).mean(axis=0))
    np.testing.assert_allclose(s.scale, np.log1p(y).std(axis=0))
    np.testing.assert_allclose(s.transform(y), (np.log1p(y) - s.mean) / s.scale)
    np.testing.assert_allclose(s.inverse(s.transform(y)), y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("log1p", [False, True])
def test_scaler_json_round_trip(log1p):
    y = np.random.default_rng(2).uniform(0, 100, size=(20, 2))
    s = Scaler.fit(y, log1p=log1p)
    back = Scaler.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back.log1p is log1p
    np.testing.assert_array_equal(back.mean, s.mean)
    np.testing.assert_array_equal(back.scale, s.scale)
    np.testing.assert_array_equal(back.transform(y), s.transform(y))


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 12), st.integers(1, 5)),
              elements=st.floats(0, 1e4, allow_nan=False, allow_infinity=False)),
       st.booleans())
def test_scaler_inverse_undoes_transform(values, log1p):
    s = Scaler.fit(values, log1p=log1p)
    np.testing.assert_allclose(s.inverse(s.transform(values)), values, rtol=1e-9, atol=1e-6)


# ------------------------------------------------------------------------------------------------- augmentation
def test_build_augment_ok():
    aug = build_augment([{"name": "HorizontalFlip", "p": 1.0}, {"name": "VerticalFlip", "p": 0.0}])
    img = smooth_rgb(8, 12)
    assert np.array_equal(aug(image=img)["image"], img[:, ::-1])


@pytest.mark.parametrize("specs, pattern", [
    ([{"name": "HorizontalFlip"}, {"name": "HorizontalFlipp"}], r"'main\.augment\.train\[1\]\.name'.*'HorizontalFlip'"),
    ([{"p": 0.5}], r"'main\.augment\.train\[0\]': expected a mapping"),
    (["HorizontalFlip"], r"'main\.augment\.train\[0\]': expected a mapping"),
    ([{"name": "HorizontalFlip"}, {"name": "VerticalFlip"}, {"name": "Resize", "height": 8, "width": 8}],
     r"'main\.augment\.train\[2\]\.name': Resize is done by the loader"),
    ([{"name": "Normalize"}], r"'main\.augment\.train\[0\]\.name': Normalize"),
    ([{"name": "HorizontalFlip", "p": 5}], r"'main\.augment\.train\[0\]' \(HorizontalFlip\): .*p"),
    ([{"name": "VerticalFlip"}, {"name": "GaussNoise", "std_range": [0.5, 0.1]}],
     r"'main\.augment\.train\[1\]' \(GaussNoise\): .*std_range"),
    ([{"name": "HorizontalFlip", "prob": 0.5}], r"'main\.augment\.train\[0\]' \(HorizontalFlip\): .*prob"),
    ([{"name": "Compose"}], r"'main\.augment\.train\[0\]\.name': 'Compose' is not an albumentations transform"),
])
@pytest.mark.filterwarnings("ignore:Argument.*not valid for transform")
def test_build_augment_errors_name_the_index(specs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_augment(specs, key="main.augment.train")


# ----------------------------------------------------------------------------------------------- sampler, dataset
def test_epoch_sampler():
    s = EpochSampler(12, seed=3, shuffle=True)
    s.set_epoch(2)
    first, again = list(s), list(s)
    assert first == again and len(s) == 12
    assert sorted(first) == list(range(24, 36))  # epoch * n + a permutation of the indices
    s2 = EpochSampler(12, seed=3, shuffle=True)
    s2.set_epoch(2)
    assert list(s2) == first  # a fresh sampler (a resumed run) draws the same order
    s.set_epoch(3)
    assert [k - 36 for k in s] != [k - 24 for k in first]
    assert list(EpochSampler(12, seed=4, shuffle=True)) != list(EpochSampler(12, seed=3, shuffle=True))
    plain = EpochSampler(5, seed=3, shuffle=False)
    plain.set_epoch(1)
    assert list(plain) == [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def tiny_images() -> list[np.ndarray]:
    return [smooth_rgb(16, 24, seed=i) for i in range(6)]


def _dataset(images, specs, seed=0, targets=True):
    n = len(images)
    tab = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    y = np.arange(n * 5, dtype=np.float64).reshape(n, 5) if targets else None
    return ImageDataset(lambda i: images[i].copy(), n, tab, y, build_augment(specs), seed)


AUG = [{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5},
       {"name": "RandomBrightnessContrast", "p": 0.8}, {"name": "GaussNoise", "std_range": [0.02, 0.05], "p": 0.5}]


def test_dataset_item_without_augmentation(tiny_images):
    ds = _dataset(tiny_images, [])
    item = ds[6 + 4]  # epoch 1, image 4
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 16, 24)
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), tiny_images[4])
    assert int(item["index"]) == 4
    assert torch.equal(item["tabular"], torch.tensor([8.0, 9.0]))
    assert torch.equal(item["target"], torch.arange(20, 25, dtype=torch.float32))
    assert "target" not in _dataset(tiny_images, [], targets=False)[0]


def test_dataset_augmentation_is_a_function_of_seed_epoch_index(tiny_images):
    n = len(tiny_images)
    keys = [e * n + i for e in range(3) for i in range(n)]
    forward = {k: _dataset(tiny_images, AUG)[k]["image"] for k in keys}
    ds = _dataset(tiny_images, AUG)
    backward = {k: ds[k]["image"] for k in reversed(keys)}
    shuffled_ds = _dataset(tiny_images, AUG)
    for k in np.random.default_rng(0).permutation(keys):
        assert torch.equal(shuffled_ds[int(k)]["image"], forward[int(k)])
    for k in keys:
        img = forward[k]
        assert img.dtype == torch.uint8 and img.shape == (3, 16, 24)
        assert torch.equal(img, backward[k])
    # the augmentation really is random: epochs and seeds differ
    assert any(not torch.equal(forward[i], forward[n + i]) for i in range(n))
    other = _dataset(tiny_images, AUG, seed=1)
    assert any(not torch.equal(other[k]["image"], forward[k]) for k in keys)
