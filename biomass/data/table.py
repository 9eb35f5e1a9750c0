"""Kaggle's long CSVs -> per-image tables, validated before any training.

Every check raises one DataError naming the file and the sample_id, image or column at fault.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from biomass.constants import META, TABULAR, TARGETS, TEST_COLUMNS, TRAIN_COLUMNS
from biomass.errors import DataError

Box = tuple[int, int, int, int]


def read_csv(path: Path, required: Iterable[str]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype={"sample_id": str, "image_path": str, "target_name": str})
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} (has: {', '.join(map(str, df.columns))})")
    if df.empty:
        raise DataError(f"{path}: has a header but no rows")
    return df


def _image_id(image_path: str) -> str:
    return Path(image_path).stem


def check_inside(root: Path, image_paths: pd.Series, path: Path) -> None:
    """Every image_path names a file under `root`: not absolute, no `..` and no symlink that leads out of it. A
    shared or downloaded CSV must not decide which files on the machine a run opens (data.allow_outside_root)."""
    top = Path(root).resolve()
    for row, image_path in zip(image_paths.index, image_paths):
        name = Path(str(image_path))
        if name.is_absolute():
            why = "is an absolute path"
        elif ".." in name.parts:
            why = "climbs out with '..'"
        elif not (top / name).resolve().is_relative_to(top):
            why = f"leads to {(top / name).resolve()} through a symlink"
        else:
            continue
        raise DataError(f"{path}: row {int(row) + 2} has image_path {str(image_path)!r}, which {why}, outside the "
                        f"data root {top}; keep the images under it, or set data.allow_outside_root=true "
                        "if you trust this table")


def _check_long(df: pd.DataFrame, path: Path, root: Path, allow_outside_root: bool) -> None:
    """Checks shared by train.csv and test.csv: known targets, unique ids, ids matching their rows, 5 per image,
    images under the root."""
    for col in ("sample_id", "image_path", "target_name"):
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if empty.any():
            raise DataError(f"{path}: row {int(np.flatnonzero(empty)[0]) + 2} has an empty {col!r}")
    if not allow_outside_root:
        check_inside(root, df["image_path"].reset_index(drop=True).drop_duplicates(), path)
    unknown = ~df["target_name"].isin(TARGETS)
    if unknown.any():
        row = df[unknown].iloc[0]
        raise DataError(f"{path}: sample_id {row['sample_id']!r} has unknown target_name {row['target_name']!r}; "
                        f"expected one of {', '.join(TARGETS)}")
    dup = df["sample_id"].duplicated()
    if dup.any():
        raise DataError(f"{path}: duplicate sample_id {df['sample_id'][dup].iloc[0]!r}")
    expected = df["image_path"].map(_image_id) + "__" + df["target_name"]
    wrong = df["sample_id"] != expected
    if wrong.any():
        row = df[wrong].iloc[0]
        raise DataError(f"{path}: sample_id {row['sample_id']!r} does not match its image_path and target_name "
                        f"(expected {expected[wrong].iloc[0]!r})")
    counts = df.groupby("image_path")["target_name"].agg(set)
    for image_path, names in counts.items():
        if names != set(TARGETS):
            lost = [t for t in TARGETS if t not in names]
            raise DataError(f"{path}: image {image_path!r} has no row for target {lost[0]!r} "
                            f"(sample_id {_image_id(image_path) + '__' + lost[0]!r})")


def read_train(root: Path, csv_name: str = "train.csv", allow_outside_root: bool = False) -> pd.DataFrame:
    """train.csv -> one row per image: image_id, image_path, Sampling_Date, State, Species, NDVI, Height, 5 targets.
    Image paths must stay under `root` unless `allow_outside_root` (check_inside)."""
    path = Path(root) / csv_name
    df = read_csv(path, TRAIN_COLUMNS)
    _check_long(df, path, Path(root), allow_outside_root)
    for col in (*TABULAR, "target"):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | ~np.isfinite(values.fillna(0.0))
        if bad.any():
            row = df[bad].iloc[0]
            value = row[col]
            shown = repr(value) if isinstance(value, str) else str(value)
            what = "no value (empty or NaN)" if pd.isna(value) else f"{shown}, which is not a finite number,"
            raise DataError(f"{path}: sample_id {row['sample_id']!r} has {what} in column {col!r}")
        df[col] = values.astype(float)
    negative = df["target"] < 0
    if negative.any():
        row = df[negative].iloc[0]
        raise DataError(f"{path}: sample_id {row['sample_id']!r} has a negative target: {row['target']:g}")
    for col in (*TABULAR, *META):
        varies = df.groupby("image_path")[col].nunique(dropna=False) > 1
        if varies.any():
            image = varies[varies].index[0]
            values = sorted(map(str, df.loc[df["image_path"] == image, col].unique()))
            raise DataError(f"{path}: image {image!r} has inconsistent {col!r} across its rows: {', '.join(values)}")
    wide = df.pivot(index="image_path", columns="target_name", values="target")[list(TARGETS)]
    meta = df.groupby("image_path")[[*META, *TABULAR]].first()
    table = meta.join(wide).reset_index()
    table.insert(0, "image_id", table["image_path"].map(_image_id))
    # Sorted by image_path (what pandas' pivot gives the seed): fold assignment must not depend on row order.
    return table.sort_values("image_path", ignore_index=True)[["image_id", "image_path", *META, *TABULAR, *TARGETS]]


def read_test(root: Path, csv_name: str = "test.csv", allow_outside_root: bool = False
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """test.csv -> (the long rows as given, one row per image: image_id, image_path) in first-appearance order.
    Image paths must stay under `root` unless `allow_outside_root` (check_inside)."""
    path = Path(root) / csv_name
    df = read_csv(path, TEST_COLUMNS)
    _check_long(df, path, Path(root), allow_outside_root)
    images = pd.DataFrame({"image_path": pd.unique(df["image_path"])})
    images.insert(0, "image_id", images["image_path"].map(_image_id))
    return df[list(TEST_COLUMNS)], images


# ------------------------------------------------------------------------------------------------------------ images
TOO_LARGE = "too large to read safely"


def _check_one(root: Path, image_path: str, mode: str) -> tuple[int, int] | str:
    """(height, width) of a readable image, or a message saying what is wrong with it."""
    import cv2

    file = root / image_path
    if not file.is_file():
        return "file not found"
    if file.stat().st_size == 0:
        return "file is empty"
    if file.suffix.lower() in (".jpg", ".jpeg"):
        with open(file, "rb") as fh:
            head = fh.read(2)
            fh.seek(-2, os.SEEK_END)
            tail = fh.read(2)
        if head != b"\xff\xd8":
            return "not a JPEG (no start-of-image marker)"
        # libjpeg fills a truncated scan with grey and only warns, so check the end-of-image marker explicitly.
        if tail != b"\xff\xd9":
            return "truncated JPEG (no end-of-image marker)"
    size = _header_size(file)
    if isinstance(size, str) and size.startswith(TOO_LARGE):  # refused before anything decodes it
        return size
    if mode == "decode":
        # Decoding at 1/8 resolution parses the whole entropy-coded stream at a fraction of the cost.
        if cv2.imread(str(file), cv2.IMREAD_REDUCED_COLOR_8 | cv2.IMREAD_IGNORE_ORIENTATION) is None:
            return "cannot be decoded as an image"
    return size


def _header_size(file: Path) -> tuple[int, int] | str:
    """(height, width) of the stored pixels from the header (PIL reads no pixel data; EXIF orientation ignored), or
    what is wrong. An image over PIL's decompression-bomb limit is refused with its size."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    # Between PIL's limit and twice it PIL only warns; OpenCV decodes these, so the warning is noise here.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        with Image.open(file) as im:
            return im.height, im.width
    except Image.DecompressionBombError as err:
        return (f"{TOO_LARGE} ({err}); downscale it (the pipeline resizes every image to "
                "image.size anyway)")
    except (UnidentifiedImageError, OSError) as err:
        return f"not a readable image ({err})"


@contextlib.contextmanager
def _c_stderr() -> Iterator[list[str]]:
    """Capture what C libraries write to file descriptor 2 (libjpeg's "Corrupt JPEG data: ..."), so that it does
    not interleave with our one-line messages; the text is appended to the yielded list on exit."""
    captured: list[str] = []
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep apart
        yield captured
        captured.append("")
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode(errors="replace").strip())


def check_images(root: Path, image_paths: Iterable[str], mode: str = "decode",
                 workers: int | None = None) -> dict[str, tuple[int, int]]:
    """Every image present and decodable (in parallel); returns {image_path: (height, width)}.

    An image that decodes but makes libjpeg complain (damaged entropy-coded data) is named in a warning on stderr.
    """
    root = Path(root)
    paths = list(image_paths)
    with _c_stderr() as noise, ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = list(pool.map(lambda p: _check_one(root, p, mode), paths))
    for p, r in zip(paths, results):
        if isinstance(r, str):
            raise DataError(f"image {root / p}: {r}")
    if noise[0]:  # rare: find which images libjpeg complained about, one at a time
        for p in paths:
            with _c_stderr() as one:
                _check_one(root, p, mode)
            if one[0]:
                print(f"warning: image {root / p}: decoded, but libjpeg reports "
                      f"{' / '.join(one[0].splitlines())!r}; check the file", file=sys.stderr)
    return dict(zip(paths, results))  # type: ignore[arg-type]


def read_crops(path: Path, sizes: dict[str, tuple[int, int]]) -> dict[str, Box]:
    """crops.csv (image_path,x0,y0,x1,y1; pixel boxes, x1/y1 exclusive) checked against each image's size."""
    df = read_csv(path, ("image_path", "x0", "y0", "x1", "y1"))
    dup = df["image_path"].duplicated()
    if dup.any():
        raise DataError(f"{path}: image {df['image_path'][dup].iloc[0]!r} has more than one crop box")
    boxes: dict[str, Box] = {}
    for row in df.itertuples(index=False):
        if row.image_path not in sizes:
            continue  # boxes for images outside this split (test boxes in a train run) are fine
        try:
            x0, y0, x1, y1 = (int(v) for v in (row.x0, row.y0, row.x1, row.y1))
        except (TypeError, ValueError):
            raise DataError(f"{path}: image {row.image_path!r} has a non-integer crop box") from None
        h, w = sizes[row.image_path]
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise DataError(f"{path}: crop box ({x0}, {y0}, {x1}, {y1}) of image {row.image_path!r} is outside "
                            f"the {w}x{h} image or empty")
        boxes[row.image_path] = (x0, y0, x1, y1)
    return boxes
