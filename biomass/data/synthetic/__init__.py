"""Synthetic CSIRO Image2Biomass dataset with real labels: `python -m biomass.data.synthetic OUT_DIR [options]`.

(The picture itself, from labels to strokes, is drawn by `biomass.data.synthetic.render`.)

The competition photos cannot be shipped, so this module draws top-down quadrat pictures whose content carries the
real labels (shipped in `labels/csiro_train.csv`), and writes them in Kaggle's exact layout:

    OUT_DIR/train.csv              long format, TRAIN_COLUMNS, 5 rows per image (real labels)
    OUT_DIR/test.csv               sample_id,image_path,target_name
    OUT_DIR/sample_submission.csv  sample_id,target (all 0.0)
    OUT_DIR/solution.csv           sample_id,target + the other train columns: the hidden test labels
    OUT_DIR/crops.csv              image_path,x0,y0,x1,y1: the pasture box inside any cardboard border
    OUT_DIR/train/*.jpg, test/*.jpg
    OUT_DIR/README.md

How labels become pixels (all monotone, chosen to survive downscaling to ~128 px, where the image is mostly a mix of
colours in proportion to their areas):
  * each component c in (green, dead, clover) gets an area density d_c = COVER_K * grams_c ** COVER_POWER
    (render.py; a concave map so that light swards remain distinguishable) and is drawn as d_c * area / area_per_stroke strokes;
  * green = grass blades (thin, slightly bent lines in tufts); their length grows with Height_Ave_cm, and their hue
    and saturation move from olive to vivid green with Pre_GSHH_NDVI;
  * dead = long, light yellow-beige straw strokes;
  * clover = trefoils (three oval leaflets), a darker blue-green distinct from grass;
  * strokes of all three kinds are interleaved in random order ("dead leaves"), so each kind's visible share is
    about d_c / D * (1 - exp(-D)) with D = sum d_c, and the bare brown soil left is about exp(-D): the soil fraction
    tells the total, the colour shares tell the composition.
Nuisances: soil texture, per-image lighting gain, a gradient and white balance, pixel noise, JPEG (quality 90,
4:4:4 chroma); ~30% of images
get a cardboard border (its inner box recorded in crops.csv), ~25% an orange date stamp.

Everything random comes from numpy Generators seeded by `seed`, and files are written with fixed formatting, so the
same arguments give byte-identical files.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from biomass import __version__
from biomass.constants import TARGETS, TEST_COLUMNS, TRAIN_COLUMNS, sample_id
from biomass.data.synthetic.render import render_quadrat
from biomass.errors import ConfigError, DataError
from biomass.places import require_writable

LABEL_FILE = Path(__file__).resolve().parent.parent / "labels" / "csiro_train.csv"


BORDER_PROB = 0.30  # share of images with a cardboard border
STAMP_PROB = 0.25  # share of images with an orange date stamp
JPEG_QUALITY = 90
# Fresh IDs for labels drawn a second time (n_train + n_test > 357): "ID9" + 9 digits, counted up from 0.
FRESH_ID_PREFIX = "ID9"


# ----------------------------------------------------------------------------------------------------------- labels
def load_label_table() -> pd.DataFrame:
    """The shipped real label table (Kaggle long format, TRAIN_COLUMNS, 5 rows per image)."""
    if not LABEL_FILE.is_file():
        raise DataError(f"{LABEL_FILE}: the shipped label table is missing (reinstall the package)")
    table = pd.read_csv(LABEL_FILE)
    if tuple(table.columns) != TRAIN_COLUMNS:
        raise DataError(f"{LABEL_FILE}: expected columns {list(TRAIN_COLUMNS)}, found {list(table.columns)}")
    counts = table.groupby("image_path", sort=False)["target_name"].agg(lambda s: tuple(sorted(s)))
    bad = counts[counts != tuple(sorted(TARGETS))]
    if len(bad):
        raise DataError(f"{LABEL_FILE}: image {bad.index[0]!r} does not have exactly the five targets {TARGETS}")
    return table


def _image_blocks(table: pd.DataFrame) -> list[pd.DataFrame]:
    """The long table split into one 5-row block per image, in the file's order."""
    return [block.reset_index(drop=True) for _, block in table.groupby("image_path", sort=False)]


def _draw_rows(rng: np.random.Generator, n_rows: int, n_images: int) -> np.ndarray:
    """Indices of label rows for n_images: without replacement while possible, then every row once plus extras."""
    if n_images <= n_rows:
        return rng.permutation(n_rows)[:n_images]
    extra = rng.integers(0, n_rows, size=n_images - n_rows)
    return np.concatenate([rng.permutation(n_rows), extra])


def _image_ids(picks: np.ndarray, real_ids: list[str]) -> list[str]:
    """Real ID at a row's first use; later uses get fresh, deterministic IDs that collide with no real one."""
    taken, seen, out, counter = set(real_ids), set(), [], 0
    for row in picks:
        if row not in seen:
            seen.add(row)
            out.append(real_ids[row])
            continue
        while (fresh := f"{FRESH_ID_PREFIX}{counter:09d}") in taken:
            counter += 1
        taken.add(fresh)
        out.append(fresh)
    return out


# ------------------------------------------------------------------------------------------------------- generation
def _random_border(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """A pasture box with cardboard on 1-4 random edges, each band 3-12% of the image side it cuts into."""
    edges = rng.permutation(4)[: int(rng.integers(1, 5))]
    frac = rng.uniform(0.03, 0.12, size=4)
    x0 = int(round(frac[0] * width)) if 0 in edges else 0
    y0 = int(round(frac[1] * height)) if 1 in edges else 0
    x1 = width - int(round(frac[2] * width)) if 2 in edges else width
    y1 = height - int(round(frac[3] * height)) if 3 in edges else height
    return x0, y0, x1, y1


def _stamp_text(date: str) -> str:
    """'2015/9/4' -> '2015/09/04' (what a camera prints)."""
    parts = str(date).split("/")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return f"{int(parts[0]):04d}/{int(parts[1]):02d}/{int(parts[2]):02d}"
    return str(date)


def _float_text(values: pd.Series) -> pd.Series:
    """Shortest round-trip text of each float: fixed formatting so files are byte-identical across runs."""
    return values.map(lambda v: repr(float(v)))


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False, lineterminator="\n")


def _readme(n_train: int, n_test: int, seed: int, width: int, height: int) -> str:
    return (
        "# Synthetic CSIRO Image2Biomass dataset\n\n"
        "The images in this folder are SYNTHETIC: drawn by `biomass.data.synthetic` (biomass "
        f"{__version__}) with\n\n"
        f"    python -m biomass.data.synthetic OUT_DIR --n-train {n_train} --n-test {n_test} --seed {seed} "
        f"--width {width} --height {height}\n\n"
        "Grass blades, straw and clover trefoils cover the soil in proportion to the image's Dry_Green_g, "
        "Dry_Dead_g and Dry_Clover_g; blade length follows Height_Ave_cm and greenness Pre_GSHH_NDVI. "
        "They are not photographs and say nothing about how well a model does on the real competition.\n\n"
        "The labels are REAL: each image's row values (targets, Pre_GSHH_NDVI, Height_Ave_cm, State, Species, "
        "Sampling_Date) are copied from the CSIRO Image2Biomass training table (Kaggle competition `csiro-biomass`; "
        "Liao et al., arXiv:2510.22916), licensed CC BY-SA 4.0 by CSIRO. This dataset is a derivative and carries "
        "the same licence and attribution. IDs starting with `ID9` followed by 9 digits may be fresh IDs for "
        "labels used more than once.\n\n"
        "Files: `train.csv` (long format), `test.csv`, `sample_submission.csv`, `solution.csv` (hidden test "
        "labels, for `python -m biomass.score solution.csv SUBMISSION.csv`), `crops.csv` (pasture box inside any "
        "cardboard border, x1/y1 exclusive), `train/*.jpg`, `test/*.jpg`.\n"
    )


def generate(out_dir: str | Path, n_train: int = 24, n_test: int = 8, seed: int = 0, width: int = 2000,
             height: int = 1000) -> Path:
    """Write a synthetic dataset in Kaggle's layout (see the module doc) to `out_dir` and return it as a Path."""
    for name, value, low in (("n_train", n_train, 1), ("n_test", n_test, 0), ("seed", seed, 0),
                             ("width", width, 16), ("height", height, 16)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: output directory exists and is not empty; pick a new one or empty it")
    require_writable(out, "output folder")

    blocks = _image_blocks(load_label_table())
    real_ids = [Path(b.loc[0, "image_path"]).stem for b in blocks]
    picks = _draw_rows(np.random.default_rng(seed), len(blocks), n_train + n_test)
    ids = _image_ids(picks, real_ids)

    out.mkdir(parents=True, exist_ok=True)
    (out / "train").mkdir()
    (out / "test").mkdir()
    train_rows, test_rows, crops = [], [], []
    for i, (row, image_id) in enumerate(zip(picks, ids)):
        split = "train" if i < n_train else "test"
        image_path = f"{split}/{image_id}.jpg"
        block = blocks[row].copy()
        block["image_path"] = image_path
        block["sample_id"] = [sample_id(image_id, t) for t in block["target_name"]]
        (train_rows if split == "train" else test_rows).append(block)

        # Each image has its own stream, so one image's look does not depend on how many strokes another drew.
        rng = np.random.default_rng([seed, i])
        box = _random_border(rng, width, height) if rng.random() < BORDER_PROB else None
        stamp = _stamp_text(block.loc[0, "Sampling_Date"]) if rng.random() < STAMP_PROB else None
        labels = dict(zip(block["target_name"], block["target"].astype(float)))
        labels.update(Pre_GSHH_NDVI=float(block.loc[0, "Pre_GSHH_NDVI"]),
                      Height_Ave_cm=float(block.loc[0, "Height_Ave_cm"]))
        rgb = render_quadrat(rng, labels, width, height, box, stamp)
        # Full-resolution chroma (4:4:4): default 4:2:0 would smear the colour of 1-2 px strokes on small images.
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [
            cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
        if not ok:
            raise DataError(f"{out / image_path}: JPEG encoding failed")
        (out / image_path).write_bytes(jpg.tobytes())
        crops.append((image_path, *(box or (0, 0, width, height))))

    floats = ("Pre_GSHH_NDVI", "Height_Ave_cm", "target")
    train = pd.concat(train_rows, ignore_index=True)[list(TRAIN_COLUMNS)]
    for col in floats:
        train[col] = _float_text(train[col])
    _write_csv(train, out / "train.csv")

    empty = pd.DataFrame(columns=list(TRAIN_COLUMNS))
    test = pd.concat(test_rows, ignore_index=True)[list(TRAIN_COLUMNS)] if test_rows else empty
    for col in floats:
        test[col] = _float_text(test[col])
    _write_csv(test[list(TEST_COLUMNS)], out / "test.csv")
    _write_csv(pd.DataFrame({"sample_id": test["sample_id"], "target": ["0.0"] * len(test)}),
               out / "sample_submission.csv")
    rest = [c for c in TRAIN_COLUMNS if c not in ("sample_id", "target")]
    _write_csv(test[["sample_id", "target", *rest]], out / "solution.csv")
    _write_csv(pd.DataFrame(crops, columns=["image_path", "x0", "y0", "x1", "y1"]), out / "crops.csv")
    (out / "README.md").write_text(_readme(n_train, n_test, seed, width, height), encoding="utf-8")
    return out
