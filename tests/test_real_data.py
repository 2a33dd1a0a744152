"""Slow checks on the embedded MiniLM and the shared real data sets (skipped without ../shared/data).

Run only these with `python -m pytest -m slow`; skip them with `-m "not slow"`."""

from __future__ import annotations

import pytest
from conftest import SHARED_DATA

from core.cli import main
from core.config import RunConfig
from core.runs import open_run
from core.train import prepare

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")]

PHRASEBANK = SHARED_DATA / "sentiment/financial_phrasebank/Sentences_AllAgree.txt"
CONLL = SHARED_DATA / "ner/conll2003"


def camel_config(**data) -> RunConfig:
    return RunConfig.from_dict({"data": data, "method": {"name": "camel", "score_batches": 4}, "train": {"batch_size": 16}})


def test_auto_selection_differs_between_an_easy_and_a_hard_task():
    easy = prepare(camel_config(train=str(PHRASEBANK), encoding="latin-1", max_train_samples=800)).selection
    hard = prepare(camel_config(task="ner", train=str(CONLL / "train.txt"), validation=str(CONLL / "dev.txt"),
                                max_train_samples=800, max_eval_samples=50)).selection
    assert easy.complexity.value < hard.complexity.value
    assert easy.settings["p"] < hard.settings["p"]
    assert easy.selected != hard.selected
    assert easy.selected_params < hard.selected_params
    for sel in (easy, hard):
        assert sel.selected_params <= sel.settings["budget"] * sel.total_params
        assert all(c.reason for c in sel.choices)


def test_minilm_trains_and_evaluates_on_phrasebank(tmp_path, capsys):
    other = tmp_path / "other.txt"
    lines = (SHARED_DATA / "sentiment/financial_phrasebank/Sentences_50Agree.txt").read_bytes().splitlines()
    other.write_bytes(b"\n".join(lines[:200]) + b"\n")
    runs = str(tmp_path / "runs")
    assert main(["train", "--train", str(PHRASEBANK), "--encoding", "latin-1", "--max-train-samples", "400",
                 "--max-eval-samples", "100", "--epochs", "1", "--method", "camel", "--runs-dir", runs,
                 "--run-id", "fpb", "--no-progress"]) == 0
    report = open_run("fpb", runs).read_json("report.json")
    # One short epoch: this checks the pipeline on real data, not quality (bench/ measures that).
    assert 0.0 < report["validation"]["accuracy"] <= 1.0 and report["selection"]["selected"]
    assert main(["eval", "fpb", "--data", str(other), "--runs-dir", runs]) == 0
    assert "accuracy" in capsys.readouterr().out
