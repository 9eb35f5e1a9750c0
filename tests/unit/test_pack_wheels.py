"""biomass.pack: the per-image wheel lists and their check, the notebook's cells, the peaks MFU divides by."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from biomass.bench.common import peak_tflops
from biomass.errors import BiomassError
from biomass.pack import wheels as W
from biomass.pack.notebook import write_notebook


def fake_wheel(folder: Path, name: str, version: str, requires: list[str], size: int = 0) -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        meta = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")
        z.writestr("pad.bin", b"\0" * size)
    return path


def image(lacks: dict[str, str], has: tuple[str, ...] = ("numpy",)) -> W.Image:
    return W.Image("test", "3.12", has, lacks, "a test image")


def test_images_carry_what_they_lack_and_not_what_they_have():
    for img in W.IMAGES.values():
        lacks = {W.normalise(n) for n in img.lacks}
        assert not lacks & {W.normalise(n) for n in img.has}
        assert {"pydantic", "pydantic-core", "albumentations", "albucore"} <= lacks
        assert "mlflow" not in lacks and "ray" not in lacks  # off the inference and bench gpu paths
    assert W.IMAGES["gpu"].python == "3.12" and "timm" in W.IMAGES["kaggle"].lacks
    assert set(W.GPU_REHEARSAL) <= set(W.IMAGES["gpu"].has)


def test_check_accepts_a_closed_set(tmp_path):
    ws = [fake_wheel(tmp_path, "a", "1.0", ["b==2.0", "numpy>=1", "c; python_version < '3.10'", "d; extra == 'x'"]),
          fake_wheel(tmp_path, "b", "2.0", [])]
    W.check(image({"a": "1.0", "b": "2.0"}), ws, "3.12")


@pytest.mark.parametrize("problem, match", [("unmet", "needs 'c'"), ("pin", "pins b 2.0"), ("twice", "two versions"),
                                            ("missing", "no wheel for b"), ("size", "over the 60 MiB")])
def test_check_names_what_is_wrong(tmp_path, problem, match):
    reqs = {"unmet": ["c"], "pin": ["b==3.0"]}.get(problem, [])
    ws = [fake_wheel(tmp_path, "a", "1.0", reqs, size=61 * 2**20 if problem == "size" else 0)]
    if problem != "missing":
        ws.append(fake_wheel(tmp_path, "b", "2.0", []))
    if problem == "twice":
        ws.append(fake_wheel(tmp_path, "b", "2.1", []))
    with pytest.raises(BiomassError, match=match):
        W.check(image({"a": "1.0", "b": "2.0"}), ws, "3.12")


def test_install_line_is_offline():
    line = W.install_line(Path(".whl"))
    assert "--no-index --no-deps" in line and "--target /tmp/biomass_site .whl/*.whl" in line


def test_unknown_image_is_one_error():
    with pytest.raises(BiomassError, match="one of gpu, kaggle"):
        W.image_named("colab")


def test_notebook_installs_offline_and_reads_its_parameters(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    write_notebook(tmp_path / "s.ipynb", "/kaggle/input/csiro-biomass")
    nb = nbformat.read(tmp_path / "s.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].metadata["tags"] == ["parameters"] and "/kaggle/input/csiro-biomass" in code[0].source
    install = code[1].source
    assert '"--no-index"' in install and '"--find-links"' in install and '"--no-deps"' in install
    assert "biomass.infer" in code[3].source and "OUT" in code[3].source
    for cell in code:  # every cell is valid Python
        compile(cell.source, "cell", "exec")
    assert json.loads((tmp_path / "s.ipynb").read_text())["nbformat"] == 4


def test_mfu_divides_by_the_peak_of_the_precision_that_ran():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989
    assert peak_tflops("NVIDIA H200", "tf32") == 495 and peak_tflops("NVIDIA H100", "fp32") == 67
    assert peak_tflops("some CPU", "bf16") is None
