"""Dataset surgery for tests/system/test_bad_inputs.py: each function breaks one thing in a copy of a tiny valid
dataset and returns (CLI arguments, what the one output line must name)."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "tests" / "configs" / "demo_random_init.yaml"  # helpers.DEMO: the random-init base
SMALL = ["main.model.backbone.model_name=resnet10t", "aux.model.backbone.model_name=resnet10t"]


# ---------------------------------------------------------------------------------------------- dataset surgery
def make_base(folder: Path) -> Path:
    """A valid Kaggle-layout dataset: 6 train + 2 test JPEGs of 64x32."""
    from biomass.data.synthetic import generate

    return generate(folder, n_train=6, n_test=2, seed=0, width=64, height=32)


def table(root: Path, name: str = "train.csv") -> pd.DataFrame:
    return pd.read_csv(root / name, dtype=str, keep_default_na=False)  # as text: only the changed cell differs


def save(df: pd.DataFrame, root: Path, name: str = "train.csv") -> None:
    df.to_csv(root / name, index=False)


def image(root: Path, i: int = 1) -> str:
    """image_path of the i-th train image."""
    return str(pd.unique(table(root)["image_path"])[i])


def row(df: pd.DataFrame, i: int = 1, target: str = "Dry_Dead_g") -> int:
    return int(df.index[(df["image_path"] == pd.unique(df["image_path"])[i]) & (df["target_name"] == target)][0])


def dry(root: Path, *extra: str) -> list[str]:
    return [str(DEMO), "--dry-run", f"data.root={root}", *SMALL, *extra]


def set_target(value: str, expect: str) -> Callable[[Path], tuple[list[str], list[str]]]:
    def mutate(root: Path) -> tuple[list[str], list[str]]:
        df = table(root)
        r = row(df)
        df.loc[r, "target"] = value
        save(df, root)
        return dry(root), ["train.csv", df.loc[r, "sample_id"], expect]
    return mutate


def drop_column(root):
    save(table(root).drop(columns="Height_Ave_cm"), root)
    return dry(root), ["train.csv", "missing column 'Height_Ave_cm'"]


def missing_csv(root):
    (root / "train.csv").unlink()
    return dry(root), ["train.csv", "file not found"]


def empty_csv(root):
    (root / "train.csv").write_text("")
    return dry(root), ["train.csv", "empty"]


def header_only_csv(root):
    (root / "train.csv").write_text((root / "train.csv").read_text().splitlines()[0] + "\n")
    return dry(root), ["train.csv", "no rows"]


def unknown_target(root):
    df = table(root)
    r = row(df)
    df.loc[r, "target_name"] = "Dry_Moss_g"
    save(df, root)
    return dry(root), ["train.csv", df.loc[r, "sample_id"], "'Dry_Moss_g'"]


def duplicate_sample_id(root):
    df = table(root)
    save(pd.concat([df, df.iloc[[row(df)]]], ignore_index=True), root)
    return dry(root), ["train.csv", "duplicate sample_id", df.loc[row(df), "sample_id"]]


def target_missing(root):
    df = table(root)
    r = row(df, 1, "GDM_g")
    sid, path = df.loc[r, "sample_id"], df.loc[r, "image_path"]
    save(df.drop(index=r), root)
    return dry(root), ["train.csv", path, "'GDM_g'", sid]


def inconsistent(col: str, value: str):
    def mutate(root):
        df = table(root)
        r = row(df)
        df.loc[r, col] = value
        save(df, root)
        return dry(root), ["train.csv", df.loc[r, "image_path"], col, value]
    return mutate


def missing_image(root):
    p = image(root)
    (root / p).unlink()
    return dry(root), [p, "file not found"]


def write_bytes(data: Callable[[bytes], bytes], *culprits: str):
    def mutate(root):
        p = image(root)
        (root / p).write_bytes(data((root / p).read_bytes()))
        return dry(root), [p, *culprits]
    return mutate


def warned(data: Callable[[bytes], bytes], libjpeg: str):
    def mutate(root):
        p = image(root)
        (root / p).write_bytes(data((root / p).read_bytes()))
        return dry(root), [f"warning: image {root / p}: decoded, but libjpeg reports", libjpeg,
                           "# data: 6 train images"]
    return mutate


def random_bytes(_: bytes) -> bytes:
    return np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()


def garbage_body(jpeg: bytes) -> bytes:
    """Start-of-image marker, then random bytes, then end-of-image: passes the marker test, fails to decode."""
    body = np.random.default_rng(1).integers(0, 256, len(jpeg), dtype=np.uint8).tobytes()
    return b"\xff\xd8" + body + b"\xff\xd9"


def damaged_scan(jpeg: bytes) -> bytes:
    """200 bytes of the entropy-coded data overwritten; every marker intact, so libjpeg decodes it with a warning."""
    out = bytearray(jpeg)
    at = len(out) // 3
    out[at:at + 200] = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
    return bytes(out)


def png16(gray: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 65536, (32, 64) if gray else (32, 64, 3), dtype=np.uint16)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def replace_image(suffix: str, data: Callable[[Path], bytes]):
    """The i-th train image replaced by another file (listed under a new suffix in train.csv and crops.csv)."""
    def mutate(root):
        old = image(root)
        new = str(Path(old).with_suffix(suffix))
        content = data(root / old)
        (root / old).unlink()
        (root / new).write_bytes(content)
        for name in ("train.csv", "crops.csv"):
            df = table(root, name)
            df.loc[df["image_path"] == old, "image_path"] = new
            save(df, root, name)
        return dry(root), ["# data: 6 train images"]
    return mutate


def grayscale(src: Path) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.imread(str(src), cv2.IMREAD_GRAYSCALE))
    return buf.tobytes()


def rgba_png(src: Path) -> bytes:
    bgr = cv2.imread(str(src))
    ok, buf = cv2.imencode(".png", np.dstack([bgr, np.full(bgr.shape[:2], 128, np.uint8)]))
    return buf.tobytes()


def cmyk(src: Path) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.open(src).convert("CMYK").save(out, "JPEG")
    return out.getvalue()


def crop_outside(root):
    df = table(root, "crops.csv")
    p = image(root)
    df.loc[df["image_path"] == p, ["x0", "y0", "x1", "y1"]] = ["10", "0", "70", "32"]
    save(df, root, "crops.csv")
    return dry(root), ["crops.csv", p, "(10, 0, 70, 32)", "outside the 64x32 image"]


def crops_missing(root):
    (root / "crops.csv").unlink()
    return dry(root), ["crops.csv", "file not found"]


def weights_file(folder: Path, model_name: str = "test_vit", fmt: str = "safetensors") -> Path:
    """A state dict of another timm model than the demo's resnet10t."""
    import timm
    import torch

    state = timm.create_model(model_name, num_classes=0).state_dict()
    path = folder / f"{model_name}.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def weights_mismatch(fmt: str):
    def mutate(root):
        path = weights_file(root.parent, fmt=fmt)
        return dry(root, f"main.model.backbone.weights={path}"), ["main stage", str(path), "do not match resnet10t"]
    return mutate


def unknown_timm_model(root):
    return dry(root, "main.model.backbone.model_name=resnet181"), [
        "main.model.backbone.model_name", "'resnet181'", "'resnet18'"]


def pooling_does_not_fit(root):
    return dry(root, "main.model.pooling.name=cls"), ["main.model.pooling", "`cls`", "class token"]


def fake_run(folder: Path, data: Path, missing: str = "main/fold1", *overrides: str) -> Path:
    """A completed-looking run directory of the demo config (checkpoint files are empty placeholders: the check
    that every fold is present comes before any is loaded)."""
    from biomass.config.load import load_experiment, to_yaml

    run = folder / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_experiment(DEMO, [f"data.root={data}", *SMALL, *overrides]).config))
    (run / "run.json").write_text(json.dumps({"status": "completed", "format_version": 1}))
    images = pd.unique(table(data)["image_path"])
    pd.DataFrame({"image_path": images, "main_fold": np.arange(len(images)) % 3,
                  "aux_fold": np.arange(len(images)) % 3}).to_csv(run / "folds.csv", index=False)
    for stage in ("main", "aux"):
        for k in range(3):
            if f"{stage}/fold{k}" != missing:
                (run / stage / f"fold{k}").mkdir(parents=True)
                (run / stage / f"fold{k}" / "best.safetensors").write_bytes(b"")
                (run / stage / f"fold{k}" / "best.json").write_text("{}")
    return run


def infer_missing_fold(root):
    run = fake_run(root.parent, root)
    return [str(run), "--data", str(root), "--out", str(root.parent / "s.csv")], [
        str(run), "main fold 1", "main/fold1/best.safetensors"]


def infer_missing_data(root):
    run = fake_run(root.parent, root, missing="")
    return [str(run), "--data", str(root.parent / "nowhere"), "--out", str(root.parent / "s.csv")], [
        "--data", "nowhere", "does not exist"]


def infer_not_a_run(root):
    (root.parent / "not_a_run").mkdir()
    return [str(root.parent / "not_a_run"), "--data", str(root)], [
        str(root.parent / "not_a_run"), "not a biomass run directory"]


def giant_header(jpeg: bytes) -> bytes:
    """The JPEG's frame header rewritten to claim 20000x10000 pixels (200 megapixels): what PIL's decompression-bomb
    check sees of a huge photo, without making one."""
    import struct

    out, i = bytearray(jpeg), 2
    while out[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + struct.unpack(">H", out[i + 2:i + 4])[0]
    out[i + 5:i + 9] = struct.pack(">HH", 10000, 20000)
    return bytes(out)


def config_case(*overrides: str, expect: tuple[str, ...]):
    def mutate(root):
        return dry(root, *overrides), list(expect)
    return mutate


def a_file(root: Path) -> Path:
    """A plain file: a path under it can never be created, whoever runs the test (root ignores permission bits)."""
    path = root.parent / "a_file"
    path.write_text("not a folder\n")
    return path


def cache_under_file(root):
    bad = a_file(root) / "cache"
    return dry(root, f"data.cache_dir={bad}"), ["data.cache_dir", str(bad), "is a file, not a folder"]


def run_dir_under_file(root):
    bad = a_file(root) / "run"
    return [str(DEMO), f"data.root={root}", *SMALL, "tracking.mlflow=false", "--run-dir", str(bad)], [
        "--run-dir", str(bad), "is a file, not a folder"]


def infer_out_under_file(root):
    run = fake_run(root.parent, root, missing="")
    bad = a_file(root) / "sub.csv"
    return [str(run), "--data", str(root), "--out", str(bad)], ["--out", str(bad), "is a file, not a folder"]


def infer_out_is_folder(root):
    run = fake_run(root.parent, root, missing="")
    return [str(run), "--data", str(root), "--out", str(root)], ["--out", str(root), "is a folder"]


def infer_negative_batch(root):
    run = fake_run(root.parent, root, missing="")
    return [str(run), "--data", str(root), "--out", str(root.parent / "s.csv"), "--batch-size", "-4"], [
        "--batch-size", "-4"]


def synthetic_under_file(root):
    bad = a_file(root) / "demo"
    return [str(bad), "--n-train", "2", "--n-test", "1"], ["output folder", str(bad), "is a file, not a folder"]


# ------------------------------------------------------------------------------------------------ round 3 (issue 24)
def outside_root(how: str, csv: str = "train.csv"):
    """The second image's rows name a copy of it outside the data root: through `..`, as an absolute path, or
    through a symlink under train/ that points out. The file exists and has the same name, so only the path check
    can refuse it (before: read, and a submission written)."""
    def mutate(root):
        df = table(root, csv)
        old = str(pd.unique(df["image_path"])[1])
        elsewhere = root.parent / "outside" / Path(old).name
        elsewhere.parent.mkdir(exist_ok=True)
        elsewhere.write_bytes((root / old).read_bytes())
        if how == "symlink":
            new = str(Path(old).with_name("link_" + Path(old).name))
            (root / new).symlink_to(elsewhere)
            df.loc[df["image_path"] == old, "sample_id"] = df["sample_id"].str.replace(
                Path(old).stem, Path(new).stem)
        else:
            new = f"../outside/{Path(old).name}" if how == "dotdot" else str(elsewhere)
        df.loc[df["image_path"] == old, "image_path"] = new
        save(df, root, csv)
        expect = [csv, new, "outside the data root", "data.allow_outside_root"]
        if csv == "test.csv":
            run = fake_run(root.parent, root, missing="")
            return [str(run), "--data", str(root), "--out", str(root.parent / "s.csv")], expect
        return dry(root), expect
    return mutate


def crops_detect(root: Path, *extra: str) -> list[str]:
    return ["detect", str(root), "--out", str(root.parent / "pred.csv"), *extra]


def crops_truncated(root):
    p = image(root)
    (root / p).write_bytes((root / p).read_bytes()[: (root / p).stat().st_size // 2])
    return crops_detect(root), [str(root / p), "truncated JPEG"]


def crops_out_under_file(root):
    bad = a_file(root) / "crops.csv"
    return ["detect", str(root), "--out", str(bad)], ["--out", str(bad), "is a file, not a folder"]


def crops_preview_under_file(root):
    bad = a_file(root) / "preview"
    return crops_detect(root, "--preview", str(bad)), ["--preview", str(bad), "is a file, not a folder"]


def crops_score_bad_box(root):
    """A predicted box with a word for a number (was: a ValueError traceback)."""
    df = table(root, "crops.csv")
    df.loc[1, "x0"] = "abc"
    save(df, root.parent, "pred.csv")
    return ["score", str(root), "--pred", str(root.parent / "pred.csv")], [
        str(root.parent / "pred.csv"), df.loc[1, "image_path"], "(abc, "]


def crops_evaluate_no_photos(root):
    return ["evaluate", "--n", "0"], ["evaluate", "at least 1 photo"]  # was: a KeyError traceback
