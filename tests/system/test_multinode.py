"""One training over two "machines": two `accelerate launch --num_machines 2 --machine_rank {0,1}` processes on
127.0.0.1 (gloo, CPU) reach the same metrics.json as the same two processes launched on one machine.

The two-node launch uses accelerate's torchrun path (`--multi_gpu` with ACCELERATE_USE_CPU=true, as
accelerate_configs/cpu_ddp.yaml does): with `--cpu` accelerate starts one independent process per machine, not a
distributed run. The reference is two processes on one machine, not one process: DDP over two processes averages the
gradients of two half-batches, so a single process is a different (if equivalent) computation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEMO, REPO

from biomass.tracking.server import free_port

ARGS = ["main.image.size=[32,32]", "main.train.epochs=1", "main.train.batch_size=4", "data.num_workers=0",
        "main.model.backbone.model_name=resnet10t", "aux=null", "main.folds.splitter.n_splits=2",
        "tracking.mlflow=false"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from biomass.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("multinode") / "data", n_train=12, n_test=4, seed=0, width=128,
                    height=64)


@pytest.mark.slow
def test_two_machines_match_two_processes_on_one(tmp_path, data):
    train = ["-m", "biomass.run", str(DEMO), f"data.root={data}", *ARGS]
    port = free_port()
    nodes = [subprocess.Popen([*LAUNCH, "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
                               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--num_processes",
                               "2", *train, "--run-dir", str(tmp_path / "two_nodes")],
                              env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    one = subprocess.run([*LAUNCH, "--config_file", str(REPO / "accelerate_configs" / "cpu_ddp.yaml"),
                          "--main_process_port", str(free_port()), *train, "--run-dir", str(tmp_path / "one_node")],
                         env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = json.loads((tmp_path / "two_nodes" / "metrics.json").read_text())
    b = json.loads((tmp_path / "one_node" / "metrics.json").read_text())
    assert a["cv/images_scored"] == 12
    numbers = {k for k, v in b.items() if isinstance(v, (int, float)) and "time" not in k and "seconds" not in k}
    assert numbers and {k: a[k] for k in numbers} == pytest.approx({k: b[k] for k in numbers}, abs=1e-6)
