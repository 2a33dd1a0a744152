"""Multi-process training through torchrun (gloo on CPUs): one run folder, written by rank 0 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import RunConfig
from core.errors import ConfigError
from core.runs import create_run

ROOT = Path(__file__).resolve().parents[1]


def test_several_processes_need_one_explicit_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="explicit run id"):
        create_run(RunConfig(runs_dir=str(tmp_path)))
    leader = create_run(RunConfig(run_id="shared", runs_dir=str(tmp_path)))
    monkeypatch.setenv("RANK", "1")
    follower = create_run(RunConfig(run_id="shared", runs_dir=str(tmp_path)))
    assert follower.path == leader.path and leader.writer and not follower.writer
    follower.set_status("failed", error="a follower must not write")
    assert json.loads(leader.file("status.json").read_text())["state"] == "created"


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_one_run(tiny_bert, sentiment_csv, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    runs = tmp_path / "runs"
    cmd = [str(torchrun), "--nproc_per_node=2", "-m", "core", "train", "--train", str(sentiment_csv), "--model", str(tiny_bert),
           "--method", "camel", "--experts", "4", "--epochs", "2", "--batch-size", "8", "--runs-dir", str(runs),
           "--run-id", "ddp", "--no-progress"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    status = json.loads((runs / "ddp" / "status.json").read_text())
    # 58 training examples, batches of 8 per process, 2 processes: 4 steps an epoch (data split across ranks).
    assert status["state"] == "completed" and status["progress"]["max_steps"] == 8
    assert (runs / "ddp" / "delta.safetensors").is_file() and [p.name for p in runs.iterdir()] == ["ddp"]
