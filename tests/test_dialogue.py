"""Dialogue / generative tuning of a causal LM: chat template, prompt masking, generation API,
forgetting, ROUGE/chrF, and the run pipeline on a tiny in-process Llama."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import make_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.config import DataConfig
from core.data import read_examples
from core.delta import load_run_model
from core.errors import DataError
from core.evaluate import generation_scores
from core.runs import open_run
from core.tasks import DialogueTask, generate_reply
from core.train import train

CONVERSATIONS = [
    [{"role": "user", "content": "hi cancel my order please"}, {"role": "assistant", "content": "hello your order is done"}],
    [{"role": "system", "content": "short"}, {"role": "user", "content": "refund please"},
     {"role": "assistant", "content": "how can i help you ?"}, {"role": "user", "content": "refund the order"},
     {"role": "assistant", "content": "your refund is done thanks"}],
]


def test_chat_template_applied_and_prompt_tokens_masked(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    task = DialogueTask(tok, [], max_length=128)
    ids, labels = task.render(CONVERSATIONS[1])
    text = tok.decode(ids)
    assert text.startswith("<|im_start|> system") and text.count("<|im_start|>") == 5
    learned = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
    # Both assistant turns (with their end-of-turn marker) are learned; nothing the user said is.
    assert learned.split() == "how can i help you ? <|im_end|> \n your refund is done thanks <|im_end|> \n".split()
    assert all(lab == -100 for t, lab in zip(ids, labels) if tok.convert_ids_to_tokens(t) in ("please", "order", "system", "short"))


def test_too_long_conversations_are_cut_and_dropped_when_nothing_is_left(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    task = DialogueTask(tok, [], max_length=8)
    enc = task.encode([{"messages": CONVERSATIONS[0]}, {"messages": CONVERSATIONS[1]}])
    assert task.dropped == 2 and len(enc.dataset) == 0
    task = DialogueTask(tok, [], max_length=14)
    enc = task.encode([{"messages": CONVERSATIONS[0]}])
    assert len(enc.dataset[0]["input_ids"]) == 14 and any(lab != -100 for lab in enc.dataset[0]["labels"])


def test_dialogue_files_from_messages_or_columns(tmp_path):
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("\n".join(json.dumps({"messages": c}) for c in CONVERSATIONS), encoding="utf-8")
    assert [len(e["messages"]) for e in read_examples(jsonl, DataConfig(task="dialogue"))] == [2, 5]
    csv = tmp_path / "pairs.csv"
    csv.write_text('instruction,intent,response\n"cancel my order",x,"your order is done"\n', encoding="utf-8")
    ex = read_examples(csv, DataConfig(task="dialogue", system_prompt="short"))[0]
    assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}', "line 1, column 'messages': the conversation must end with an assistant turn"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "message 1: role must be one of system, user, assistant"),
        ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}', "message 1: empty content"),
        ('{"messages": []}', "must be a non-empty list"),
        ('{"prompt": "hi", "reply": "x"}', "cannot tell which column is the response"),
    ],
)
def test_malformed_dialogue_input(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_examples(path, DataConfig(task="dialogue"))


def test_generation_streams_and_stops_at_end_of_turn(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    pieces = list(generate_reply(model, tok, [{"role": "user", "content": "hi"}], max_new_tokens=5, temperature=0.0))
    text = "".join(pieces)
    assert "<|im_end|>" not in text and len(tok(text, add_special_tokens=False)["input_ids"]) <= 5
    sampled = "".join(generate_reply(model, tok, [{"role": "user", "content": "hi"}], max_new_tokens=5, temperature=0.8, top_p=0.9))
    assert isinstance(sampled, str)


def test_generation_scores_rouge_and_chrf():
    scores = generation_scores(["the cat sat on the mat"], ["the cat sat on the mat"], ("rouge", "chrf", "bleu"))
    assert scores["rougeL"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0) and scores["bleu"] > 99
    low = generation_scores(["bye"], ["the cat sat on the mat"], ("rouge", "chrf"))
    assert low["rougeL"] == 0.0 and low["chrf"] < 20


@pytest.mark.parametrize("method", ["camel", "full"])
def test_dialogue_run_reports_perplexity_samples_and_forgetting(tiny_llama, tmp_path, method):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": CONVERSATIONS[i % 2]} for i in range(24)]
    data.write_text("\n".join(map(json.dumps, rows)), encoding="utf-8")
    corpus = tmp_path / "general.txt"
    corpus.write_text("= heading =\n" + "\n".join(["the cat sat on the mat ."] * 50), encoding="utf-8")
    config = make_config(tiny_llama, data, tmp_path, task="dialogue", method=method, run_id=f"chat-{method}")
    config.data.max_length = 64
    config.eval.forgetting_corpus = str(corpus)
    config.eval.forgetting_tokens = 200
    config.eval.generation_samples = 2
    config.eval.max_new_tokens = 4
    config.eval.generation_metrics = ["rouge", "chrf"]
    result = train(config, progress=False)
    report = result.report
    val = report["validation"]
    assert val["perplexity"] == pytest.approx(float(torch.tensor(val["loss"]).exp()), rel=1e-5)
    assert len(val["samples"]) == 2 and {"prompt", "reference", "generated"} <= set(val["samples"][0])
    assert {"rougeL", "chrf"} <= set(val["generation"])
    forgetting = report["forgetting"]
    assert forgetting["measure"] == "perplexity" and forgetting["perplexity_before"] > 0 and forgetting["tokens"] > 100
    assert report["headline"]["perplexity"] == val["perplexity"]
    # Base + delta reproduces the tuned decoder exactly.
    ids = torch.tensor([[2, 5, 4, 10, 3]])
    reloaded = load_run_model(open_run(f"chat-{method}", tmp_path))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)


@pytest.mark.parametrize(("name", "columns", "metrics"), [
    ("summarisation.jsonl", {}, ["rouge"]),
    ("translation.csv", {"prompt_column": "source", "response_column": "target"}, ["chrf", "bleu"]),
])
def test_summarisation_and_translation_as_instruction_response(tiny_llama, tmp_path, name, columns, metrics):
    from pathlib import Path

    data = Path(__file__).parent / "data" / name
    config = make_config(tiny_llama, data, tmp_path, task="dialogue", method="full", run_id="gen")
    for key, value in columns.items():
        setattr(config.data, key, value)
    config.data.validation_fraction = 0.34
    config.eval.generation_metrics = metrics
    config.eval.generation_samples = 2
    config.eval.max_new_tokens = 6
    report = train(config, progress=False).report
    scores = report["validation"]["generation"]
    assert set(scores) == ({"rouge1", "rouge2", "rougeL"} if metrics == ["rouge"] else {"chrf", "bleu"})
    assert all(0.0 <= v <= 100.0 for v in scores.values())


def test_language_model_loss_is_the_same_in_smaller_passes(tiny_llama, monkeypatch):
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, LlamaForCausalLM

    import core.evaluate as ev

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = LlamaForCausalLM.from_pretrained(tiny_llama)
    texts = ["hello there how are you", "the order is late", "i want a refund please now", "thanks"]
    rows = []
    for i, t in enumerate(texts):
        ids = tok(t)["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * min(i, len(ids) - 1) + ids[min(i, len(ids) - 1):]})
    collate = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)
    whole = ev.language_model_loss(model, rows, collate, batch_size=4)
    monkeypatch.setattr(ev, "LOGITS_PER_PASS", 1)  # one row per pass
    assert ev.language_model_loss(model, rows, collate, batch_size=4) == (pytest.approx(whole[0], rel=1e-5), whole[1])
