"""biomass.data.cardboard and `python -m biomass.crops`: cardboard borders found on rendered quadrats, none invented on
dry pasture, stamps or beige patches, and a CLI whose crops.csv the training code reads.

The rendered images carry their true boxes in crops.csv (biomass.data.synthetic); seeds here differ from the ones
docs/CARDBOARD.md measures on.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from biomass.data.cardboard import box_iou, detect_box, detect_crops, score_boxes
from biomass.data.synthetic import generate, render_quadrat
from biomass.data.table import check_images, read_crops
from biomass.errors import DataError, run_cli

W, H = 600, 300
DRY = dict(Dry_Green_g=0.0, Dry_Dead_g=80.0, Dry_Clover_g=0.0, Pre_GSHH_NDVI=0.2, Height_Ave_cm=2.0)
BARE = dict(Dry_Green_g=0.5, Dry_Dead_g=0.5, Dry_Clover_g=0.0, Pre_GSHH_NDVI=0.3, Height_Ave_cm=1.0)
LUSH = dict(Dry_Green_g=60.0, Dry_Dead_g=10.0, Dry_Clover_g=10.0, Pre_GSHH_NDVI=0.8, Height_Ave_cm=10.0)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """40 train + 10 test quadrats of 600x300, about a third with cardboard; read-only (copy before writing)."""
    return generate(tmp_path_factory.mktemp("cardboard") / "data", n_train=40, n_test=10, seed=31, width=W, height=H)


@pytest.fixture(scope="module")
def truth(rendered: Path) -> pd.DataFrame:
    return pd.read_csv(rendered / "crops.csv")


@pytest.fixture(scope="module")
def detected(rendered: Path, truth: pd.DataFrame) -> pd.DataFrame:
    return detect_crops(rendered, truth["image_path"], workers=2)


def _bordered(df: pd.DataFrame) -> pd.Series:
    """Per row: is the box smaller than the W x H frame?"""
    return (df["x0"] > 0) | (df["y0"] > 0) | (df["x1"] < W) | (df["y1"] < H)


def _frames(df: pd.DataFrame) -> dict[str, tuple[int, int]]:
    return dict.fromkeys(df["image_path"], (H, W))


def _rotated_truth(box: tuple[int, int, int, int], k: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The box after np.rot90(image, k) of a width x height image."""
    x0, y0, x1, y1 = box
    return [(x0, y0, x1, y1), (y0, width - x1, y1, width - x0), (width - x1, height - y1, width - x0, height - y0),
            (height - y1, x0, height - y0, x1)][k % 4]


# ---------------------------------------------------------------------------------------------------- accuracy
def test_borders_found_on_rendered_quadrats(detected: pd.DataFrame, truth: pd.DataFrame) -> None:
    scores = score_boxes(detected, truth, _frames(truth))
    assert scores["bordered"]["images"] >= 8 and scores["unbordered"]["images"] >= 20
    assert scores["bordered"]["mean_iou"] >= 0.95, scores
    assert scores["bordered"]["share_iou_ge_0.9"] >= 0.9, scores
    # The test has teeth: never cropping would fail it.
    frame_only = truth.assign(x0=0, y0=0, x1=W, y1=H)
    assert score_boxes(frame_only, truth, _frames(truth))["bordered"]["mean_iou"] < 0.9


def test_no_border_invented_where_there_is_none(detected: pd.DataFrame, truth: pd.DataFrame) -> None:
    full = truth.loc[~_bordered(truth), "image_path"]
    assert len(full) >= 20
    got = detected.set_index("image_path").loc[full].reset_index()
    assert not _bordered(got).any(), f"borders invented on {list(got['image_path'][_bordered(got)])}"


def test_detect_box_on_an_array_matches_the_file_route(rendered: Path, detected: pd.DataFrame,
                                                       truth: pd.DataFrame) -> None:
    for path in truth["image_path"][_bordered(truth)][:3]:
        rgb = cv2.cvtColor(cv2.imread(str(rendered / path)), cv2.COLOR_BGR2RGB)
        assert detect_box(rgb) == tuple(detected.set_index("image_path").loc[path])


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_full_size_photo_every_orientation(tmp_path: Path, k: int) -> None:
    """A 2000x1000 photo (decoded at half size, box scaled back), turned 0-270 degrees, so all four edges and a
    portrait frame get tested, with a date stamp on top of the cardboard."""
    rng = np.random.default_rng(5)
    box = (150, 70, 1880, 1000)
    rgb = np.ascontiguousarray(np.rot90(render_quadrat(rng, LUSH, 2000, 1000, box, "2015/09/04"), k))
    cv2.imwrite(str(tmp_path / "photo.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    got = tuple(detect_crops(tmp_path, ["photo.jpg"]).iloc[0, 1:])
    assert box_iou(got, _rotated_truth(box, k, 2000, 1000)) >= 0.97, got


@pytest.mark.parametrize("where", [(20, 30, 1.0), (300, 45, 0.9), (10, 20, 2.0)], ids=["on", "straddling", "wide"])
def test_a_stamp_printed_over_the_cardboard_does_not_move_its_edge(where: tuple[int, int, float]) -> None:
    """Orange text on the band, across its inner edge, or 40% of the side wide: the edge stays put, every way up."""
    box = (0, 36, W, H)
    img = render_quadrat(np.random.default_rng(2), LUSH, W, H, box, None)
    x, y, scale = where
    cv2.putText(img, "2019/04/23", (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 150, 20), 2, cv2.LINE_AA)
    for k in range(4):
        got = detect_box(np.ascontiguousarray(np.rot90(img, k)))
        assert box_iou(got, _rotated_truth(box, k, W, H)) >= 0.97, (k, got)


# ------------------------------------------------------------------------------------------- false positives
@pytest.mark.parametrize("labels", [DRY, BARE], ids=["dry-straw", "bare-soil"])
def test_dry_or_bare_pasture_with_a_turned_stamp_is_not_cropped(labels: dict) -> None:
    """Beige straw and flat soil fill the frame; the orange stamp, turned with the photo, lies along any edge."""
    for seed in range(3):
        img = render_quadrat(np.random.default_rng([11, seed]), labels, W, H, None, "2018/11/27")
        for k in range(4):
            turned = np.ascontiguousarray(np.rot90(img, k))
            assert detect_box(turned) == (0, 0, turned.shape[1], turned.shape[0]), (seed, k)


def test_flat_beige_patches_that_are_not_borders(tmp_path: Path) -> None:
    """A flat cardboard-coloured half-disc touching an edge (no straight inner edge), and a flat strip along only
    a third of an edge (most lines do not cross it): neither is a border."""
    img = render_quadrat(np.random.default_rng(3), LUSH, W, H, None, None)
    beige = (196, 184, 160)
    disc = img.copy()
    cv2.circle(disc, (0, H // 2), int(0.4 * H), beige, -1)
    strip = img.copy()
    strip[: H // 3, : int(0.08 * W)] = beige
    for case in (disc, strip):
        assert detect_box(case) == (0, 0, W, H)


def test_a_band_along_the_whole_edge_is_a_border() -> None:
    """The positive counterpart of the strip above: the same flat colour along the whole edge is cut."""
    img = render_quadrat(np.random.default_rng(3), LUSH, W, H, None, None)
    img[:, : int(0.08 * W)] = (196, 184, 160)
    assert box_iou(detect_box(img), (int(0.08 * W), 0, W, H)) >= 0.97


# ---------------------------------------------------------------------------------------------------- scoring
def test_box_iou_and_scores() -> None:
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 5)) == pytest.approx(0.5)
    true = pd.DataFrame({"image_path": ["a", "b"], "x0": [0, 10], "y0": [0, 0], "x1": [100, 100], "y1": [50, 50]})
    pred = true.assign(x0=[0, 0])
    scores = score_boxes(pred, true, {"a": (50, 100), "b": (50, 100)})
    assert scores["unbordered"] == {"images": 1, "mean_iou": 1.0, "share_iou_ge_0.9": 1.0}
    assert scores["bordered"]["images"] == 1 and scores["bordered"]["mean_iou"] == pytest.approx(0.9)
    with pytest.raises(DataError, match="no predicted box"):
        score_boxes(pred.iloc[:1], true)


# -------------------------------------------------------------------------------------------------------- CLI
def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from biomass.crops import main

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_cli_detect_preview_score_and_overwrite(rendered: Path, truth: pd.DataFrame, tmp_path: Path,
                                                capsys) -> None:
    root = tmp_path / "data"
    shutil.copytree(rendered, root)
    code, out, err = _cli(capsys, "detect", str(root), "--out", str(tmp_path / "pred.csv"),
                          "--preview", str(tmp_path / "preview"))
    assert code == 0 and err == "" and len(out.strip().splitlines()) == 1
    n_bordered = int(_bordered(truth).sum())
    assert out.startswith(f"{len(truth)} images, cardboard border found in {n_bordered} ")

    sizes = check_images(root, truth["image_path"])
    assert len(read_crops(tmp_path / "pred.csv", sizes)) == len(truth)  # what training reads
    preview = cv2.imread(str(tmp_path / "preview" / "crops_preview.png"))
    assert preview is not None and preview.shape[0] > 100 and preview.shape[1] > 1000

    code, out, _ = _cli(capsys, "score", str(root), "--pred", str(tmp_path / "pred.csv"), "--json")
    scores = json.loads(out)
    assert code == 0 and scores["bordered"]["images"] == n_bordered and scores["bordered"]["mean_iou"] >= 0.95

    # DATA_ROOT/crops.csv (the true boxes) exists: kept unless --force, refused in one line with exit 2.
    before = (root / "crops.csv").read_bytes()
    code, out, err = _cli(capsys, "detect", str(root))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert "--force" in err and (root / "crops.csv").read_bytes() == before
    code, _, _ = _cli(capsys, "detect", str(root), "--force")
    assert code == 0 and (root / "crops.csv").read_bytes() == (tmp_path / "pred.csv").read_bytes()
    assert not list(root.glob(".crops.csv*"))  # no temporary file left behind


def test_cli_without_csvs_takes_every_jpg(rendered: Path, truth: pd.DataFrame, tmp_path: Path, capsys) -> None:
    root = tmp_path / "photos"
    for path in truth["image_path"][::5]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(rendered / path, root / path)
    code, out, _ = _cli(capsys, "detect", str(root))
    written = pd.read_csv(root / "crops.csv")
    assert code == 0 and sorted(written["image_path"]) == sorted(truth["image_path"][::5])
    code, _, err = _cli(capsys, "detect", str(tmp_path / "empty"))
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- board it was not tuned on (issue 24)
KRAFT, DARK_BROWN = (158, 118, 79), (92, 64, 41)  # HSV saturation 0.50 and 0.55: above the old 0.40 ceiling


@pytest.mark.parametrize("colour", [KRAFT, DARK_BROWN], ids=["kraft", "dark-brown"])
def test_brown_board_is_found(colour: tuple[int, int, int]) -> None:
    """Before: every band more saturated than HSV 0.40 was rejected as 'not cardboard' (60% of the bands missed)."""
    img = render_quadrat(np.random.default_rng(4), LUSH, W, H, None, None)
    img[:, : int(0.1 * W)] = colour
    img[int(0.8 * H):, :] = colour
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    assert box_iou(detect_box(noisy), (int(0.1 * W), 0, W, int(0.8 * H))) >= 0.97


def test_a_band_one_percent_deep_is_found(tmp_path: Path) -> None:
    """A 10 px band on a 2000x1000 photo (1% of the side, under 3 px on the 512 px work copy): the thin-band pass."""
    img = render_quadrat(np.random.default_rng(6), LUSH, 2000, 1000, None, None)
    img[:10] = (200, 196, 190)
    cv2.imwrite(str(tmp_path / "thin.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    x0, y0, x1, y1 = detect_crops(tmp_path, ["thin.jpg"]).iloc[0, 1:]
    assert (x0, x1, y1) == (0, 2000, 1000) and 8 <= y0 <= 12


@pytest.mark.slow
def test_detector_meets_the_bar_on_a_wide_spread_of_borders() -> None:
    """`python -m biomass.crops evaluate` in small (docs/CARDBOARD.md has the full run): grey, white, beige, kraft and
    dark-brown board, flat or mottled, 1-4 sides 1-35% deep, JPEG 70-95, stamps; seed unused in development."""
    from biomass.data.cardboard_eval import GOALS, evaluate

    summary = evaluate(n_images=150, seed=11, width=1000, height=500, workers=2)
    assert summary["bands"] >= 150
    for key, bar in GOALS.items():
        assert summary[key] >= bar, (key, summary[key], summary["misses"])
