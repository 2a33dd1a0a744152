"""CLI smoke tests: `python -m core groups | train | eval | runs` on a tiny model and toy data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_of_each_command_runs_as_a_module():
    for cmd in ([], ["groups"], ["train"], ["eval"], ["runs"]):
        out = subprocess.run([sys.executable, "-m", "core", *cmd, "--help"], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "usage: python -m core" in out.stdout


def test_groups_prints_the_partition(tiny_bert, capsys):
    assert main(["groups", "--model", str(tiny_bert), "--strategy", "module", "--params"]) == 0
    out = capsys.readouterr().out
    assert "layer.1.attention" in out and "bert.encoder.layer.1.attention.self.query.weight" in out


def test_groups_rules_file_reports_unmatched(tiny_bert, tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text("- {match: '.*attention.*', group: attn}\n", encoding="utf-8")
    assert main(["groups", "--model", str(tiny_bert), "--strategy", "rules", "--rules", str(rules), "--json"]) == 0
    names = [g["name"] for g in json.loads(capsys.readouterr().out)["groups"]]
    assert names[:2] == ["unmatched", "attn"] and "head" in names


def test_train_eval_and_runs(tiny_bert, sentiment_csv, tmp_path, capsys):
    runs = str(tmp_path / "runs")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name: '{tiny_bert}'}}\ntrain: {{epochs: 1, batch_size: 8}}\n", encoding="utf-8")
    code = main(["train", "--config", str(config), "--train", str(sentiment_csv), "--method", "groups",
                 "--select", "layer.1", "--runs-dir", runs, "--run-id", "cli-run", "--no-progress", "--lr", "0.01"])
    assert code == 0
    out = capsys.readouterr().out
    assert "run cli-run completed" in out and "macro_f1" in out
    assert main(["eval", "cli-run", "--data", str(sentiment_csv), "--runs-dir", runs, "--name", "again"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert (tmp_path / "runs/cli-run/eval/again.json").is_file()
    assert main(["runs", "--runs-dir", runs]) == 0
    assert "cli-run" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--train", "x.csv", "--lr", "fast"], "error: --lr (train.learning_rate): expected a number, got 'fast'"),
        (["train", "--train", "x.csv", "--method", "magic"], "error: --method (method.name): 'magic' is not one of"),
        (["train", "--train", "x.csv", "--run-id", "../up"], "error: --run-id (run_id): '../up' is not a valid run id"),
        (["eval", "nope", "--data", "x.csv"], "error: no run 'nope'"),
        (["train", "--config", "missing.yaml"], "error: config field 'config': file not found"),
        (["groups", "--model", "/no/such/folder"], "error: --model (model.name): model folder not found"),
        (["train"], "error: --train (data.train): no training data given"),
    ],
)
def test_bad_input_exits_2_with_a_located_message(tmp_path, capsys, argv, message):
    argv = [*argv, "--runs-dir", str(tmp_path)] if argv[0] in ("train", "eval") else argv
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # bad input leaves no half-made run behind


def test_print_config_shows_the_resolved_config(capsys):
    assert main(["train", "--train", "d.csv", "--method", "lora", "--lora-targets", "query,key", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["method"]["lora_targets"] == ["query", "key"] and cfg["data"]["train"] == "d.csv"


def test_score_prints_complexity_and_selection(tiny_bert, sentiment_csv, capsys):
    assert main(["score", "--model", str(tiny_bert), "--train", str(sentiment_csv), "--experts", "4", "--score-batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "task complexity" in out and "linear probe accuracy" in out and "selection: rule auto" in out
    assert "layer.1.expert.3" in out and "task head: always trained" in out


def test_eval_of_a_qa_run_on_another_file(tiny_bert, tmp_path, capsys):
    import json as _json

    rows = [{"question": "where did john go", "context": f"john visited paris . the movie was {w} .", "answer": "paris",
             "answer_start": 13} for w in ("good", "bad", "fine", "sad") * 3]
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(map(_json.dumps, rows)), encoding="utf-8")
    runs = str(tmp_path / "runs")
    assert main(["train", "--task", "qa", "--train", str(data), "--model", str(tiny_bert), "--method", "full", "--epochs", "1",
                 "--runs-dir", runs, "--run-id", "qa", "--no-progress", "--max-length", "32", "--stride", "8"]) == 0
    capsys.readouterr()
    assert main(["eval", "qa", "--data", str(data), "--runs-dir", runs]) == 0
    assert "exact_match" in capsys.readouterr().out
