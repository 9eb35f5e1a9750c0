"""Bad input, as a user meets it: one line naming the culprit, exit 2, no traceback (docs/RELIABILITY.md).

Each case breaks one thing in a copy of a tiny valid dataset and runs the real CLI entry point (`biomass.run`,
`biomass.infer`) through the same `run_cli` wrapper as `python -m`, in-process to keep the file fast; a few cases
also run in real processes, started when the module starts so that they overlap the in-process ones. The reader
functions' own tests are in tests/test_data.py and tests/test_models.py; unknown config keys and component names,
a run directory that exists and a `data.root` that does not are checked in tests/test_config.py and
tests/test_e2e.py. `CASES` is also what produces the table in docs/RELIABILITY.md.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"
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


def fake_run(folder: Path, data: Path, missing: str = "main/fold1") -> Path:
    """A completed-looking run directory of the demo config (checkpoint files are empty placeholders: the check
    that every fold is present comes before any is loaded)."""
    from biomass.config.load import load_experiment, to_yaml

    run = folder / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_experiment(DEMO, [f"data.root={data}", *SMALL]).config))
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


class Case(NamedTuple):
    id: str
    what: str  # for docs/RELIABILITY.md
    mutate: Callable[[Path], tuple[list[str], list[str]]]  # root -> (CLI arguments, what the output must name)
    module: str = "biomass.run"
    ok: bool = False  # accepted (converted, or decoded with a warning naming the file), not an error


CASES = [
    Case("csv_missing", "train.csv deleted", missing_csv),
    Case("csv_empty", "train.csv emptied (0 bytes)", empty_csv),
    Case("csv_header_only", "train.csv cut to its header line", header_only_csv),
    Case("column_missing", "column Height_Ave_cm dropped from train.csv", drop_column),
    Case("target_unknown", "target_name of one row set to Dry_Moss_g", unknown_target),
    Case("target_nan", "target of one row emptied (NaN)",
         set_target("", "no value (empty or NaN) in column 'target'")),
    Case("target_inf", "target of one row set to inf",
         set_target("inf", "inf, which is not a finite number, in column 'target'")),
    Case("target_negative", "target of one row set to -3", set_target("-3", "negative target: -3")),
    Case("sample_id_duplicate", "one row of train.csv repeated", duplicate_sample_id),
    Case("target_missing", "the GDM_g row of one image deleted", target_missing),
    Case("ndvi_inconsistent", "Pre_GSHH_NDVI of one of an image's five rows set to 0.11",
         inconsistent("Pre_GSHH_NDVI", "0.11")),
    Case("height_inconsistent", "Height_Ave_cm of one of an image's five rows set to 99",
         inconsistent("Height_Ave_cm", "99")),
    Case("image_missing", "one train JPEG deleted", missing_image),
    Case("image_empty", "one train JPEG emptied (0 bytes)", write_bytes(lambda b: b"", "file is empty")),
    Case("image_random_bytes", "one train JPEG replaced by 3000 random bytes",
         write_bytes(random_bytes, "not a JPEG")),
    Case("image_garbage_body", "one train JPEG: start marker, random bytes, end marker",
         write_bytes(garbage_body, "cannot be decoded")),
    Case("image_truncated", "one train JPEG cut in half", write_bytes(lambda b: b[: len(b) // 2], "truncated JPEG")),
    Case("image_png_named_jpg", "one train .jpg replaced by a 16-bit PNG (same name)",
         write_bytes(lambda b: png16(), "not a JPEG")),
    Case("image_damaged_scan", "one train JPEG: 200 bytes of its scan data overwritten, markers intact",
         warned(damaged_scan, "Corrupt JPEG data"), ok=True),
    Case("image_truncated_marker_added", "one train JPEG cut in half, then an end-of-image marker appended",
         warned(lambda b: b[: len(b) // 2] + b"\xff\xd9", "premature end of data segment"), ok=True),
    Case("image_grayscale", "one train JPEG re-encoded as 1-channel grayscale", replace_image(".jpg", grayscale),
         ok=True),
    Case("image_cmyk", "one train JPEG re-encoded as CMYK", replace_image(".jpg", cmyk), ok=True),
    Case("image_rgba_png", "one train image replaced by an RGBA PNG (listed as .png)", replace_image(".png", rgba_png),
         ok=True),
    Case("image_16bit_png", "one train image replaced by a 16-bit RGB PNG (listed as .png)",
         replace_image(".png", lambda _: png16()), ok=True),
    Case("image_16bit_gray_png", "one train image replaced by a 16-bit grayscale PNG (listed as .png)",
         replace_image(".png", lambda _: png16(gray=True)), ok=True),
    Case("crop_outside", "crop box of one image set to x 10..70 on a 64 px wide image", crop_outside),
    Case("crops_missing", "crops.csv deleted (the demo crops: main.image.crop is true)", crops_missing),
    Case("timm_model_unknown", "main.model.backbone.model_name=resnet181", unknown_timm_model),
    Case("pooling_does_not_fit", "main.model.pooling.name=cls on a CNN (no class token)", pooling_does_not_fit),
    Case("weights_mismatch", "main.model.backbone.weights: a test_vit state dict (.safetensors) for resnet10t",
         weights_mismatch("safetensors")),
    Case("weights_mismatch_pth", "main.model.backbone.weights: a test_vit state dict (.pth) for resnet10t",
         weights_mismatch("pth")),
    Case("infer_fold_missing", "inference on a run directory without main/fold1", infer_missing_fold,
         module="biomass.infer"),
    Case("infer_not_a_run", "inference on a folder that is not a run directory", infer_not_a_run,
         module="biomass.infer"),
    Case("infer_data_missing", "inference with --data naming a folder that does not exist", infer_missing_data,
         module="biomass.infer"),
    # issue 16: configs that validated and dry-ran, then crashed in the first step or made no submission
    Case("n_splits_one", "main.folds.splitter.n_splits=1",
         config_case("main.folds.splitter.n_splits=1", expect=("main.folds.splitter.n_splits", "at least 2"))),
    Case("fold_weights_zero", "infer.fold_weights=[0,0,0] (sum 0: an empty submission before)",
         config_case("infer.fold_weights=[0,0,0]", expect=("infer.fold_weights", "sum above 0"))),
    Case("fold_weights_length", "infer.fold_weights=[1,1] with 3 main folds",
         config_case("infer.fold_weights=[1,1]", expect=("infer.fold_weights", "2 weights for the 3 main folds"))),
    Case("init_from_fold_not_trained", "main.folds.train_folds=[1,2] with aux.init_from=main/fold0",
         config_case("main.folds.train_folds=[1,2]", "aux.init_from=main/fold0",
                     expect=("aux.init_from", "main fold 0", "train_folds"))),
    Case("same_fold_not_trained", "main.folds.train_folds=[0] with aux.init_from=main/same_fold (all aux folds)",
         config_case("main.folds.train_folds=[0]", expect=("aux.init_from", "aux fold 1 needs main fold 1"))),
    Case("batch_size_one", "main.train.batch_size=1 (the fusion head has BatchNorm)",
         config_case("main.train.batch_size=1", expect=("main.train.batch_size=1", "BatchNorm"))),
    Case("vit_size_not_patch_multiple", "main.model.backbone.model_name=test_vit, main.image.size=[33,33]",
         config_case("main.model.backbone.model_name=test_vit", "main.image.size=[33,33]",
                     expect=("main.image.size=[33, 33]", "divisible by patch size (16)"))),
    Case("model_kwargs_unknown", "main.model.backbone.model_kwargs={foo: 1} (resnet10t takes no foo)",
         config_case("main.model.backbone.model_kwargs={foo: 1}",
                     expect=("main.model", "'foo'", "main.model.backbone.model_kwargs"))),
    Case("tta_empty", "infer.tta=[]", config_case("infer.tta=[]", expect=("infer.tta", "at least 1 item"))),
    Case("image_giant", "one train JPEG's header claims 20000x10000 pixels (200 megapixels)",
         write_bytes(giant_header, "too large to read safely", "200000000 pixels")),
    # issue 16: output places that cannot be written (a path under a plain file: refused for root too)
    Case("cache_dir_unwritable", "data.cache_dir under a plain file", cache_under_file),
    Case("run_dir_unwritable", "--run-dir under a plain file (training)", run_dir_under_file),
    Case("infer_out_unwritable", "--out under a plain file", infer_out_under_file, module="biomass.infer"),
    Case("infer_out_folder", "--out naming a folder", infer_out_is_folder, module="biomass.infer"),
    Case("infer_batch_negative", "biomass.infer --batch-size -4", infer_negative_batch, module="biomass.infer"),
    Case("synthetic_unwritable", "synthetic data output folder under a plain file", synthetic_under_file,
         module="biomass.data.synthetic"),
]


def entry_point(module: str):
    if module == "biomass.infer":
        from biomass.infer import main
    elif module == "biomass.data.synthetic":
        from biomass.data.synthetic.__main__ import main
    else:
        from biomass.run import main
    return main


# --------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "data")


def broken(base: Path, folder: Path, mutate) -> tuple[list[str], list[str]]:
    root = folder / "data"
    shutil.copytree(base, root)
    return mutate(root)


def _spawn(module: str, args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=cwd)


@pytest.fixture(scope="module", autouse=True)
def processes(base, tmp_path_factory) -> dict[str, tuple[subprocess.Popen[str], list[str], Path]]:
    """Real processes for a few cases (started with the module, read by the last tests): the training command, which
    must stop on bad data and on a bad weights file (the meta-device model check) before it creates the run
    directory, and inference."""
    procs = {}

    def start(name: str, case: Case, train: bool = False) -> None:
        folder = tmp_path_factory.mktemp(name)
        args, culprits = broken(base, folder, case.mutate)
        if train:
            args = [a for a in args if a != "--dry-run"] + ["tracking.mlflow=false", "--run-dir", str(folder / "run")]
        procs[name] = (_spawn(case.module, args, folder), culprits, folder)

    by_id = {c.id: c for c in CASES}
    start("train_corrupt", by_id["image_garbage_body"], train=True)  # libjpeg complains too
    start("train_weights", by_id["weights_mismatch"], train=True)
    start("infer", by_id["infer_fold_missing"])
    yield procs
    for proc, _, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# ------------------------------------------------------------------------------------------------------------ tests
def run_in_process(capsys, module: str, args: list[str]) -> tuple[int, str, str]:
    from biomass.errors import run_cli

    with pytest.raises(SystemExit) as exit_:
        run_cli(entry_point(module), args)
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.mark.parametrize("case", [c for c in CASES if not c.ok], ids=lambda c: c.id)
def test_bad_input_is_one_line_naming_the_culprit(case, base, tmp_path, capsys):
    args, culprits = broken(base, tmp_path, case.mutate)
    code, _, err = run_in_process(capsys, case.module, args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in culprits:
        assert text in lines[0], (text, lines[0])


@pytest.mark.parametrize("case", [c for c in CASES if c.ok], ids=lambda c: c.id)
def test_unusual_image_is_converted_or_named_in_a_warning(case, base, tmp_path, capsys):
    args, expected = broken(base, tmp_path, case.mutate)
    code, out, err = run_in_process(capsys, case.module, args)
    assert code == 0, err
    for text in expected:
        assert text in out + err, (text, out[-300:], err)
    assert err.count("\n") == sum(text.startswith("warning: ") for text in expected)  # nothing else on stderr
    from biomass.data.images import read_image

    root = tmp_path / "data"
    path = image(root)
    img = read_image(root / path, size=(16, 16))
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    """16-bit samples keep their top byte (OpenCV's colour decode), so the full 16-bit range maps to 0..255."""
    from biomass.data.images import read_image

    (tmp_path / "a.png").write_bytes(png16())
    src = cv2.imread(str(tmp_path / "a.png"), cv2.IMREAD_UNCHANGED)
    assert src.dtype == np.uint16
    img = read_image(tmp_path / "a.png")
    assert np.array_equal(img, cv2.cvtColor((src >> 8).astype(np.uint8), cv2.COLOR_BGR2RGB))


def test_weights_that_match_pass_the_dry_run(base, tmp_path, capsys):
    """The meta-device check accepts a file of the right model (and does not read its tensors)."""
    path = weights_file(tmp_path, "resnet10t")
    code, out, err = run_in_process(capsys, "biomass.run", dry(base, f"main.model.backbone.weights={path}"))
    assert code == 0, err


def test_missing_weights_file_is_an_error_of_the_dry_run(base, tmp_path, capsys):
    """The dry run is strict: a weights file that is not there is one error line naming the key and the file."""
    missing = tmp_path / "nowhere.safetensors"
    code, out, err = run_in_process(capsys, "biomass.run", dry(base, f"main.model.backbone.weights={missing}"))
    assert code == 2 and err.strip() == f"error: main.model.backbone.weights: {missing} not found", err


def _finished(procs, name: str) -> tuple[int, str, str, list[str], Path]:
    proc, culprits, folder = procs[name]
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err, culprits, folder


@pytest.mark.parametrize("name", ["train_corrupt", "train_weights", "infer"])
def test_real_process_prints_one_line_and_exits_2(processes, name):
    code, out, err, culprits, folder = _finished(processes, name)
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for text in culprits:
        if name == "train_weights" and text == "main stage":  # the dry run's check names the stage; training does not
            continue
        assert text in lines[0], (text, lines[0])
    if name.startswith("train"):  # the data and model checks come before the run directory: nothing half-written
        assert not (folder / "run").exists()


def test_run_dir_that_exists_needs_force_which_clears_the_old_run(tmp_path):
    """The refusal names both ways on (the CLI refusal itself is tests/test_e2e.py's); `--force` removes what an
    earlier run wrote, since a stale main/fold0/done.json or saved state would be taken for this run's."""
    from biomass.config.load import load_experiment
    from biomass.errors import BiomassError
    from biomass.rundir import RunDir

    cfg = load_experiment(DEMO, [f"data.root={tmp_path}"]).config
    run = tmp_path / "run"
    for name in ("run.json", "config.yaml", "main/fold0/done.json", "state/main/fold1/progress.json",
                 "plots/oof_scatter.png", "notes.txt"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("{}")
    with pytest.raises(BiomassError, match=f"run directory {run} already exists; pass --force .* --resume {run}"):
        RunDir.create(cfg.name, run, force=False)
    assert RunDir.create(cfg.name, run, force=True).path == run
    assert [p.name for p in run.iterdir()] == ["notes.txt"]
