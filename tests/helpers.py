"""What several test files share: the demo experiment, a tiny setting of it, and training through the real entry
point (importable as `helpers`: pytest puts tests/ on sys.path for its conftest)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The tests' base: experiments/demo.yaml with the random-init 128 px CNN it trained before it became pretrained
# (tests check code paths, not accuracy). DEMO_FILE is the shipped demo itself (its own tests, and
# tests/system/test_versus_baselines.py, which trains it).
DEMO = REPO / "tests" / "configs" / "demo_random_init.yaml"
DEMO_FILE = REPO / "experiments" / "demo.yaml"
GOLD = REPO / "experiments" / "gold.yaml"
TINY = ["main.image.size=[32,32]", "aux.image.size=[32,32]", "main.train.epochs=2", "aux.train.epochs=1",
        "main.train.batch_size=4", "aux.train.batch_size=4", "data.num_workers=0",
        "main.model.backbone.model_name=resnet10t", "aux.model.backbone.model_name=resnet10t"]
TINY_MAIN_ONLY = ["main.image.size=[32,32]", "main.train.epochs=3", "main.train.batch_size=4", "data.num_workers=0",
                  "main.model.backbone.model_name=resnet10t", "aux=null"]


def only_folder(root: Path) -> Path:
    """The one folder in `root` (a sweep's stamped directory)."""
    (path,) = root.iterdir()
    return path


def npy_files(cache_dir: Path) -> list[Path]:
    """The decoded-image cache files in a folder."""
    return sorted(cache_dir.glob("*.npy"))


def eager_compile(monkeypatch) -> list:
    """torch.compile with the `eager` backend (dynamo's graph capture and the OptimizedModule wrapper, without
    inductor's minutes of C++ compilation on a CPU); returns the list of compiled modules."""
    import torch

    compiled, real = [], torch.compile

    def fake(model, **kwargs):
        compiled.append(model)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", fake)
    return compiled


def write_jpeg(path: Path, rgb, quality: int = 95) -> Path:
    """An RGB uint8 array as a JPEG at `path`."""
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def smooth_rgb(h: int, w: int, seed: int = 0):
    """A photo-like image: low-frequency colour fields plus mild pixel noise."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
    img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 6, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def train(run_dir: Path, data: Path, *extra: str) -> Path:
    from biomass.config.load import load_experiment
    from biomass.cv.experiment import train_experiment

    exp = load_experiment(DEMO, [f"data.root={data}", *TINY, *extra])
    return train_experiment(exp, run_dir=run_dir)


class FakeExecutor:
    """A sweep executor that trains nothing: for each child it writes what biomass.run would (config.yaml, run.json,
    metrics.json, oof.csv over the data's images), with predictions = truth + noise whose size grows by `worse[variant]`
    (seeded by the child's seed), or a failure (`fail`). `calls` records variant, seed, cmd and env of each child."""

    name = "fake"

    def __init__(self, data: Path, worse: dict[str, float], fail: bool = False):
        self.data, self.worse, self.fail = Path(data), worse, fail
        self.calls: list[dict] = []

    def run(self, jobs, on_done) -> None:
        import json
        import time

        import numpy as np
        import pandas as pd

        from biomass.ablate.executors import Outcome
        from biomass.constants import TARGETS
        from biomass.data.table import read_train
        from biomass.metrics import weighted_r2

        truth = read_train(self.data)
        for job in jobs:
            cmd = job.cmd
            tags = dict(cmd[j + 1].split("=", 1) for j, a in enumerate(cmd) if a == "--tag")
            run_dir = Path(cmd[cmd.index("--resume" if "--resume" in cmd else "--run-dir") + 1])
            if "--resume" in cmd:  # biomass.run --resume takes no tags: what the first attempt was
                tags = json.loads((run_dir / "fake.json").read_text())
            self.calls.append({"variant": tags.get("variant"), "seed": int(tags.get("seed", -1)), "cmd": cmd,
                               "env": job.env, "key": job.key, "resume": "--resume" in cmd})
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "fake.json").write_text(json.dumps(tags))
            job.folder.joinpath("child.err").write_text("error: boom\n" if self.fail else "")
            start = time.time()
            if self.fail:
                (run_dir / "run.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
                on_done(job, Outcome(1, start, start, time.time()))
                continue
            y = truth[list(TARGETS)].to_numpy(float)
            rng = np.random.default_rng(int(tags["seed"]))
            pred = y + rng.normal(0, 1.0, y.shape) * y.std(0)
            extra = self.worse.get(tags["variant"], 0.0)
            pred = pred + extra * np.abs(rng.normal(0, 1.0, y.shape)) * y.std(0)
            rows = [(f"{i}__{t}", pred[r, j]) for r, i in enumerate(truth["image_id"]) for j, t in enumerate(TARGETS)]
            pd.DataFrame(rows, columns=["sample_id", "target"]).to_csv(run_dir / "oof.csv", index=False)
            (run_dir / "config.yaml").write_text("{}\n")
            (run_dir / "metrics.json").write_text(json.dumps(
                {"cv/weighted_r2": weighted_r2(y, pred), **{f"cv/{t}_r2": 0.5 for t in TARGETS}}))
            (run_dir / "run.json").write_text(json.dumps({"status": "completed", "format_version": 1}))
            on_done(job, Outcome(0, start, start, time.time()))

    def close(self) -> None:
        pass
