"""Distributed data parallel: 2 processes with the gloo backend on the CPU, started by torchrun through the CLI."""

import json
import os
import subprocess
import sys

import pytest
from synthetic import make_dataset

from acecal.bundles import Bundle
from acecal.training.progress import read_log


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    data = make_dataset(tmp_path / "ds", 6, shape_zyx=(16, 16, 16), seed=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACECAL_DATA_DIR": str(tmp_path / "home")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "-m",
        "acecal.cli.main",
        "train",
        str(data),
        "--roi",
        "16,16,16",
        "--epochs",
        "2",
        "--val-every",
        "1",
        "--val-fraction",
        "0.34",
        "--batch-size",
        "1",
        "--num-samples",
        "1",
        "--lr",
        "0.01",
        "--warmup-epochs",
        "1",
        "--init-filters",
        "8",
        "--blocks-down",
        "1,1",
        "--blocks-up",
        "1",
        "--id",
        "ddp-model",
        "--out",
        str(tmp_path / "models"),
        "--work-dir",
        str(tmp_path / "work"),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--quiet",
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.split() == ["ddp-model"]  # only rank 0 prints the id
    b = Bundle.load(tmp_path / "models" / "ddp-model")
    assert b.config.training["world_size"] == 2 and b.config.metrics["num_cases"] == 2
    log = read_log(tmp_path / "work" / "train.jsonl")
    assert [r["event"] for r in log] == ["start", "epoch", "epoch", "published"]  # rank 0 writes, once
    assert log[0]["world_size"] == 2 and log[0]["train_cases"] == 4
    # each rank validated one of the 2 validation cases; the metrics were gathered from both
    assert all(r["val_cases"] == 2 and r["val"]["dice"] is not None for r in log[1:3])
    assert json.loads((tmp_path / "models" / "ddp-model" / "bundle.json").read_text())["id"] == "ddp-model"
