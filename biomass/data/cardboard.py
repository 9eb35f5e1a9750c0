"""Find the pasture box inside a cardboard border from colour and edge cues (no learned weights); docs/CARDBOARD.md.

An image edge is cut only where a band along it is uniform in colour, nearly free of texture, neither vivid nor
green, and ends at a straight line (near) parallel to the edge. Pasture is textured at the scale of a blade; dry
straw can have cardboard's colour but not its flatness; bare soil can be flat but is darker and more saturated; a
date stamp's lines are skipped. Bands are found on a copy WORK_LONG px long, then placed on the decoded image.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from biomass.data.table import Box, read_csv
from biomass.errors import ConfigError, DataError
from biomass.places import write_csv_atomic

WORK_LONG = 512  # long side of the copy the per-line tests run on
SEED_DEPTH = 0.01  # the outermost strip (share of the image side) whose colour a band must keep
MIN_BAND, MAX_BAND = 0.012, 0.35  # a band shallower than this is noise; deeper is not a border but the scene
COLOUR_TOL = 12.0  # CIELAB distance to the seed colour: covers the cardboard's mottle, not a change of material
TEX_FLOOR, TEX_NOISE_K = 2.5, 3.0  # flat: 3x3 std of L* below 2.5 or 3x the seed strip's own (sensor noise)
STRAIGHT_TOL = 0.008  # a line's band end may be this far (share of the side) from the fitted straight edge ...
STRAIGHT_SHARE = 0.6  # ... for at least this share of the lines: the inner edge is a straight line
MAX_TILT = 0.05  # ... at most this steep (about 3 degrees) against the image edge: a camera held not quite square
MAX_SATURATION = 0.40  # HSV saturation of the band: cardboard is grey to beige, never vivid
MIN_A = -12.0  # CIELAB a* of the band: not green (grey cardboard under a tinted light reaches -6)
INSIDE_CONTRAST, INSIDE_TEXTURE = 10.0, 3.0  # just inside the band: this CIELAB distance away, or 3x as textured
SHADOW_MAX = 0.015  # a dark frame line at most this deep (share of the short side) belongs to the border
SHADOW_VALUE, SHADOW_SAT = 0.75, 0.10  # shadow pixels: darker than 0.75x the band's value, same saturation +-0.1
STAMP_HUE, STAMP_SV = 21, 180  # stamp: OpenCV hue <= 21 (42 deg) or >= 170, saturation and value >= 70%
SEED_SMOOTH = 9  # lines over which the per-line seed colour is median-filtered (stamps, straws at the very edge)
EDGES = ("left", "top", "right", "bottom")
ACROSS = {"left": ("top", "bottom"), "right": ("top", "bottom"), "top": ("left", "right"), "bottom": ("left", "right")}
CROP_COLUMNS = ("image_path", "x0", "y0", "x1", "y1")


def _oriented(a: np.ndarray, edge: str) -> np.ndarray:
    """A view of `a` (H, W, ...) turned so that `edge` is column 0 and the lines across it are rows."""
    turned = a if edge in ("left", "right") else a.swapaxes(0, 1)
    return turned if edge in ("left", "top") else turned[:, ::-1]


def _lab(bgr: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(bgr.astype(np.float32) / 255.0, cv2.COLOR_BGR2Lab)  # float: L* 0-100, a*/b* about +-100


def _stamp_mask(bgr: np.ndarray) -> np.ndarray:
    """Vivid orange-red pixels (a camera's date stamp) and 2 px around them (anti-aliased glyph edges)."""
    hue, sat, val = cv2.split(cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV))
    warm = ((hue <= STAMP_HUE) | (hue >= 180 - STAMP_HUE // 2)) & (sat >= STAMP_SV) & (val >= STAMP_SV)
    return cv2.dilate(warm.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0


def _unstamped(stamp: np.ndarray) -> np.ndarray:
    """Lines (mask rows) clear of any stamp, which would end or prolong their walk; all if that leaves few."""
    free = ~stamp.any(axis=1)
    return free if free.sum() >= max(5, len(free) // 4) else np.ones_like(free)


def _line_seeds(lab_lines: np.ndarray, depth: int) -> np.ndarray:
    """(n, 3) colour of each line's outermost `depth` pixels, median-filtered along the edge."""
    seeds = np.pad(np.median(lab_lines[:, :depth], axis=1), ((SEED_SMOOTH // 2,) * 2, (0, 0)), mode="edge")
    return np.median(np.lib.stride_tricks.sliding_window_view(seeds, SEED_SMOOTH, axis=0), axis=-1)


def _straight(rows: np.ndarray, runs: np.ndarray, width: int) -> bool:
    """Do most lines' band ends lie near one straight line no steeper than MAX_TILT? A first line through the
    medians of the two halves ignores stray lines; then a least-squares fit to the rest."""
    tol = max(1.5, STRAIGHT_TOL * width)
    t, need, half = rows - rows.mean(), max(3, STRAIGHT_SHARE * len(runs)), len(runs) // 2
    slope = (np.median(runs[-half:]) - np.median(runs[:half])) / max(1, np.median(t[-half:]) - np.median(t[:half]))
    near = np.abs(runs - (np.median(runs - slope * t) + slope * t)) <= tol
    if near.sum() < need:
        return False
    slope, offset = np.polyfit(t[near], runs[near], 1)
    return np.sum(np.abs(runs - (offset + slope * t)) <= tol) >= need and abs(slope) <= MAX_TILT


def _band_depth(lab: np.ndarray, tex: np.ndarray, sat: np.ndarray, stamp: np.ndarray, rows: np.ndarray) -> int:
    """Depth in pixels of a band at column 0 of the oriented arrays, or 0: each line (row) is walked from the
    edge while its pixels keep the line's seed colour and stay flat; the median stop counts if the stops lie on a
    straight line and the band passes the colour and contrast gates."""
    width = lab.shape[1]
    reach, seed_depth = min(width, int(MAX_BAND * width) + 2), max(2, round(SEED_DEPTH * width))
    rows = rows[_unstamped(stamp[rows, :reach])]
    if len(rows) < 5:
        return 0
    band_lab, band_tex = lab[rows, :reach], tex[rows, :reach]
    seeds = _line_seeds(band_lab, seed_depth)
    tex_tol = max(TEX_FLOOR, TEX_NOISE_K * float(np.median(band_tex[:, :seed_depth])))
    member = (np.linalg.norm(band_lab - seeds[:, None, :], axis=2) < COLOUR_TOL) & (band_tex < tex_tol)
    # A line stops at its first two consecutive non-members: one stray pixel (a noise spike) does not end it.
    stop = ~member[:, :-1] & ~member[:, 1:]
    runs = np.where(stop.any(axis=1), stop.argmax(axis=1), reach)
    depth = int(np.median(runs))
    if depth < max(2, MIN_BAND * width) or depth >= reach - 1 or not _straight(rows, runs, width):
        return 0
    inner = slice(depth + 2, min(width, depth + 2 + 2 * seed_depth))
    band_colour = np.median(band_lab[:, :depth].reshape(-1, 3), axis=0)
    if np.median(sat[rows, :depth]) > MAX_SATURATION or band_colour[1] < MIN_A:
        return 0
    band_flat, inside_flat = np.median(band_tex[:, : max(1, depth - 1)]), np.median(tex[rows, inner])
    # What lies inside must differ: in colour, or by being much more textured (pasture of the band's colour).
    differs = np.linalg.norm(np.median(lab[rows, inner].reshape(-1, 3), axis=0) - band_colour) >= INSIDE_CONTRAST
    return depth if differs or inside_flat >= INSIDE_TEXTURE * band_flat else 0


def _coarse_depths(bgr: np.ndarray) -> dict[str, int]:
    """Band depth per edge on the work copy. The first pass tests the central 70% of the lines; the second only
    those between the bands found across (where two bands meet, a corner looks like a band as deep as the other)."""
    lab = _lab(bgr)
    lightness = np.ascontiguousarray(lab[..., 0])
    mean, sq = cv2.blur(lightness, (3, 3)), cv2.blur(lightness * lightness, (3, 3))
    tex = np.sqrt(np.maximum(sq - mean * mean, 0.0))  # 3x3 std of L*: ~0 on cardboard, high across blades, straws
    sat, stamp = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)[..., 1].astype(np.float32) / 255.0, _stamp_mask(bgr)
    depths: dict[str, int] = {}
    for _ in range(2):
        found = {}
        for edge in EDGES:
            length = lab.shape[0 if edge in ("left", "right") else 1]
            margin = max(2, round(0.02 * length))
            lo, hi = (depths[ACROSS[edge][0]] + margin, length - depths[ACROSS[edge][1]] - margin) if depths else (0, 0)
            lo, hi = (lo, hi) if hi - lo >= 5 else (int(0.15 * length), int(0.85 * length))
            found[edge] = _band_depth(*(_oriented(a, edge) for a in (lab, tex, sat, stamp)), np.arange(lo, hi))
        depths = found
    return depths


def _place_edge(bgr: np.ndarray, edge: str, coarse: float, span: tuple[float, float], scale: float) -> int:
    """Depth in pixels of `bgr` (full or reduced decode) of the band found at `coarse` work pixels: the last
    column where most lines still hold the band colour, plus a dark shadow line just inside, if any."""
    img = _oriented(bgr, edge)
    width = img.shape[1]
    lo, hi = int(span[0] * scale), int(span[1] * scale)
    step = max(1, (hi - lo) // 400)  # a few hundred lines are plenty for a median
    shadow_max = max(2, round(SHADOW_MAX * min(bgr.shape[:2])))
    reach = min(width, int((coarse + 3) * scale) + shadow_max + 2)
    window = np.ascontiguousarray(img[lo:hi:step, :reach])
    window = window[_unstamped(_stamp_mask(window))]
    if window.shape[0] < 5 or reach < 4:
        return int(round(coarse * scale))
    lab = _lab(window)
    seeds = _line_seeds(lab, min(max(2, round(SEED_DEPTH * width)), int(coarse * scale) or 1))
    share = np.mean(np.linalg.norm(lab - seeds[:, None, :], axis=2) < COLOUR_TOL, axis=0)
    start = max(0, int((coarse - 2) * scale))  # the coarse stop may be a work pixel early (3x3 texture window)
    stops = np.flatnonzero(share[start:] < 0.5)
    end = start + int(stops[0]) if len(stops) else int(round(coarse * scale))
    hsv = cv2.cvtColor(window, cv2.COLOR_BGR2HSV).astype(np.float32) / 255.0
    band_sat, band_val = np.median(hsv[:, : max(1, end), 1:].reshape(-1, 2), axis=0)
    # The frame's shadow: darker than the band but of its saturation (a dimmed copy of the same cardboard).
    dark = (hsv[..., 2] < SHADOW_VALUE * band_val) & (np.abs(hsv[..., 1] - band_sat) < SHADOW_SAT)
    dark_share, limit = np.mean(dark, axis=0), min(reach, end + shadow_max)
    while end < limit and dark_share[end] >= 0.5:
        end += 1
    return end


def _box_in(bgr: np.ndarray, work_scale: float, depths: dict[str, int]) -> Box:
    """The pasture box in `bgr` pixels from coarse band depths measured on a copy scaled by 1/work_scale."""
    height, width = bgr.shape[:2]
    placed = dict.fromkeys(EDGES, 0)
    for edge in (e for e in EDGES if depths[e]):
        length = (height if edge in ("left", "right") else width) / work_scale
        span = (depths[ACROSS[edge][0]] + 0.03 * length, length - depths[ACROSS[edge][1]] - 0.03 * length)
        placed[edge] = _place_edge(bgr, edge, depths[edge], span, work_scale)
    x0, y0, x1, y1 = placed["left"], placed["top"], width - placed["right"], height - placed["bottom"]
    eaten = x1 - x0 < 0.3 * width or y1 - y0 < 0.3 * height  # bands eating most of the frame: trust none
    return (0, 0, width, height) if eaten else (x0, y0, x1, y1)


def _detect_bgr(bgr: np.ndarray) -> Box:
    height, width = bgr.shape[:2]
    work_scale = max(1.0, max(height, width) / WORK_LONG)
    small = bgr if work_scale == 1.0 else cv2.resize(
        bgr, (max(1, round(width / work_scale)), max(1, round(height / work_scale))), interpolation=cv2.INTER_AREA)
    # Exact ratios of the resized copy (rounding) so that a band's depth maps back to the right pixel.
    work_scale = width / small.shape[1] if width >= height else height / small.shape[0]
    return _box_in(bgr, work_scale, _coarse_depths(small))


def detect_box(rgb: np.ndarray) -> Box:
    """The pasture box (x0, y0, x1, y1; x1/y1 exclusive) inside any cardboard border of an (H, W, 3) uint8 RGB
    image; the full frame when there is no border."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or min(rgb.shape[:2]) < 16:
        raise DataError(f"detect_box needs an (H, W, 3) uint8 RGB image >= 16x16, got {rgb.shape} {rgb.dtype}")
    return _detect_bgr(np.ascontiguousarray(rgb[..., ::-1]))


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, as stored (EXIF orientation ignored, as by the decode)."""
    if not path.is_file():
        raise DataError(f"image {path}: file not found")
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"image {path}: not a readable image ({err})") from None


def _detect_file(path: Path) -> Box:
    """Box in the file's own pixels. Large images are decoded at 1/2 or 1/4 size (still >= 1.5x the work copy,
    enough to place an edge to a pixel or two) and the box is scaled back to the size in the header."""
    height, width = _image_size(path)
    reduced = cv2.IMREAD_REDUCED_COLOR_4 if max(height, width) >= 6 * WORK_LONG else (
        cv2.IMREAD_REDUCED_COLOR_2 if max(height, width) >= 3 * WORK_LONG else cv2.IMREAD_COLOR)
    bgr = cv2.imread(str(path), reduced | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise DataError(f"image {path}: cannot be decoded")
    x0, y0, x1, y1 = _detect_bgr(bgr)
    sx, sy = width / bgr.shape[1], height / bgr.shape[0]
    x1 = width if x1 == bgr.shape[1] else min(width, round(x1 * sx))
    y1 = height if y1 == bgr.shape[0] else min(height, round(y1 * sy))
    return min(round(x0 * sx), x1 - 1), min(round(y0 * sy), y1 - 1), x1, y1


def detect_crops(root: str | Path, image_paths: Iterable[str], workers: int | None = None) -> pd.DataFrame:
    """One row per image (image_path, x0, y0, x1, y1), in the given order; paths are relative to `root`."""
    root, paths = Path(root), list(dict.fromkeys(image_paths))
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:  # cv2 frees the GIL
        boxes = list(pool.map(lambda p: _detect_file(root / p), paths))
    return pd.DataFrame([(p, *b) for p, b in zip(paths, boxes)], columns=list(CROP_COLUMNS))


def dataset_images(root: str | Path) -> list[str]:
    """Images listed in root/train.csv and root/test.csv (those that exist), else every *.jpg under train/, test/."""
    root, listed = Path(root), []
    for csv in (root / n for n in ("train.csv", "test.csv") if (root / n).is_file()):
        if len(csv.read_text(encoding="utf-8", errors="replace").strip().splitlines()) > 1:  # not just a header
            listed += [str(p) for p in read_csv(csv, ("image_path",))["image_path"]]
    paths = listed or [
        p.relative_to(root).as_posix() for split in ("train", "test") for p in sorted((root / split).glob("*.jpg"))]
    if not paths:
        raise DataError(f"{root}: no train.csv, test.csv or train/*.jpg, test/*.jpg to detect crops for")
    return list(dict.fromkeys(paths))


def _bordered(root: Path, df: pd.DataFrame) -> np.ndarray:
    """Per row: is the box smaller than the image's frame?"""
    frames = [(0, 0, w, h) for h, w in (_image_size(root / p) for p in df["image_path"])]
    return np.array([tuple(r[1:]) != f for r, f in zip(df.itertuples(index=False), frames)], dtype=bool)


def write_crops(root: str | Path, out: str | Path | None = None, preview_dir: str | Path | None = None,
                force: bool = False, workers: int | None = None) -> dict[str, object]:
    """Detect boxes for every dataset image (dataset_images) and write them to `out` (default root/crops.csv)
    atomically; refuses to replace an existing file unless `force`. Returns a summary (images, bordered, paths)."""
    root, out = Path(root), Path(out) if out is not None else Path(root) / "crops.csv"
    if out.exists() and not force:
        raise DataError(f"{out}: already exists; pass --force to overwrite it")
    df = detect_crops(root, dataset_images(root), workers=workers)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(df, out, index=False, lineterminator="\n")  # readers see the old file or the whole new one
    preview = str(preview_grid(root, df, Path(preview_dir) / "crops_preview.png")) if preview_dir else None
    return {"images": len(df), "bordered": int(_bordered(root, df).sum()), "out": str(out), "preview": preview}


# ------------------------------------------------------------------------------------------------------- scoring
def box_iou(a: Iterable[int], b: Iterable[int]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes with exclusive x1/y1."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a, b
    inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def _boxes(df: pd.DataFrame, what: str) -> dict[str, Box]:
    """{image_path: box} of a crops table, which must have CROP_COLUMNS and one row per image."""
    if not set(CROP_COLUMNS) <= set(df.columns) or df["image_path"].duplicated().any():
        raise DataError(f"{what} boxes need columns {', '.join(CROP_COLUMNS)} and one row per image")
    return {r.image_path: (int(r.x0), int(r.y0), int(r.x1), int(r.y1)) for r in df.itertuples(index=False)}


def score_boxes(pred_df: pd.DataFrame, true_df: pd.DataFrame,
                sizes: dict[str, tuple[int, int]] | None = None) -> dict[str, dict[str, float]]:
    """Mean IoU and share of images with IoU >= 0.9, for true images with a border (box != frame), without, all.
    The frame comes from `sizes` ({image_path: (height, width)}), else from the largest x1/y1 either table has
    (then a box cut only right/bottom and predicted exactly counts as borderless)."""
    pred, true = _boxes(pred_df, "predicted"), _boxes(true_df, "true")
    if lost := [p for p in true if p not in pred]:
        raise DataError(f"no predicted box for {len(lost)} image(s), e.g. {lost[0]!r}")
    groups: dict[str, list[float]] = {"bordered": [], "unbordered": [], "all": []}
    for path, t in true.items():
        p = pred[path]
        height, width = sizes[path] if sizes and path in sizes else (max(t[3], p[3]), max(t[2], p[2]))
        for group in ("bordered" if t != (0, 0, width, height) else "unbordered", "all"):
            groups[group].append(box_iou(p, t))
    return {name: {"images": len(v), "mean_iou": float(np.mean(v)) if v else float("nan"),
                   "share_iou_ge_0.9": float(np.mean(np.asarray(v) >= 0.9)) if v else float("nan")}
            for name, v in groups.items()}


def score_files(root: str | Path, pred_csv: str | Path, true_csv: str | Path | None = None) -> dict:
    """score_boxes for two crops CSVs (default truth root/crops.csv), frames read from the images under root."""
    pred = read_csv(Path(pred_csv), CROP_COLUMNS)
    truth = read_csv(Path(true_csv) if true_csv is not None else Path(root) / "crops.csv", CROP_COLUMNS)
    return score_boxes(pred, truth, {p: _image_size(Path(root) / p) for p in truth["image_path"]})


# ------------------------------------------------------------------------------------------------------- preview
PREVIEW_WIDTH, PREVIEW_COLUMNS = 320, 6  # thumbnail width and thumbnails per row
DETECTED_BGR, TRUE_BGR = (255, 0, 255), (0, 255, 255)  # magenta (stands out on green, brown, beige), yellow


def preview_grid(root: str | Path, df: pd.DataFrame, out_png: str | Path, true_df: pd.DataFrame | None = None,
                 max_images: int = 48) -> Path:
    """A PNG grid of thumbnails with the detected box (magenta, thick) and the true box (yellow, thin) if given.
    The worst matches with the truth come first, then images where a border was found. Returns out_png."""
    root, out_png = Path(root), Path(out_png)
    detected, truth = _boxes(df, "detected"), (_boxes(true_df, "true") if true_df is not None else {})
    if not detected:
        raise DataError("preview_grid: no boxes to show")
    bordered = dict(zip(df["image_path"], _bordered(root, df)))
    order = sorted(detected, key=lambda p: (box_iou(detected[p], truth.get(p, detected[p])), not bordered[p]))
    tiles = []
    for path in order[: max(1, max_images)]:
        bgr = cv2.imread(str(root / path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if bgr is None:
            raise DataError(f"image {root / path}: cannot be decoded")
        scale = PREVIEW_WIDTH / bgr.shape[1]
        thumb = cv2.resize(bgr, (PREVIEW_WIDTH, max(1, round(bgr.shape[0] * scale))), interpolation=cv2.INTER_AREA)
        for box, colour, thick in ((truth.get(path), TRUE_BGR, 1), (detected[path], DETECTED_BGR, 2)):
            if box is not None:
                x0, y0, x1, y1 = (int(round(v * scale)) for v in box)
                cv2.rectangle(thumb, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, thick)
        caption = Path(path).stem + (f"  IoU {box_iou(detected[path], truth[path]):.3f}" if path in truth else "")
        tiles.append(np.vstack([cv2.putText(np.full((18, PREVIEW_WIDTH, 3), 255, np.uint8), caption, (4, 13),
                                            cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA), thumb]))
    tile_h = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((2, 2 + tile_h - t.shape[0]), (2, 2), (0, 0)), constant_values=255) for t in tiles]
    tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % PREVIEW_COLUMNS if len(tiles) > PREVIEW_COLUMNS else 0)
    grid = np.vstack([np.hstack(tiles[i:i + PREVIEW_COLUMNS]) for i in range(0, len(tiles), PREVIEW_COLUMNS)])
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_png), grid):
        raise DataError(f"{out_png}: could not write the preview PNG")
    return out_png
