"""The winning solutions' augmentations (biomass.data.augment), built by name through build_augment like any config."""
from __future__ import annotations

import contextlib
import itertools
import random

import numpy as np
import pytest

from biomass.data.images import build_augment
from biomass.errors import ConfigError

OURS = ["DateStamp", "RedDot", "VerticalStripShuffle"]
GRASS = (60, 120, 50)  # RGB background, darker red and bluer than the orange stamp


def grass(h: int = 128, w: int = 128, seed: int = 0) -> np.ndarray:
    """A green uint8 RGB image with mild noise (every column distinct, so strips can be matched)."""
    noise = np.random.default_rng(seed).integers(-8, 9, (h, w, 3))
    return np.clip(np.asarray(GRASS) + noise, 0, 255).astype(np.uint8)


def run(specs, image: np.ndarray, seed: int) -> np.ndarray:
    compose = build_augment(specs, key="main.augment.train")
    compose.set_random_seed(seed)
    return compose(image=image)["image"]


@pytest.mark.parametrize("name", OURS)
def test_changes_image_keeps_shape_and_dtype(name):
    image = grass(128, 130)
    for seed in range(5):
        out = run([{"name": name, "p": 1.0}], image.copy(), seed)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert not np.array_equal(out, image), (name, seed)


@pytest.mark.parametrize("name", OURS)
def test_same_seed_same_image_whatever_the_global_random_state(name):
    image = grass()
    random.seed(1), np.random.seed(1)
    first = run([{"name": name, "p": 1.0}], image.copy(), 7)
    random.seed(2), np.random.seed(2)
    np.random.random(5), random.random()
    again = run([{"name": name, "p": 1.0}], image.copy(), 7)
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("name", OURS)
def test_different_seeds_different_images(name):
    image = grass()
    outs = {run([{"name": name, "p": 1.0}], image.copy(), seed).tobytes() for seed in range(8)}
    assert len(outs) >= 3  # VerticalStripShuffle with 2 strips has one non-identity order, so allow some repeats


@pytest.mark.parametrize("name", OURS)
def test_p_zero_leaves_image_unchanged(name):
    image = grass()
    for seed in range(3):
        np.testing.assert_array_equal(run([{"name": name, "p": 0.0}], image.copy(), seed), image)


def test_probability_applies_about_p_of_the_time():
    image = grass(32, 32)
    changed = sum(not np.array_equal(run([{"name": "RedDot", "p": 0.25}], image, s), image) for s in range(400))
    assert 60 <= changed <= 140


def split(image: np.ndarray, n: int) -> list[np.ndarray]:
    w = image.shape[1]
    return [image[:, round(k * w / n):round((k + 1) * w / n)] for k in range(n)]


def test_strip_shuffle_permutes_equal_width_strips():
    image = grass(64, 120)  # 120 columns: 2, 3 and 4 strips are all exactly equal
    seen = set()
    for seed in range(20):
        out = run([{"name": "VerticalStripShuffle", "strips_range": [2, 4], "p": 1.0}], image.copy(), seed)
        assert out.shape == image.shape
        matches = []
        for n in (2, 3, 4):
            src = [s.tobytes() for s in split(image, n)]
            dst = [s.tobytes() for s in split(out, n)]
            if sorted(src) == sorted(dst):  # every output strip is an input strip, each used once
                matches.append((n, tuple(src.index(d) for d in dst)))
        assert matches, f"seed {seed}: output is not a permutation of 2, 3 or 4 input strips"
        n, order = matches[0]
        assert order != tuple(range(n))
        seen.add(n)
    assert seen == {2, 3, 4}


def test_strip_shuffle_fixed_count_and_uneven_width():
    image = grass(16, 130)  # 130 is not a multiple of 3: strips of 43, 44 and 43 columns (round(k * 130 / 3))
    strips = split(image, 3)
    assert [s.shape[1] for s in strips] == [43, 44, 43]
    orders = set()
    for seed in range(10):
        out = run([{"name": "VerticalStripShuffle", "strips_range": [3, 3], "p": 1.0}], image.copy(), seed)
        assert out.shape == image.shape
        found = [order for order in itertools.permutations(range(3))
                 if np.array_equal(out, np.concatenate([strips[i] for i in order], axis=1))]
        assert len(found) == 1 and found[0] != (0, 1, 2), seed
        orders.add(found[0])
    assert len(orders) >= 3  # several of the five non-identity orders are drawn


def test_date_stamp_is_orange_small_and_in_a_corner():
    h = w = 800
    image = grass(h, w)
    for seed in range(6):
        out = run([{"name": "DateStamp", "height_range": [0.035, 0.06], "p": 1.0}], image.copy(), seed)
        diff = np.abs(out.astype(int) - image.astype(int)).sum(axis=2)
        ys, xs = np.nonzero(diff)
        assert len(ys) > 200
        delta = out[ys, xs].astype(int) - image[ys, xs].astype(int)
        assert (delta[:, 0] >= delta[:, 2]).all() and (delta[:, 0] >= 0).all()  # every touched pixel: towards orange
        core = out[diff >= np.percentile(diff[diff > 0], 75)].astype(int)  # the solid strokes
        assert (core[:, 0] >= 190).mean() > 0.9 and (core[:, 2] <= 70).mean() > 0.9
        assert ((core[:, 1] >= 80) & (core[:, 1] <= 180)).mean() > 0.9  # orange, not red or yellow-white
        assert ys.max() - ys.min() < 0.06 * h * 1.6  # one line of text, about the requested height
        near_x = xs.min() < 0.05 * w or xs.max() > 0.95 * w
        near_y = ys.min() < 0.05 * h or ys.max() > 0.95 * h
        assert near_x and near_y, f"seed {seed}: stamp not in a corner"


def test_red_dots_are_red_and_small():
    image = grass(200, 200)
    out = run([{"name": "RedDot", "count_range": [2, 2], "radius_range": [0.03, 0.03], "p": 1.0}], image, 4)
    diff = np.abs(out.astype(int) - image.astype(int)).sum(axis=2)
    core = out[diff >= np.percentile(diff[diff > 0], 50)].astype(int)
    assert (core[:, 0] >= 170).all() and (core[:, 1] <= 90).all() and (core[:, 2] <= 90).all()
    area = (diff > 0).sum()  # two dots of radius 6 px, anti-aliased edge included, maybe overlapping
    assert np.pi * 6**2 * 0.8 <= area <= 2 * np.pi * 7.5**2


def test_mixed_with_albumentations_in_one_list():
    gold = [{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5},
            {"name": "RandomBrightnessContrast", "brightness_limit": 0.2, "contrast_limit": 0.2, "p": 0.5},
            {"name": "HueSaturationValue", "hue_shift_limit": 10, "sat_shift_limit": 20, "val_shift_limit": 10,
             "p": 0.5}, {"name": "GaussNoise", "std_range": [0.0124, 0.0277], "p": 0.3}]
    specs = gold + [{"name": "DateStamp", "p": 0.25}, {"name": "RedDot", "p": 0.25},
                    {"name": "VerticalStripShuffle", "p": 0.5}]
    compose = build_augment(specs)
    assert [type(t).__name__ for t in compose.transforms][-3:] == OURS
    a, b = run(specs, grass(), 11), run(specs, grass(), 11)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("spec, words", [
    ({"name": "RedDot", "radius_range": [-0.01, 0.02]}, ["radius_range"]),
    ({"name": "RedDot", "count_range": [0, 2]}, ["count_range"]),
    ({"name": "DateStamp", "height_range": [0.06, 0.03]}, ["height_range"]),
    ({"name": "DateStamp", "height_range": [0.0, 0.03]}, ["height_range"]),
    ({"name": "VerticalStripShuffle", "strips_range": [1, 3]}, ["strips_range"]),
    ({"name": "VerticalStripShuffle", "p": 1.5}, ["p"]),
    ({"name": "RedDot", "radius": 0.01}, ["unknown argument", "'radius'"]),
])
def test_bad_arguments_name_the_key(spec, words):
    with pytest.raises(ConfigError) as err, pytest.warns(UserWarning) if "radius" in spec else contextlib.nullcontext():
        build_augment([{"name": "HorizontalFlip", "p": 0.5}, spec], key="main.augment.train")
    msg = str(err.value)
    assert f"'main.augment.train[1]' ({spec['name']})" in msg
    for word in words:
        assert word in msg


def test_unknown_name_suggests_ours_and_albumentations_still_found():
    with pytest.raises(ConfigError, match=r"'main.augment.train\[0\].name': 'DateStmp' is not an albumentations "
                                          r"transform \(did you mean 'DateStamp'\?\)"):
        build_augment([{"name": "DateStmp"}], key="main.augment.train")
    with pytest.raises(ConfigError, match="did you mean 'HorizontalFlip'"):
        build_augment([{"name": "HorizontalFlp"}], key="main.augment.train")
    assert type(build_augment([{"name": "HorizontalFlip"}]).transforms[0]).__name__ == "HorizontalFlip"

