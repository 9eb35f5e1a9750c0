"""How the cardboard detector holds on borders it was not tuned on: `python -m biomass.crops evaluate`.

Rendered quadrats (biomass.data.synthetic, real labels) get cardboard drawn at random from a wide spread that the
synthetic data's own renderer does not cover: grey, white, beige, kraft-brown and dark-brown board, flat or mottled
(fibre specks, blotches), on 1-4 sides, each band 1-35% of the side it cuts into (opposite bands together at most
60%), with or without the frame's shadow line, lit with its own gradient and sensor noise, saved as JPEG at
quality 70-95, with an orange date stamp on about a third. The rest of the photos have no border. Each photo goes
through the detector's file route (`detect_crops`, as `crops detect` runs it) and is scored per band
(docs/CARDBOARD.md).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from biomass.constants import TABULAR, TARGETS
from biomass.data.cardboard import EDGES, box_iou, detect_crops
from biomass.data.synthetic.render import frame_shadow
from biomass.errors import ConfigError

# (hue degrees, saturation, value) ranges of each kind of board
FAMILIES = {"grey": ((0, 360), (0.0, 0.08), (0.40, 0.75)), "white": ((0, 360), (0.0, 0.06), (0.84, 0.97)),
            "beige": ((30, 45), (0.14, 0.32), (0.62, 0.86)), "kraft": ((24, 38), (0.40, 0.62), (0.50, 0.74)),
            "dark_brown": ((18, 34), (0.42, 0.65), (0.24, 0.42))}
DEPTH_BINS = (0.0, 0.03, 0.08, 0.15, 0.25, 0.36)  # band depth (share of the side) groups in the report
FOUND_TOL = (0.005, 0.25)  # a band is found when its edge is within 0.5% of the side + 25% of its depth
GOALS = {"found": 0.97, "clean_edges": 0.90, "bordered_iou": 0.97}  # the bar (issue 24)


def _hsv(rng: np.random.Generator, family: str) -> np.ndarray:
    (h0, h1), (s0, s1), (v0, v1) = FAMILIES[family]
    hsv = np.uint8([[[rng.uniform(h0, h1) / 2 % 180, rng.uniform(s0, s1) * 255, rng.uniform(v0, v1) * 255]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _depths(rng: np.random.Generator) -> np.ndarray:
    """Band depth per edge (left, top, right, bottom) as a share of the side, 0 where there is none."""
    sides = rng.permutation(4)[: int(rng.integers(1, 5))]
    depth = np.zeros(4)
    depth[sides] = np.exp(rng.uniform(np.log(0.01), np.log(0.35), len(sides)))  # as many thin as deep bands
    for a, b in ((0, 2), (1, 3)):
        if depth[a] + depth[b] > 0.6:
            depth[[a, b]] *= 0.6 / (depth[a] + depth[b])
    return depth


def _paint_board(rng: np.random.Generator, img: np.ndarray, box: tuple[int, int, int, int], family: str,
                 mottled: bool, shadow: bool) -> None:
    height, width = img.shape[:2]
    colour = _hsv(rng, family)
    field = cv2.resize(rng.standard_normal((8, 16)).astype(np.float32), (width, height), cv2.INTER_CUBIC)
    shade = 1.0 + 0.02 * field
    if mottled:  # blotches and fibre specks
        blotch = cv2.resize(rng.standard_normal((40, 80)).astype(np.float32), (width, height), cv2.INTER_CUBIC)
        specks = (rng.random((height, width)) < 0.01) * rng.uniform(-0.25, 0.15, (height, width))
        shade = shade + rng.uniform(0.03, 0.08) * blotch + cv2.GaussianBlur(specks.astype(np.float32), (3, 3), 0)
    ramp = 1.0 + rng.uniform(-0.15, 0.15) * np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
    board = shade[..., None] * ramp[..., None] * colour[None, None, :]
    board += rng.normal(0, rng.uniform(2, 6), (height, width, 1)).astype(np.float32)
    inside = np.zeros((height, width), bool)
    x0, y0, x1, y1 = box
    inside[y0:y1, x0:x1] = True
    img[~inside] = np.clip(board[~inside], 0, 255).astype(np.uint8)
    if shadow:  # the frame's shadow: a dark line on the board along the pasture box
        dark = frame_shadow(box, height, width, max(1, round(0.004 * min(width, height))))
        img[dark] = (img[dark] * rng.uniform(0.4, 0.7)).astype(np.uint8)


def _stamp(rng: np.random.Generator, img: np.ndarray) -> None:
    height, width = img.shape[:2]
    text = f"{rng.integers(2014, 2019)}/{rng.integers(1, 13):02d}/{rng.integers(1, 29):02d}"
    scale = rng.uniform(0.035, 0.055) * height / 22
    thick = max(1, round(2 * scale))
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    x = int(rng.uniform(0.02, 0.05) * width) if rng.random() < 0.5 else width - tw - int(0.03 * width)
    y = th + int(rng.uniform(0.02, 0.05) * height) if rng.random() < 0.5 else height - int(0.03 * height)
    colour = (255, int(rng.integers(110, 180)), int(rng.integers(0, 50)))
    cv2.putText(img, text, (max(0, x), y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick, cv2.LINE_AA)


def render_cases(folder: Path, n_images: int, seed: int, width: int, height: int, bordered_share: float = 0.6
                 ) -> pd.DataFrame:
    """JPEGs in `folder` and one row per photo: image_path, true box, board family, mottled, shadow, quality,
    stamp, and the true band depth per edge (share of the side)."""
    from biomass.data.synthetic import load_label_table, render_quadrat

    rng = np.random.default_rng(seed)
    table = load_label_table()
    wide = table.pivot_table(index="image_path", columns="target_name", values="target").join(
        table.groupby("image_path")[list(TABULAR)].first())
    rows = []
    for i in range(n_images):
        labels = wide.iloc[int(rng.integers(len(wide)))][[*TARGETS, *TABULAR]].to_dict()
        img = render_quadrat(rng, labels, width, height, None, None)
        depth = _depths(rng) if rng.random() < bordered_share else np.zeros(4)
        sides = np.array([width, height, width, height])
        px = np.round(depth * sides).astype(int)
        box = (int(px[0]), int(px[1]), width - int(px[2]), height - int(px[3]))
        family, mottled, shadow = str(rng.choice(list(FAMILIES))), bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        if depth.any():
            _paint_board(rng, img, box, family, mottled, shadow)
        stamp = bool(rng.random() < 0.35)
        if stamp:
            _stamp(rng, img)
        quality = int(rng.integers(70, 96))
        name = f"case{i:04d}.jpg"
        cv2.imwrite(str(folder / name), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        rows.append({"image_path": name, "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3],
                     "family": family if depth.any() else "none", "mottled": mottled, "shadow": shadow,
                     "quality": quality, "stamp": stamp, **{f"depth_{e}": float(px[j] / sides[j])
                                                             for j, e in enumerate(EDGES)}})
    return pd.DataFrame(rows)


def score_bands(truth: pd.DataFrame, pred: pd.DataFrame, width: int, height: int) -> pd.DataFrame:
    """One row per (photo, edge): true and predicted depth (share of the side), found / invented, error."""
    merged = truth.merge(pred, on="image_path", suffixes=("", "_pred"))
    out = []
    for r in merged.itertuples(index=False):
        got = {"left": r.x0_pred / width, "top": r.y0_pred / height, "right": 1 - r.x1_pred / width,
               "bottom": 1 - r.y1_pred / height}
        for e in EDGES:
            true, est = getattr(r, f"depth_{e}"), got[e]
            found = true > 0 and est > 0 and abs(est - true) <= FOUND_TOL[0] + FOUND_TOL[1] * true
            out.append({"image_path": r.image_path, "edge": e, "family": r.family, "mottled": r.mottled,
                        "stamp": r.stamp, "quality": r.quality, "bordered_photo": r.family != "none",
                        "true": true, "pred": est, "found": found, "invented": true == 0 and est > 0,
                        "error": abs(est - true) if true > 0 and est > 0 else np.nan})
    return pd.DataFrame(out)


def summarise(truth: pd.DataFrame, pred: pd.DataFrame, bands: pd.DataFrame) -> dict[str, Any]:
    """Headline figures and tables by board family and by depth."""
    real, empty = bands[bands["true"] > 0], bands[bands["true"] == 0]
    clean = bands[~bands["bordered_photo"]]
    boxes = truth.merge(pred, on="image_path", suffixes=("", "_pred"))
    bordered = boxes[boxes["family"] != "none"]
    iou = [box_iou((r.x0, r.y0, r.x1, r.y1), (r.x0_pred, r.y0_pred, r.x1_pred, r.y1_pred))
           for r in bordered.itertuples(index=False)]

    def table(groups) -> list[dict[str, Any]]:
        """Per group: bands, share found, mean depth error; for the family groups also the share of the photos'
        edges without a band where one was invented."""
        rows = [{"group": str(k), "bands": len(g), "found": float(g["found"].mean()),
                 "mean_depth_error": float(g["error"].mean()) if g["error"].notna().any() else None}
                for k, g in real.groupby(groups, observed=True)]
        if isinstance(groups, str) and groups == "family":
            empty_by = {str(k): (len(g), float(g["invented"].mean())) for k, g in empty.groupby("family")}
            rows = [{**r, "empty_edges": empty_by.get(r["group"], (0, None))[0],
                     "invented": empty_by.get(r["group"], (0, None))[1]} for r in rows]
            rows.append({"group": "none (unbordered)", "bands": 0, "found": None, "mean_depth_error": None,
                         "empty_edges": empty_by.get("none", (0, None))[0],
                         "invented": empty_by.get("none", (0, None))[1]})
        return rows

    depth_bin = pd.cut(real["true"], DEPTH_BINS)
    return {"photos": len(truth), "bordered_photos": len(bordered), "bands": len(real),
            "found": float(real["found"].mean()), "mean_depth_error": float(real["error"].mean()),
            "invented_share_all_empty_edges": float(empty["invented"].mean()),
            "clean_edges": float(1 - clean["invented"].mean()) if len(clean) else None,
            "bordered_iou": float(np.mean(iou)) if iou else None,
            "unbordered_photos_with_a_crop": int(clean.groupby("image_path")["invented"].any().sum()),
            "by_family": table("family"), "by_depth": table(depth_bin),
            "by_family_mottled": table(["family", "mottled"]),
            "by_quality": table(pd.cut(real["quality"], [69, 80, 90, 95])),
            "by_stamp": table("stamp"),
            "misses": real.loc[~real["found"], ["image_path", "edge", "family", "mottled", "true", "pred"]]
            .round(4).to_dict("records")}


def evaluate(n_images: int = 300, seed: int = 2026, width: int = 2000, height: int = 1000,
             workers: int | None = None, keep: Path | None = None) -> dict[str, Any]:
    """Render, detect, score; `keep` keeps the photos, truth.csv and pred.csv there."""
    if n_images < 1 or min(width, height) < 64:
        raise ConfigError(f"evaluate needs at least 1 photo of at least 64x64, got {n_images} of {width}x{height}")
    with tempfile.TemporaryDirectory(prefix="cardboard-eval-") as tmp:
        folder = Path(keep) if keep is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        truth = render_cases(folder, n_images, seed, width, height)
        pred = detect_crops(folder, truth["image_path"], workers=workers)
        if keep is not None:
            truth.to_csv(folder / "truth.csv", index=False)
            pred.to_csv(folder / "pred.csv", index=False)
    summary = summarise(truth, pred, score_bands(truth, pred, width, height))
    summary.update({"seed": seed, "size": [width, height], "goals": GOALS,
                    "met": {k: summary[k] is not None and summary[k] >= v for k, v in GOALS.items()}})
    return summary


def markdown(summary: dict[str, Any]) -> str:
    """The report's tables, as docs/CARDBOARD.md shows them."""
    pct = lambda v, digits=1: "—" if v is None else f"{100 * v:.{digits}f}%"  # noqa: E731
    lines = [f"{summary['photos']} photos {summary['size'][0]}x{summary['size'][1]} (seed {summary['seed']}), "
             f"{summary['bordered_photos']} bordered with {summary['bands']} bands: found {pct(summary['found'])}, "
             f"mean depth error {pct(summary['mean_depth_error'], 2)} of the side; edges of unbordered photos with "
             f"nothing invented {pct(summary['clean_edges'])} ({summary['unbordered_photos_with_a_crop']} photos "
             f"cropped); mean box IoU on bordered photos {summary['bordered_iou']:.4f}", ""]
    for key, title in (("by_family", "board"), ("by_depth", "depth (share of the side)"),
                       ("by_family_mottled", "board, mottled"), ("by_quality", "JPEG quality"),
                       ("by_stamp", "date stamp")):
        extra = key == "by_family"  # edges without a band, and the share of them with one invented
        lines += [f"| {title} | bands | found | mean depth error (share of the side) |"
                  + (" edges without a band | invented |" if extra else ""),
                  "| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if extra else "")]
        lines += [f"| {r['group']} | {r['bands']} | {pct(r['found'])} | {pct(r['mean_depth_error'], 2)} |"
                  + (f" {r['empty_edges']} | {pct(r['invented'])} |" if extra else "") for r in summary[key]]
        lines.append("")
    return "\n".join(lines)
