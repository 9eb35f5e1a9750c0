"""What several test files share: the demo experiment, a tiny setting of it, and training through the real entry
point (importable as `helpers`: pytest puts tests/ on sys.path for its conftest)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.yaml"
GOLD = REPO / "experiments" / "gold.yaml"
TINY = ["main.image.size=[32,32]", "aux.image.size=[32,32]", "main.train.epochs=2", "aux.train.epochs=1",
        "main.train.batch_size=4", "aux.train.batch_size=4", "data.num_workers=0",
        "main.model.backbone.model_name=resnet10t", "aux.model.backbone.model_name=resnet10t"]
TINY_MAIN_ONLY = ["main.image.size=[32,32]", "main.train.epochs=3", "main.train.batch_size=4", "data.num_workers=0",
                  "main.model.backbone.model_name=resnet10t", "aux=null"]


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
