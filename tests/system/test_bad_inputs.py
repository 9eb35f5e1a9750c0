"""Bad input, as a user meets it: one line naming the culprit, exit 2, no traceback (docs/RELIABILITY.md).

Each case breaks one thing in a copy of a tiny valid dataset (the surgery is in tests/system/surgery.py) and runs the
real CLI entry point (`biomass.run`, `biomass.infer`, `biomass.crops`, ...) through the same `run_cli` wrapper as
`python -m`, in-process to keep the file fast; a few cases also run in real processes, started when the module
starts so that they overlap the in-process ones. The reader functions' own tests are in tests/unit/test_data.py and
tests/unit/test_models.py; unknown config keys and component names, a run directory that exists and a `data.root`
that does not are checked in tests/unit/test_config.py and tests/system/test_e2e.py. `CASES` is also what produces
the table in docs/RELIABILITY.md.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pytest

from surgery import (
    DEMO, SMALL, make_base, image, row, dry, set_target, drop_column, missing_csv, empty_csv, header_only_csv,
    unknown_target, duplicate_sample_id, target_missing, inconsistent, missing_image, write_bytes, warned,
    random_bytes, garbage_body, damaged_scan, png16, replace_image, grayscale, rgba_png, cmyk, crop_outside,
    crops_missing, weights_file, weights_mismatch, unknown_timm_model, pooling_does_not_fit, infer_missing_fold,
    infer_missing_data, infer_not_a_run, giant_header, config_case, cache_under_file, run_dir_under_file,
    infer_out_under_file, infer_out_is_folder, infer_negative_batch, synthetic_under_file, outside_root,
    crops_truncated, crops_out_under_file, crops_preview_under_file, crops_score_bad_box, crops_evaluate_no_photos)


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
    # issue 24: post-processing knobs ranged as their twins; image paths kept under data.root; crops detect checks
    Case("post_blend_above_one", "infer.post=[{blend_sums: 1.5}] (was accepted; infer.ttt.blend refuses 1.5)",
         config_case("infer.post=[{blend_sums: 1.5}]", expect=("infer.post[0].weight", "less than or equal to 1"))),
    Case("post_scale_zero", "infer.post=[{clover_scale: 0}]",
         config_case("infer.post=[{clover_scale: 0}]", expect=("infer.post[0].factor", "greater than 0"))),
    Case("post_threshold_negative", "infer.post=[{zero_below: -1}]",
         config_case("infer.post=[{zero_below: -1}]",
                     expect=("infer.post[0].threshold", "greater than or equal to 0"))),
    Case("post_target_unknown", "infer.post=[{name: zero_below, targets: [Dry_Moss_g]}] (was: accepted, an error after "
         "training)", config_case("infer.post=[{name: zero_below, targets: [Dry_Moss_g]}]",
                                  expect=("infer.post[0].targets", "'Dry_Moss_g'", "Dry_Clover_g"))),
    Case("train_path_dotdot", "train.csv names ../outside/<image>.jpg (a copy outside data.root)",
         outside_root("dotdot")),
    Case("train_path_absolute", "train.csv names an absolute path outside data.root", outside_root("absolute")),
    Case("train_path_symlink", "train.csv names train/link_<image>.jpg, a symlink to a file outside data.root",
         outside_root("symlink")),
    Case("test_path_dotdot", "test.csv names ../outside/<image>.jpg (inference)", outside_root("dotdot", "test.csv"),
         module="biomass.infer"),
    Case("dry_run_data_root_missing", "data.root names a folder that does not exist (--dry-run)",
         lambda root: (dry(root.parent / "nowhere"), ["data.root", str(root.parent / "nowhere"), "does not exist"])),
    Case("crops_truncated", "crops detect: one train JPEG cut in half", crops_truncated, module="biomass.crops"),
    Case("crops_out_unwritable", "crops detect --out under a plain file", crops_out_under_file,
         module="biomass.crops"),
    Case("crops_preview_unwritable", "crops detect --preview under a plain file", crops_preview_under_file,
         module="biomass.crops"),
    Case("crops_score_bad_box", "crops score: a predicted box with x0 'abc'", crops_score_bad_box,
         module="biomass.crops"),
    Case("crops_evaluate_no_photos", "crops evaluate --n 0", crops_evaluate_no_photos, module="biomass.crops"),
]


def entry_point(module: str):
    if module == "biomass.infer":
        from biomass.infer import main
    elif module == "biomass.data.synthetic":
        from biomass.data.synthetic.__main__ import main
    elif module == "biomass.crops":
        from biomass.crops import main
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


def test_crops_detect_writes_nothing_when_an_image_is_truncated(base, tmp_path, capsys):
    """Before: exit 0, a box for the half image and only libjpeg's unnamed `Premature end of JPEG file`."""
    args, _ = broken(base, tmp_path, crops_truncated)
    code, _, err = run_in_process(capsys, "biomass.crops", args)
    assert code == 2 and not (tmp_path / "pred.csv").exists() and not list(tmp_path.glob(".pred.csv*")), err


def test_outside_root_is_allowed_when_the_config_says_so(base, tmp_path, capsys):
    args, _ = broken(base, tmp_path, outside_root("dotdot"))
    code, out, err = run_in_process(capsys, "biomass.run", [*args, "data.allow_outside_root=true"])
    assert code == 0 and "# data: 6 train images" in out, err



# ----------------------------------------------------------------------------------------- the doc matches the code
def test_every_file_and_name_reliability_md_names_exists():
    """docs/RELIABILITY.md names files (`biomass/...`, `tests/...`) and functions, constants and test cases in
    backticks; each must exist (a file) or be defined somewhere in biomass/ or tests/ (a name), so a rename that
    leaves the page behind fails here."""
    import re

    from surgery import REPO

    text = (REPO / "docs" / "RELIABILITY.md").read_text()
    spans = re.findall(r"`([^`\n]+)`", text)
    files = {m for s in spans if " " not in s  # a command may name a missing file on purpose
             for m in re.findall(r"\b((?:biomass|tests|docs|experiments|ablations)/[\w/.-]*\w)", s)}
    missing = sorted(f for f in files if not (REPO / f).exists())
    assert not missing, f"RELIABILITY.md names files that do not exist: {missing}"
    source = "\n".join(p.read_text() for d in ("biomass", "tests") for p in (REPO / d).rglob("*.py"))
    names = {s.split("(")[0] for s in spans if re.fullmatch(r"[A-Za-z_]\w*_\w*(\(.*\))?", s)}
    undefined = sorted(n for n in names if not re.search(
        rf"(def|class) {n}\b|^\s*{n}\s*[:=]|Case\(\"{n}\"|\bself\.{n}\s*=|\"{n}\"", source, re.M))
    assert not undefined, f"RELIABILITY.md names what biomass/ and tests/ do not define: {undefined}"


def test_inference_takes_crop_boxes_from_outside_a_read_only_data_folder(base, tmp_path, capsys):
    """Kaggle's data folder is read-only, so crops.csv cannot be written next to the test images. Before: no way to
    point inference at another file (and the hint said to write into the data folder); now `--crops FILE`."""
    from surgery import fake_run

    data = tmp_path / "data"
    shutil.copytree(base, data)
    (data / "crops.csv").rename(tmp_path / "boxes.csv")
    run = fake_run(tmp_path, data, "", "infer.crop=boxes")
    args = [str(run), "--data", str(data), "--out", str(tmp_path / "s.csv")]
    code, _, err = run_in_process(capsys, "biomass.infer", args)
    assert code == 2 and "crops.csv: crop boxes file not found" in err and "--crops FILE" in err, err
    code, _, err = run_in_process(capsys, "biomass.infer", [*args, "--crops", str(tmp_path / "boxes.csv")])
    # past the boxes: the fake run's empty checkpoints are what stops it now
    assert code == 2 and "crop boxes" not in err and "best." in err, err

