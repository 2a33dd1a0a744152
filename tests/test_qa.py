"""Extractive QA: SQuAD-format loading and offset checks, windows over long contexts mapped back to
characters, SQuAD EM/F1, and a QA run end to end on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_train import make_config
from transformers import AutoTokenizer

from core.config import DataConfig
from core.data import load_task_data, read_examples
from core.errors import DataError
from core.evaluate import normalize_answer, qa_metrics
from core.tasks import QaTask
from core.train import train

CONTEXT = "john visited paris . mary works at acme corp in london . " * 6 + "the film was excellent ."


def squad(tmp_path, contexts: list[tuple[str, str, list[tuple[str, str, int]]]]):
    data = {"version": "1.1", "data": [
        {"title": title, "paragraphs": [{"context": ctx, "qas": [
            {"id": f"{title}-{i}", "question": q, "answers": [{"text": a, "answer_start": s}]} for i, (q, a, s) in enumerate(qas)]}]}
        for title, ctx, qas in contexts]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("pred", "golds", "em", "f1"),
    [
        ("The Denver Broncos", ["Denver Broncos"], 100.0, 100.0),  # articles and case do not count
        ("Denver Broncos!", ["denver broncos"], 100.0, 100.0),  # nor punctuation
        ("Broncos", ["Denver Broncos"], 0.0, 200 / 3),  # partial overlap: P 1, R 1/2
        ("Carolina", ["Denver Broncos", "Carolina Panthers", "Carolina"], 100.0, 100.0),  # best of several golds
        ("", ["x"], 0.0, 0.0),
    ],
)
def test_squad_exact_match_and_f1(pred, golds, em, f1):
    m = qa_metrics([pred], [golds])
    assert m["exact_match"] == pytest.approx(em) and m["f1"] == pytest.approx(f1)
    assert normalize_answer("  The  cat's   hat ") == "cats hat"


def test_long_context_windows_map_spans_back_to_characters(tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    start = CONTEXT.index("excellent")
    examples = [{"question": "how was the film", "context": CONTEXT, "answers": [{"text": "excellent", "answer_start": start}]}]
    task = QaTask(tok, [], max_length=24, stride=8)
    enc = task.encode(examples)
    assert len(enc.sample_of) > 3  # the context needed several windows
    ds = enc.dataset
    # Exactly the windows holding the answer point at it; the rest point at [CLS] (0).
    holding = [f for f in range(len(ds)) if ds[f]["start_positions"] > 0]
    assert holding and all(ds[f]["end_positions"] >= ds[f]["start_positions"] for f in holding)
    # Logits that favour the labelled span in each window decode to the exact characters.
    width = max(len(o) for o in enc.word_ids)
    logits = np.full((len(ds), width, 2), -5.0, dtype=np.float32)
    for f in holding:
        logits[f, ds[f]["start_positions"], 0] = logits[f, ds[f]["end_positions"], 1] = 5.0
    pred = task.predict(examples, enc, logits)[0]
    assert (pred["answer"], pred["start"], pred["end"]) == ("excellent", start, start + len("excellent"))


def test_squad_json_loads_and_splits_by_article(tmp_path):
    ctx = "paris is in france ."
    path = squad(tmp_path, [(f"article{i}", ctx, [("where is paris", "france", 12), ("what is in france", "paris", 0)])
                            for i in range(6)])
    data = load_task_data(DataConfig(task="qa", train=str(path), validation_fraction=0.34))
    train_titles = {e["title"] for e in data.train}
    val_titles = {e["title"] for e in data.validation}
    assert train_titles and val_titles and not train_titles & val_titles
    assert data.labels == [] and len(data.train) + len(data.validation) == 12


def test_wrong_offset_is_moved_to_the_nearest_occurrence_and_counted(tmp_path):
    path = squad(tmp_path, [("a", "the cat sat . the cat ran .", [("who ran", "cat", 17)]),
                            ("b", "x y", [("q", "y", 2)])])
    ex = read_examples(path, DataConfig(task="qa"))[0]
    assert ex["answers"][0]["answer_start"] == 18 and ex["fixed"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("q.jsonl", '{"question": "q", "context": "abc", "answer": "zzz", "answer_start": 0}\n',
         "line 1, column 'answer': question 1: answer 'zzz' does not occur in its context"),
        ("q.jsonl", '{"question": "", "context": "abc", "answer": "a", "answer_start": 0}\n', "empty question"),
        ("q.csv", "question,context,answer,answer_start\nq,abc,b,one\n", "line 2, column 'answer': question 2: answer start 'one' is not a number"),
        ("q.csv", "question,passage\nq,abc\n", "cannot tell which column is the answer"),
        ("q.jsonl", '{"question": "q", "context": "abc", "answers": {"text": ["a", "b"], "answer_start": [0]}}\n', "2 answer texts but 1 answer starts"),
    ],
)
def test_malformed_qa_input(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_examples(path, DataConfig(task="qa"))


@pytest.mark.parametrize("method", ["lora", "camel"])
def test_qa_run_end_to_end_reports_em_f1_and_predictions(tiny_bert, tmp_path, method):
    contexts = [(f"t{i}", f"{name} visited {city} . the movie was good .", [(f"where did {name} go", city, len(name) + 9)])
                for i, (name, city) in enumerate([("john", "paris"), ("mary", "london")] * 6)]
    path = squad(tmp_path, contexts)
    config = make_config(tiny_bert, path, tmp_path, task="qa", method=method, run_id="qa")
    config.data.validation_fraction = 0.25
    result = train(config, progress=False)
    report = result.report
    assert {"exact_match", "f1", "n"} <= set(report["validation"]) and report["headline"]["f1"] == report["validation"]["f1"]
    from core.tasks import answer_question

    answer = answer_question(result.model, AutoTokenizer.from_pretrained(tiny_bert), "where did mary go", CONTEXT, max_length=24, stride=8)
    assert CONTEXT[answer["start"]:answer["end"]] == answer["answer"] and answer["answer"]
    with pytest.raises(Exception, match="question and a context"):
        answer_question(result.model, AutoTokenizer.from_pretrained(tiny_bert), " ", CONTEXT)
    preds = result.run.file("predictions/validation.jsonl").read_text().splitlines()
    first = json.loads(preds[0])
    assert {"id", "question", "answers", "predicted"} <= set(first) and "answer" in first["predicted"]
