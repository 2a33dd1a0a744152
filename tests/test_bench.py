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
