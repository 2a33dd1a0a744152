"""Data loading: every supported format, splits and label maps, and located errors for bad input."""

from __future__ import annotations

import json
import random

import pytest
from conftest import SHARED_DATA

from core.config import DataConfig
from core.data import build_labels, load_task_data, read_examples, split_examples
from core.errors import DataError


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def write(tmp_path, name: str, text: str, encoding: str = "utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("a.csv", 'text,label\n"good, really",pos\nbad,neg\n'),
        ("a.tsv", "sentence\tlabel\ngood, really\tpos\nbad\tneg\n"),
        ("a.json", json.dumps([{"text": "good, really", "label": "pos"}, {"text": "bad", "label": "neg"}])),
        ("a.json", json.dumps({"data": [{"text": "good, really", "label": "pos"}, {"text": "bad", "label": "neg"}]})),
        ("a.jsonl", '{"text": "good, really", "label": "pos"}\n\n{"text": "bad", "label": "neg"}\n'),
        ("a.txt", "good, really@pos\nbad@neg\n"),
    ],
)
def test_classification_formats_read_the_same_examples(tmp_path, name, text):
    examples = read_examples(write(tmp_path, name, text), cfg())
    assert [(e["text"], e["label"]) for e in examples] == [("good, really", "pos"), ("bad", "neg")]


def test_csv_columns_are_auto_detected_and_can_be_named(tmp_path):
    path = write(tmp_path, "s.csv", "id,instruction,intent,category\n1,cancel my order,cancel_order,ORDER\n")
    ex = read_examples(path, cfg())[0]
    assert (ex["text"], ex["label"]) == ("cancel my order", "cancel_order")
    ex = read_examples(path, cfg(label_column="category"))[0]
    assert ex["label"] == "ORDER"


def test_csv_quoted_multiline_field_reports_its_first_line(tmp_path):
    path = write(tmp_path, "m.csv", 'text,label\n"two\nlines",a\n"",b\n')
    with pytest.raises(DataError, match=r"line 4, column 'text': empty text"):
        read_examples(path, cfg())


def test_phrasebank_at_format_latin1_splits_on_last_at(tmp_path):
    path = write(tmp_path, "Sentences.txt", "Nokia @ Espoo rose 5 % ; caf\xe9 @positive\nflat@neutral\n", encoding="latin-1")
    examples = read_examples(path, cfg(encoding="latin-1"))
    assert examples[0]["text"] == "Nokia @ Espoo rose 5 % ; caf\xe9"
    assert examples[0]["label"] == "positive"


def test_conll_reads_sentences_and_skips_docstart(tmp_path):
    text = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n"
    examples = read_examples(write(tmp_path, "d.txt", text), cfg(task="ner"))
    assert [(e["tokens"], e["tags"], e["line"]) for e in examples] == [
        (["EU", "rejects"], ["B-ORG", "O"], 3),
        (["Peter"], ["B-PER"], 6),
    ]


def test_conll_token_and_tag_columns_can_be_chosen(tmp_path):
    examples = read_examples(write(tmp_path, "d.conll", "EU NNP B-NP B-ORG\n"), cfg(task="ner", tag_column="2"))
    assert examples[0]["tags"] == ["B-NP"]


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_ner_json_formats(tmp_path, fmt):
    recs = [{"words": ["John", "lives"], "ner_tags": ["B-PER", "O"]}, {"words": ["Paris"], "ner_tags": ["B-LOC"]}]
    text = json.dumps(recs, indent=1) if fmt == "json" else "\n".join(map(json.dumps, recs))
    examples = read_examples(write(tmp_path, f"n.{fmt}", text), cfg(task="ner"))
    assert [e["tags"] for e in examples] == [["B-PER", "O"], ["B-LOC"]]


# Each malformed input: (task, file name, content, options, expected message fragment).
MALFORMED = [
    ("classification", "a.csv", "txt,lbl,x\nhi,a,1\n", {}, "cannot tell which column is the text; columns are: txt, lbl, x"),
    ("classification", "a.csv", "text,label\nhi,a\n", {"text_column": "body"}, "text column 'body' (data.text_column) not found"),
    ("classification", "a.csv", "text,label\nhi,a\n  ,b\n", {}, "line 3, column 'text': empty text"),
    ("classification", "a.csv", "text,label\nhi,\n", {}, "line 2, column 'label': empty label"),
    ("classification", "a.csv", "text,label\nhi,a,extra\n", {}, "line 2: row has 3 fields but the header has 2"),
    ("classification", "a.txt", "good@pos\nno separator here\n", {}, "line 2: expected 'text@label'"),
    ("classification", "a.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n', {}, "line 2, column 24: not valid JSON"),
    ("classification", "a.jsonl", '["a", "x"]\n', {}, "line 1: each line must be a JSON object"),
    ("classification", "a.json", '[\n {"text": "a", "label": "x"},\n {"text": "b"}\n]', {}, "line 3: record has no 'label' field"),
    ("classification", "a.json", '{"text": "a"', {}, "line 1, column 13: not valid JSON"),
    ("classification", "a.xml", "<a/>", {}, "cannot tell the format from the name"),
    ("classification", "a.csv", "", {}, "file is empty"),
    ("classification", "a.csv", "text,label\ncaf\xe9,a\n", {"_latin1": True}, "line 2, column 4: byte 0xe9 is not valid utf-8. If the file is Latin-1"),
    ("ner", "a.txt", "EU B-ORG\nrejects\n", {}, "line 2: expected at least 2 whitespace-separated columns"),
    ("ner", "a.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', {}, "line 1, column 'tags': 2 tokens but 1 tags"),
    ("ner", "a.jsonl", '{"tokens": ["a"], "tags": [0]}\n', {}, "tags must be strings such as 'B-PER'"),
    ("ner", "a.jsonl", '{"text": "a b"}\n', {}, "record has no token list"),
    ("ner", "a.csv", "a,b\n", {}, "format 'csv' is not supported for NER"),
]


@pytest.mark.parametrize(("task", "name", "content", "options", "message"), MALFORMED, ids=[m[4][:40] for m in MALFORMED])
def test_malformed_input_names_file_line_and_problem(tmp_path, task, name, content, options, message):
    options = dict(options)
    encoding = "latin-1" if options.pop("_latin1", False) else "utf-8"
    path = write(tmp_path, name, content, encoding=encoding)
    with pytest.raises(DataError) as err:
        read_examples(path, cfg(task=task, **options))
    assert str(err.value).startswith(str(path))
    assert message in str(err.value)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_examples(tmp_path / "nope.csv", cfg())


def test_unknown_label_in_validation_names_file_and_line(tmp_path):
    train = write(tmp_path, "train.csv", "text,label\na,x\nb,y\nc,x\n")
    val = write(tmp_path, "val.csv", "text,label\na,x\nb,z\n")
    with pytest.raises(DataError, match=r"val.csv, line 3: label 'z' does not occur in the training data \(known: x, y\)"):
        load_task_data(cfg(train=str(train), validation=str(val)))


def test_single_label_training_data_is_refused(tmp_path):
    train = write(tmp_path, "train.csv", "text,label\na,x\nb,x\nc,x\n")
    with pytest.raises(DataError, match="only one label"):
        load_task_data(cfg(train=str(train)))


def test_split_is_seeded_and_stratified(tmp_path):
    rows = [(f"t{i}", "rare" if i % 10 == 0 else "common") for i in range(100)]
    path = write(tmp_path, "d.csv", "text,label\n" + "\n".join(f"{t},{lab}" for t, lab in rows))
    a = load_task_data(cfg(train=str(path), validation_fraction=0.2, test_fraction=0.1), seed=1)
    b = load_task_data(cfg(train=str(path), validation_fraction=0.2, test_fraction=0.1), seed=1)
    assert [e["text"] for e in a.validation] == [e["text"] for e in b.validation]
    assert sum(e["label"] == "rare" for e in a.validation) == 2  # 20 % of the 10 rare examples
    assert len(a.train) + len(a.validation) + len(a.test) == 100
    texts = [e["text"] for s in (a.train, a.validation, a.test) for e in s]
    assert len(set(texts)) == 100  # disjoint splits
    c = load_task_data(cfg(train=str(path), validation_fraction=0.2), seed=2)
    assert [e["text"] for e in a.validation] != [e["text"] for e in c.validation]


def test_split_of_too_little_data_is_an_error():
    with pytest.raises(DataError, match="too few to split"):
        split_examples([{"text": "a", "label": "x"}], 0.5, "classification", random.Random(0), "d.csv")


def test_label_order_is_stable_and_readable():
    ner = [{"tokens": ["a"] * 5, "tags": ["I-PER", "B-LOC", "O", "B-PER", "I-LOC"]}]
    assert build_labels("ner", ner, "x") == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    nums = [{"label": v} for v in ("10", "2", "1")]
    assert build_labels("classification", nums, "x") == ["1", "2", "10"]


def test_max_samples_take_a_seeded_subset(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\n" + "\n".join(f"t{i},{'ab'[i % 2]}" for i in range(50)))
    data = load_task_data(cfg(train=str(path), max_train_samples=10, max_eval_samples=3), seed=0)
    assert (len(data.train), len(data.validation)) == (10, 3)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")
def test_real_phrasebank_and_conll_load():
    fpb = SHARED_DATA / "sentiment/financial_phrasebank/Sentences_AllAgree.txt"
    data = load_task_data(cfg(train=str(fpb), encoding="latin-1", test_fraction=0.1))
    assert data.labels == ["negative", "neutral", "positive"]
    assert len(data.train) + len(data.validation) + len(data.test) == 2264
    conll = read_examples(SHARED_DATA / "ner/conll2003/dev.txt", cfg(task="ner"))
    assert len(conll) == 3250
    assert sum(len(e["tokens"]) for e in conll) == 51362
