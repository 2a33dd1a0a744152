"""The benchmark harness's command line: bad arguments are refused before any training."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(ROOT / "bench"))


@pytest.mark.parametrize(("argv", "message"), [
    (["--control", "--fractions", "0"], "shares in (0, 1]"),
    (["--curve", "--fractions", "a,b"], "shares in (0, 1]"),
    (["--quick", "--fractions", "0.2"], "--fractions goes with --curve or --control"),
    (["--quick", "--tasks", "conll,imdb"], "unknown task or method: imdb"),
    (["--full", "--seeds", "7"], "--seeds goes with --curve or --control"),
    (["--curve", "--seeds", "7,x"], "--seeds: comma-separated integers"),
])
def test_bad_arguments_are_refused_with_the_reason(bench, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_partial_rerun_keeps_every_finished_row_when_it_is_stopped(bench, tmp_path, monkeypatch):
    """A rerun of some tasks and methods writes the results after each run: rows it has not redone yet
    stay as they were, rows it has redone are replaced, other tasks' rows are kept."""
    path = tmp_path / "full.json"
    old = [{"task": t, "method": m, "value": 0.0} for t, m in [("conll", "camel"), ("squad", "camel"), ("squad", "full")]]
    bench.write_json(path, {"profile": "full", "machine": {"cpu": "old"}, "rows": old})
    done = []

    def train_row(config, runs_dir, name, task, method, **extra):
        if done:
            raise KeyboardInterrupt  # stopped while training the second run
        done.append(name)
        return {"task": task, "method": method, "value": 1.0, "metric": "f1", "trainable_pct": 19.0,
                "seconds_per_epoch": 1.0, "peak_rss_mb": 1.0}

    monkeypatch.setattr(bench, "train_row", train_row)
    monkeypatch.setattr(bench, "run_config", lambda *args, **kwargs: {})
    with pytest.raises(KeyboardInterrupt):
        bench.run_profile("full", ["squad"], ["camel", "full"], 42, path)
    rows = {(r["task"], r["method"]): r["value"] for r in bench.json.loads(path.read_text())["rows"]}
    assert rows == {("conll", "camel"): 0.0, ("squad", "camel"): 1.0, ("squad", "full"): 0.0}
