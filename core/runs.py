"""The run store: one folder per run under the runs root, written so a UI can poll it.

    runs/<run_id>/
        config.json        the resolved RunConfig the run was started with (re-runnable as is)
        labels.json        label list (index = class id)
        data.json          split sizes and sources
        groups.json        the partition, the method's plan and which groups are trained
        status.json        state, progress, timings, headline metrics (all a run list needs)
        metrics.jsonl      training/eval log, one JSON object per line, appended while training
        report.json        final evaluation (validation, and test when there is one)
        delta.safetensors  only the trained tensors: base model + delta = the tuned model
        eval/<name>.json   later evaluations (`python -m core eval`)
        checkpoints/       Trainer checkpoints while training (for resume); removed on success

States: created -> running -> completed | failed | interrupted. A run whose process died without
saying so (killed) is reported as interrupted: `status.json` names its pid and the pid is gone.
Every JSON file is written atomically (write, fsync, rename).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import RunConfig
from core.errors import ConfigError, RunError
from core.fileio import (
    append_jsonl,
    atomic_write,
    atomic_write_json,
    read_json,
    read_jsonl,
)

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STATES = ("created", "running", "completed", "failed", "interrupted")
FINISHED = ("completed", "failed", "interrupted")


def check_run_id(run_id: str, field: str = "run_id") -> str:
    """Run ids become folder names: letters, digits, '.', '_', '-' only, no path tricks."""
    if not isinstance(run_id, str) or not RUN_ID.match(run_id) or run_id in (".", ".."):
        raise ConfigError(field, f"{run_id!r} is not a valid run id (letters, digits, '.', '_', '-'; at most 128; "
                          "must start with a letter or digit)")
    return run_id


def new_run_id(config: RunConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    task = config.data.task
    return f"{stamp}-{task}-{config.method.name}".replace("_", "-")


def process_rank() -> int:
    """This process's rank under torchrun / accelerate (0 when training in one process)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Run:
    """Handle on one run folder. Under multi-process training only rank 0 writes (`writer`)."""

    path: Path
    writer: bool = True

    @property
    def id(self) -> str:
        return self.path.name

    # ---- files -------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, data: Any) -> None:
        if self.writer:
            atomic_write_json(self.path / name, data)

    def read_json(self, name: str) -> Any:
        path = self.path / name
        if not path.is_file():
            raise RunError(f"run {self.id!r} has no {name}")
        return read_json(path)

    def write_jsonl(self, name: str, records: list[dict]) -> None:
        if not self.writer:
            return

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)

        atomic_write(self.path / name, write)

    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.read_json("config.json"))

    def labels(self) -> list[str]:
        return self.read_json("labels.json")

    def log(self, record: dict) -> None:
        if self.writer:
            append_jsonl(self.path / "metrics.jsonl", {"time": round(time.time(), 3), **record})

    def metrics(self) -> list[dict]:
        return read_jsonl(self.path / "metrics.jsonl")

    # ---- status ------------------------------------------------------------------------------
    def status(self) -> dict:
        """The run's status, with a dead writer's `running` reported as `interrupted`."""
        path = self.path / "status.json"
        if not path.is_file():
            return {"state": "unknown", "run_id": self.id}
        status = read_json(path)
        if status.get("state") == "running" and not _alive(status.get("pid")):
            status = {**status, "state": "interrupted", "error": "the training process ended without saying why (killed?)"}
        return status

    def set_status(self, state: str, **fields: Any) -> dict:
        assert state in STATES, state
        if not self.writer:
            return {}
        path = self.path / "status.json"
        status = read_json(path) if path.is_file() else {"run_id": self.id, "created": _now()}
        status.update(fields)
        status["state"] = state
        status["updated"] = _now()
        if state == "running":
            status["pid"] = os.getpid()
            status.pop("error", None)
        atomic_write_json(path, status)
        return status

    def latest_checkpoint(self) -> str | None:
        ckpts = sorted(self.path.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
        return str(ckpts[-1]) if ckpts else None

    def remove_checkpoints(self) -> None:
        if self.writer:
            shutil.rmtree(self.path / "checkpoints", ignore_errors=True)


def runs_root(config_or_dir: RunConfig | str | Path) -> Path:
    return Path(config_or_dir.runs_dir if isinstance(config_or_dir, RunConfig) else config_or_dir)


def create_run(config: RunConfig, wait_seconds: float = 300.0) -> Run:
    """Make the run folder (refusing to overwrite an existing run) and save the config.

    Under multi-process training (torchrun) rank 0 makes the folder and the other ranks join it; they
    need the same, explicit run id."""
    if world_size() > 1:
        if config.run_id is None:
            raise ConfigError("run_id", "training in several processes needs an explicit run id, shared by all of them")
        if process_rank() != 0:
            path = runs_root(config) / check_run_id(config.run_id)
            deadline = time.monotonic() + wait_seconds
            while not (path / "config.json").is_file():
                if time.monotonic() > deadline:
                    raise RunError(f"rank {process_rank()}: rank 0 did not create run {config.run_id!r} in time")
                time.sleep(0.2)
            return Run(path, writer=False)
    run_id = check_run_id(config.run_id) if config.run_id is not None else new_run_id(config)
    root = runs_root(config)
    path = root / run_id
    if config.run_id is None:  # generated ids: add a counter rather than collide
        n = 2
        while path.exists():
            path = root / f"{run_id}-{n}"
            n += 1
    try:
        path.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise RunError(f"run {run_id!r} already exists in {root}; choose another run id, or resume it") from None
    config.run_id = path.name
    run = Run(path)
    run.write_json("config.json", config.to_dict())
    run.set_status("created")
    return run


def open_run(run_id: str, runs_dir: str | Path = "runs") -> Run:
    check_run_id(run_id, field="run")
    path = Path(runs_dir) / run_id
    if not (path / "config.json").is_file():
        raise RunError(f"no run {run_id!r} in {runs_dir}")
    return Run(path, writer=process_rank() == 0)


def list_runs(runs_dir: str | Path = "runs") -> list[dict]:
    """Status of every run, newest first. Reads one small file per run (cheap to poll)."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    rows = []
    for path in root.iterdir():
        if path.is_dir() and (path / "status.json").is_file() and RUN_ID.match(path.name):
            try:
                rows.append(Run(path).status())
            except (OSError, ValueError):
                rows.append({"run_id": path.name, "state": "unreadable"})
    rows.sort(key=lambda s: s.get("created", ""), reverse=True)
    return rows


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
