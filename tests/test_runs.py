"""Run store: sanitised ids, atomic files, stale `running` states, cheap listing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core.config import RunConfig
from core.errors import ConfigError, RunError
from core.fileio import append_jsonl, atomic_write_json, read_jsonl
from core.runs import create_run, list_runs, open_run


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "x" * 200, "a b", "..", "run;rm"])
def test_unsafe_run_ids_are_refused(tmp_path, bad):
    with pytest.raises(ConfigError, match="not a valid run id"):
        create_run(RunConfig(run_id=bad, runs_dir=str(tmp_path)))
    with pytest.raises(ConfigError):
        open_run(bad, tmp_path)


def test_existing_run_is_never_overwritten(tmp_path):
    create_run(RunConfig(run_id="r1", runs_dir=str(tmp_path)))
    with pytest.raises(RunError, match="already exists"):
        create_run(RunConfig(run_id="r1", runs_dir=str(tmp_path)))
    a = create_run(RunConfig(runs_dir=str(tmp_path)))
    b = create_run(RunConfig(runs_dir=str(tmp_path)))
    assert a.id != b.id


def test_killed_writer_is_reported_as_interrupted(tmp_path):
    run = create_run(RunConfig(run_id="killed", runs_dir=str(tmp_path)))
    run.set_status("running")
    assert run.status()["state"] == "running"  # this process is alive
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    status = json.loads(run.file("status.json").read_text())
    status["pid"] = int(dead.stdout)
    atomic_write_json(run.file("status.json"), status)
    assert run.status()["state"] == "interrupted"
    assert list_runs(tmp_path)[0]["state"] == "interrupted"


def test_truncated_last_log_line_is_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # a writer killed mid-line
    assert read_jsonl(path) == [{"step": 1}]


def test_atomic_write_leaves_no_temp_files_and_normal_permissions(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert (tmp_path / "a.json").stat().st_mode & 0o044  # readable by others, unlike mkstemp's 0600


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match="no run 'nope'"):
        open_run("nope", tmp_path)
