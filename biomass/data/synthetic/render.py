"""Drawing one synthetic quadrat photo from its labels (biomass.data.synthetic's recipe, in pixels): blades, straw
and trefoils interleaved over textured soil, lighting, noise, an optional cardboard border and date stamp."""
from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from biomass.errors import ConfigError, DataError

# Area density per component: d = COVER_K * grams ** COVER_POWER. With these values the sum D over the real table is
# ~1.0 at the median image and ~1.8 at the 95th percentile (bare soil ~37% and ~17%), so coverage does not saturate.
COVER_K = 0.085
COVER_POWER = 0.6

# Strokes are drawn in this many interleaved rounds (one cv2.polylines call per round, kind and shade), which
# approximates a random drawing order of all strokes at the cost of a few hundred C calls instead of thousands.
ROUNDS = 12
SHADES = 4

# Stroke geometry as fractions of the short image side S, so the look does not depend on the image size.
BLADE_THICK = 0.0045
BLADE_LEN_BASE, BLADE_LEN_PER_SQRT_CM = 0.022, 0.010  # blade length = S * (base + per * sqrt(height_cm))
STRAW_THICK = 0.0040
STRAW_LEN = (0.04, 0.10)
CLOVER_RADIUS = 0.011  # trefoil radius (centre to leaflet tip)



def _hsv_to_rgb(h_deg: float, s: float, v: float) -> np.ndarray:
    """One colour from HSV (hue in degrees, s and v in [0, 1]) to float RGB in [0, 255]."""
    h = (h_deg % 360.0) / 60.0
    s, v = float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    return (np.array([r, g, b]) + (v - c)) * 255.0


def _shades(rng: np.random.Generator, hue: float, sat: float, val: float, jitter: tuple[float, float, float]
            ) -> list[tuple[int, int, int]]:
    """SHADES colours scattered around one HSV base colour (per-stroke colour variety within a kind)."""
    out = []
    for _ in range(SHADES):
        dh, ds, dv = (rng.uniform(-j, j) for j in jitter)
        out.append(tuple(int(round(c)) for c in _hsv_to_rgb(hue + dh, sat + ds, val + dv)))
    return out


@functools.lru_cache(maxsize=4096)
def _segment_area(length: int, thickness: int) -> int:
    """Pixels cv2 actually paints for one straight stroke (its round caps and integer thickness included)."""
    pad = thickness + 2
    mask = np.zeros((2 * pad + 1, length + 2 * pad + 1), np.uint8)
    cv2.polylines(mask, np.array([[[pad, pad], [pad + length, pad]]], np.int32), False, 255, thickness, cv2.LINE_8)
    return max(1, int(np.count_nonzero(mask)))


@functools.lru_cache(maxsize=1024)
def _trefoil_area(radius: int, thickness: int) -> int:
    """Pixels painted by one trefoil of the given radius (leaflets overlap near the centre)."""
    size = 2 * (radius + thickness) + 3
    mask = np.zeros((size, size), np.uint8)
    centre = np.array([[size / 2, size / 2]])
    cv2.polylines(mask, _trefoil_points(centre, np.zeros(1), np.full(1, float(radius))), False, 255, thickness,
                  cv2.LINE_8)
    return max(1, int(np.count_nonzero(mask)))


def _trefoil_points(centres: np.ndarray, angles: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(3N, 2, 2) int32 leaflet segments: three per trefoil at 120 degrees, from 0.5 to 0.85 of the radius (the
    thick round-capped segment then reaches about the full radius and looks like an oval leaflet)."""
    theta = angles[:, None] + np.array([0.0, 2.0944, 4.1888])[None, :]  # (N, 3)
    unit = np.stack([np.cos(theta), np.sin(theta)], axis=-1)  # (N, 3, 2)
    inner = centres[:, None, :] + unit * (0.5 * radii)[:, None, None]
    outer = centres[:, None, :] + unit * (0.85 * radii)[:, None, None]
    return np.round(np.stack([inner, outer], axis=2).reshape(-1, 2, 2)).astype(np.int32)


def _grams(labels: dict, key: str) -> float:
    value = float(labels[key])
    if not math.isfinite(value):
        raise DataError(f"label {key} is not finite: {labels[key]!r}")
    return max(value, 0.0)


def _density(grams: float) -> float:
    return COVER_K * grams ** COVER_POWER


def _blades(rng: np.random.Generator, n: int, width: int, height: int, mean_len: float) -> np.ndarray:
    """(n, 3, 2) bent blades growing out of tufts: a tuft centre, a random direction and a slight sideways bend."""
    n_tufts = max(1, int(math.ceil(n / 5)))
    tufts = rng.uniform((0, 0), (width, height), size=(n_tufts, 2))
    base = tufts[rng.integers(0, n_tufts, size=n)] + rng.normal(0.0, 0.15 * mean_len, size=(n, 2))
    length = mean_len * rng.uniform(0.7, 1.3, size=n)
    angle = rng.uniform(0, 2 * np.pi, size=n)
    unit = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    normal = np.stack([-unit[:, 1], unit[:, 0]], axis=1)
    bend = rng.uniform(-0.15, 0.15, size=n)[:, None] * length[:, None]
    tip = base + unit * length[:, None]
    mid = base + unit * (0.5 * length)[:, None] + normal * bend
    return np.round(np.stack([base, mid, tip], axis=1)).astype(np.int32)


def _straws(rng: np.random.Generator, n: int, width: int, height: int, short: int) -> np.ndarray:
    """(n, 2, 2) straight straw pieces lying in any direction."""
    centre = rng.uniform((0, 0), (width, height), size=(n, 2))
    half = 0.5 * short * rng.uniform(*STRAW_LEN, size=n)
    angle = rng.uniform(0, 2 * np.pi, size=n)
    offset = np.stack([np.cos(angle), np.sin(angle)], axis=1) * half[:, None]
    return np.round(np.stack([centre - offset, centre + offset], axis=1)).astype(np.int32)


def _paint(rng: np.random.Generator, img: np.ndarray, kinds: list[tuple[np.ndarray, list, int, int]]) -> None:
    """Draw all kinds of strokes interleaved: each object (`per` consecutive polylines) gets a random round and
    shade; in every round the kinds come in a fresh random order, so no kind systematically covers another."""
    groups = []
    for pts, colours, thickness, per in kinds:
        n = len(pts) // per
        key = rng.integers(0, ROUNDS, size=n) * SHADES + rng.integers(0, SHADES, size=n)
        key = np.repeat(key, per)
        order = np.argsort(key, kind="stable")
        bounds = np.searchsorted(key[order], np.arange(ROUNDS * SHADES + 1))
        groups.append((pts[order], bounds, colours, thickness))
    for r in range(ROUNDS):
        for k in rng.permutation(len(groups)):
            pts, bounds, colours, thickness = groups[k]
            for s in range(SHADES):
                lo, hi = bounds[r * SHADES + s], bounds[r * SHADES + s + 1]
                if hi > lo:
                    cv2.polylines(img, pts[lo:hi], False, colours[s], thickness, cv2.LINE_8)


def _smooth_field(rng: np.random.Generator, width: int, height: int, cells: tuple[int, int]) -> np.ndarray:
    """A smooth zero-mean random field (H, W) float32 with unit-ish amplitude: low-res noise upsampled bicubically."""
    small = rng.standard_normal((cells[1], cells[0])).astype(np.float32)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Float image -> uint8, clipping in place (saves a full-size temporary on 2000x1000 images)."""
    np.clip(a, 0, 255, out=a)
    return a.astype(np.uint8)


def _check_box(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise DataError(f"border box {box} is not a non-empty box inside the {width}x{height} image")
    return x0, y0, x1, y1


def _cardboard(rng: np.random.Generator, img: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """Paint a flat, slightly mottled cardboard band outside the pasture box, with a dark shadow along its edge."""
    height, width = img.shape[:2]
    x0, y0, x1, y1 = box
    colour = _hsv_to_rgb(rng.uniform(28, 42), rng.uniform(0.05, 0.30), rng.uniform(0.62, 0.85))
    mottle = 1.0 + 0.04 * _smooth_field(rng, width, height, (24, 12))
    # The band is the union of four strips around the box (each empty where that edge has no cardboard).
    for rows, cols in ((slice(0, height), slice(0, x0)), (slice(0, height), slice(x1, width)),
                       (slice(0, y0), slice(x0, x1)), (slice(y1, height), slice(x0, x1))):
        img[rows, cols] = _to_uint8(mottle[rows, cols, None] * colour.astype(np.float32)[None, None, :])
    # A dark strip on the cardboard side of each bordered edge: the frame's shadow, outside the pasture box.
    shadow = max(1, int(round(0.006 * min(width, height))))
    img[frame_shadow((x0, y0, x1, y1), height, width, shadow)] = tuple(int(c * 0.45) for c in colour)


def frame_shadow(box: tuple[int, int, int, int], height: int, width: int, thickness: int) -> np.ndarray:
    """(height, width) mask of the frame's shadow: a strip `thickness` wide on the cardboard side of each edge of
    the pasture box `box` (x0, y0, x1, y1) that has cardboard beyond it."""
    x0, y0, x1, y1 = box
    dark = np.zeros((height, width), bool)
    if x0 > 0:
        dark[y0:y1, max(0, x0 - thickness):x0] = True
    if x1 < width:
        dark[y0:y1, x1:x1 + thickness] = True
    if y0 > 0:
        dark[max(0, y0 - thickness):y0, max(0, x0 - thickness):x1 + thickness] = True
    if y1 < height:
        dark[y1:y1 + thickness, max(0, x0 - thickness):x1 + thickness] = True
    return dark


def _stamp(rng: np.random.Generator, img: np.ndarray, text: str) -> None:
    """Orange camera date stamp near a random corner."""
    height, width = img.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), _ = cv2.getTextSize(text, font, 1.0, 2)
    scale = min(rng.uniform(0.035, 0.055) * height / th, 0.4 * width / tw)
    thickness = max(1, int(round(2 * scale)))
    (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    margin = int(round(rng.uniform(0.02, 0.05) * min(width, height)))
    corner = int(rng.integers(0, 4))
    x = margin if corner in (0, 2) else max(0, width - margin - tw)
    y = margin + th if corner in (0, 1) else max(th, height - margin - base)
    colour = (255, int(rng.integers(120, 170)), int(rng.integers(0, 40)))
    cv2.putText(img, text, (x, y), font, scale, colour, thickness, cv2.LINE_AA)


def render_quadrat(rng: np.random.Generator, labels: dict, width: int, height: int,
                   border: tuple[int, int, int, int] | None, stamp: str | None) -> np.ndarray:
    """One top-down quadrat photo as an (height, width, 3) uint8 RGB array whose content carries `labels`.

    labels: Dry_Green_g, Dry_Dead_g, Dry_Clover_g (grams; GDM_g and Dry_Total_g may be present and are implied),
    Pre_GSHH_NDVI and Height_Ave_cm. border: the pasture box (x0, y0, x1, y1), x1/y1 exclusive, with cardboard
    painted outside it, or None for no border. stamp: date text to print in orange, or None.
    """
    missing = [k for k in ("Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g", "Pre_GSHH_NDVI", "Height_Ave_cm")
               if k not in labels]
    if missing:
        raise DataError(f"render_quadrat: labels lack {missing}")
    if width < 16 or height < 16:
        raise ConfigError(f"image size {width}x{height} is too small (at least 16x16)")
    box = None if border is None else _check_box(border, width, height)
    short, area = min(width, height), width * height
    green, dead, clover = (_grams(labels, k) for k in ("Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g"))
    ndvi = float(np.clip(float(labels["Pre_GSHH_NDVI"]), 0.0, 1.0))
    height_cm = max(float(labels["Height_Ave_cm"]), 0.0)

    # Soil: brown with a smooth mottle, so bare ground is not one flat colour.
    soil = _hsv_to_rgb(rng.uniform(18, 32), rng.uniform(0.42, 0.6), rng.uniform(0.27, 0.38))
    mottle = 1.0 + 0.10 * _smooth_field(rng, width, height, (16, 8)) + 0.05 * _smooth_field(rng, width, height,
                                                                                           (64, 32))
    img = _to_uint8(mottle[:, :, None] * soil.astype(np.float32)[None, None, :])

    # Colours: grass moves from olive (low NDVI) to vivid green; straw is light beige; clover a darker blue-green.
    q = float(np.clip((ndvi - 0.15) / 0.8, 0.0, 1.0))
    grass_colours = _shades(rng, 72 + 36 * q, 0.45 + 0.35 * q, 0.46 + 0.10 * q, (5, 0.06, 0.07))
    straw_colours = _shades(rng, 45, 0.36, 0.80, (5, 0.07, 0.07))
    clover_colours = _shades(rng, 142, 0.58, 0.42, (5, 0.06, 0.06))

    # Stroke counts = density * image area / pixels per stroke, so coverage (not count) follows the grams.
    blade_t = max(1, int(round(BLADE_THICK * short)))
    blade_len = short * (BLADE_LEN_BASE + BLADE_LEN_PER_SQRT_CM * math.sqrt(height_cm))
    n_blades = int(round(_density(green) * area / _segment_area(max(1, round(blade_len)), blade_t)))
    straw_t = max(1, int(round(STRAW_THICK * short)))
    straw_len = short * sum(STRAW_LEN) / 2
    n_straws = int(round(_density(dead) * area / _segment_area(max(1, round(straw_len)), straw_t)))
    radius = max(2.0, CLOVER_RADIUS * short)
    leaf_t = max(1, int(round(0.55 * radius)))
    n_clover = int(round(_density(clover) * area / _trefoil_area(int(round(radius)), leaf_t)))

    centres = rng.uniform((0, 0), (width, height), size=(n_clover, 2))
    trefoils = _trefoil_points(centres, rng.uniform(0, 2 * np.pi, n_clover),
                               radius * rng.uniform(0.85, 1.15, n_clover))
    _paint(rng, img, [
        (_blades(rng, n_blades, width, height, blade_len), grass_colours, blade_t, 1),
        (_straws(rng, n_straws, width, height, short), straw_colours, straw_t, 1),
        (trefoils, clover_colours, leaf_t, 3),  # the three leaflets of a trefoil share round and shade
    ])

    if box is not None:
        _cardboard(rng, img, box)

    # Lighting (global gain, a linear gradient across the frame, a white-balance tint) and sensor luminance noise,
    # applied in one float pass.
    gain = rng.uniform(0.85, 1.15)
    gx, gy = rng.uniform(-0.12, 0.12, size=2)
    ramp = (gain * (1.0 + gx * np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
                    + gy * np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None])).astype(np.float32)
    tint = rng.uniform(0.95, 1.05, size=3).astype(np.float32)
    noise = rng.standard_normal((height, width), dtype=np.float32)
    noise *= np.float32(rng.uniform(2.0, 6.0))
    out = img.astype(np.float32)
    out *= ramp[:, :, None]
    out *= tint[None, None, :]
    out += noise[:, :, None]
    img = _to_uint8(out)

    if stamp:
        _stamp(rng, img, stamp)  # a camera overlay: printed on the finished picture, so neither lit nor noisy
    return img
