"""What several test files share: the demo experiment, a tiny setting of it, and training through the real entry
point (importable as `helpers`: pytest puts tests/ on sys.path for its conftest)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.yaml"
TINY = ["main.image.size=[32,32]", "aux.image.size=[32,32]", "main.train.epochs=2", "aux.train.epochs=1",
        "main.train.batch_size=4", "aux.train.batch_size=4", "data.num_workers=0",
        "main.model.backbone.model_name=resnet10t", "aux.model.backbone.model_name=resnet10t"]


def train(run_dir: Path, data: Path, *extra: str) -> Path:
    from biomass.config.load import load_experiment
    from biomass.cv.experiment import train_experiment

    exp = load_experiment(DEMO, [f"data.root={data}", *TINY, *extra])
    return train_experiment(exp, run_dir=run_dir)
