"""Selective training end to end on a tiny in-process BERT: frozen parameters stay bit-identical, the
optimizer holds only trainable tensors, deltas reproduce logits, runs survive interruption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from core.config import RunConfig
from core.delta import load_run_model
from core.errors import DataError, RunError
from core.models import load_task_model
from core.runs import list_runs, open_run
from core.tasks import NerTask
from core.train import RunLogger, prepare, resume, train


def make_config(model, data, runs, task="classification", method="groups", run_id=None, **train_kw) -> RunConfig:
    train_cfg = {"epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "weight_decay": 0.1, "patience": 0, **train_kw}
    return RunConfig.from_dict({
        "data": {"task": task, "train": str(data), "max_length": 32, "stride": 4},
        "model": {"name": str(model)},
        "method": {"name": method, "select": ["layer.1"], "last_n": 1, "lora_targets": ["query", "value"], "lora_r": 2},
        "train": train_cfg,
        "runs_dir": str(runs),
        "run_id": run_id,
    })


def batch_logits(model, tokenizer_dir, texts=("the movie was very good", "john visited paris")):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    enc = tok(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**enc).logits


@pytest.mark.parametrize(("task", "method"), [("classification", "groups"), ("classification", "last_n"),
                                              ("classification", "head"), ("ner", "bitfit")])
def test_frozen_parameters_stay_bit_identical(tiny_bert, sentiment_csv, ner_conll, tmp_path, task, method):
    data = sentiment_csv if task == "classification" else ner_conll
    result = train(make_config(tiny_bert, data, tmp_path, task, method), progress=False)
    labels = result.report["labels"]
    base = dict(load_task_model(result.run.config().model, task, labels).named_parameters())
    trained_names = {n for n, p in result.model.named_parameters() if p.requires_grad}
    changed = 0
    for name, param in result.model.named_parameters():
        if name in trained_names:
            changed += not torch.equal(param, base[name])
        else:
            assert torch.equal(param, base[name]), f"frozen {name} changed"
    assert changed > 0, "nothing was trained"
    plan = result.report["method"]
    assert result.report["training"]["optimizer_params"] == plan["trainable"] == sum(
        p.numel() for n, p in result.model.named_parameters() if n in trained_names)
    assert 0 < result.report["training"]["train_peak_rss_mb"] <= result.report["training"]["peak_rss_mb"]
    if method == "bitfit":
        assert all(n.endswith(".bias") or n.startswith("classifier.") for n in trained_names)
    if method == "head":
        assert trained_names == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("method", ["groups", "lora", "full"])
def test_saved_delta_reproduces_logits_exactly(tiny_bert, sentiment_csv, tmp_path, method):
    result = train(make_config(tiny_bert, sentiment_csv, tmp_path, method=method, epochs=1), progress=False)
    expected = batch_logits(result.model, tiny_bert)
    reloaded = load_run_model(open_run(result.run.id, tmp_path))
    assert torch.equal(batch_logits(reloaded, tiny_bert), expected)
    delta_names = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(result.run.file("delta.safetensors")))
    assert delta_names == {n for n, p in result.model.named_parameters() if p.requires_grad}
    if method == "lora":
        assert any("lora_A" in n for n in delta_names) and not any("query.base_layer" in n for n in delta_names)


def test_validation_metric_in_report_is_the_best_checkpoint_metric(tiny_bert, ner_conll, tmp_path):
    # Regression: Trainer length-groups evaluation batches; metrics must still see the right order.
    result = train(make_config(tiny_bert, ner_conll, tmp_path, task="ner", epochs=3, patience=2), progress=False)
    report = result.report
    assert report["validation"]["entity_f1"] == pytest.approx(report["training"]["best_checkpoint_metric"])
    assert set(report["validation"]["entity_report"]) >= {"PER", "micro avg"}
    assert "O" in report["validation"]["token_report"]


def test_run_folder_holds_everything_a_ui_polls(tiny_bert, sentiment_csv, tmp_path):
    result = train(make_config(tiny_bert, sentiment_csv, tmp_path), progress=False)
    run = result.run
    for name in ("config.json", "labels.json", "data.json", "groups.json", "status.json", "metrics.jsonl",
                 "report.json", "delta.safetensors", "predictions/validation.jsonl"):
        assert run.file(name).is_file(), name
    assert not run.file("checkpoints").exists()  # removed on success: the delta is the product
    kinds = {m.get("kind") for m in run.metrics()}
    assert {"train", "eval"} <= kinds
    status = run.status()
    assert status["state"] == "completed" and "macro_f1" in status["headline"]
    assert [r["run_id"] for r in list_runs(tmp_path)] == [run.id]
    saved = run.config()
    assert saved.train.learning_rate == 1e-2 and saved.train.metric == "macro_f1"  # resolved, re-runnable
    report = run.read_json("report.json")
    assert report["validation"]["confusion_matrix"]["labels"] == ["neg", "pos"]


def train_interrupted(config: RunConfig, step: int, monkeypatch):
    """Train `config` until a KeyboardInterrupt at optimizer step `step` (as Ctrl-C would); the open run."""
    original = RunLogger.on_step_end

    def interrupt(self, args, state, control, **kw):
        if state.global_step == step:
            raise KeyboardInterrupt
        return original(self, args, state, control, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(RunLogger, "on_step_end", interrupt)
        with pytest.raises(KeyboardInterrupt):
            train(config, progress=False)
    return open_run(config.run_id, config.runs_dir)


@pytest.mark.parametrize("experts", [False, True], ids=["groups", "expert_slices"])
def test_interrupted_run_is_marked_and_resumes_from_its_checkpoint(tiny_bert, sentiment_csv, tmp_path, monkeypatch, experts):
    def config_for(run_id):
        config = make_config(tiny_bert, sentiment_csv, tmp_path, eval_steps=2, run_id=run_id)
        if experts:  # checkpoints then hold the trained slices as their own tensors
            config.groups.strategy, config.groups.options = "ffn_clusters", {"experts": 4}
            config.method.select = ["layer.1.expert.0", "layer.1.expert.3", "layer.0.expert.1"]
        return config

    uninterrupted = train(config_for("whole"), progress=False)
    run = train_interrupted(config_for("resumable"), 5, monkeypatch)
    assert run.status()["state"] == "interrupted"
    assert run.latest_checkpoint().endswith("checkpoint-4")
    # The checkpoint holds the trained tensors only (slices as their own tensors); the rest is the base.
    saved = set(load_file(Path(run.latest_checkpoint()) / "model.safetensors"))
    model = prepare(config_for("again")).model
    assert saved == {n for n, p in model.named_parameters() if p.requires_grad} and len(saved) < len(model.state_dict())
    assert any(n.endswith("weight_slice") for n in saved) == experts
    result = resume("resumable", str(tmp_path), progress=False)
    assert result.run.status()["state"] == "completed"
    assert any(m.get("event") == "resume" for m in run.metrics())
    # Resuming continues the same run: evaluations after the checkpoint and the tuned model are the
    # ones an uninterrupted run gives.
    def evals(r):
        return {m["step"]: m["eval_loss"] for m in r.metrics() if m.get("kind") == "eval" and m["step"] > 4}

    assert evals(run) and evals(run) == pytest.approx(evals(uninterrupted.run), abs=1e-6)
    assert torch.allclose(batch_logits(result.model, tiny_bert), batch_logits(uninterrupted.model, tiny_bert), atol=1e-6)
    with pytest.raises(RunError, match="is completed; only failed or interrupted"):
        resume("resumable", str(tmp_path), progress=False)


def test_resume_refuses_a_checkpoint_that_lacks_trained_tensors(tiny_bert, sentiment_csv, tmp_path, monkeypatch):
    run = train_interrupted(make_config(tiny_bert, sentiment_csv, tmp_path, eval_steps=2, run_id="tampered"), 3, monkeypatch)
    path = Path(run.latest_checkpoint()) / "model.safetensors"
    tensors = load_file(path)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, path)
    with pytest.raises(RunError, match=f"does not match this run's trained tensors: missing \\['{dropped}'\\]"):
        resume("tampered", str(tmp_path), progress=False)
    assert run.status()["state"] == "failed"


def test_failed_run_is_marked_with_its_error(tiny_bert, tmp_path):
    config = make_config(tiny_bert, tmp_path / "missing.csv", tmp_path, run_id="broken")
    with pytest.raises(DataError, match="file not found"):
        train(config, progress=False)
    status = open_run("broken", tmp_path).status()
    assert status["state"] == "failed" and "file not found" in status["error"]


def test_retuning_starts_from_the_parent_and_keeps_lineage(tiny_bert, sentiment_csv, tmp_path):
    parent = train(make_config(tiny_bert, sentiment_csv, tmp_path, method="lora", run_id="parent"), progress=False)
    config = make_config("minilm", sentiment_csv, tmp_path, method="groups", run_id="child", epochs=1)
    config.init_from = "parent"
    child = train(config, progress=False)
    saved = child.run.config()
    assert saved.init_from == "parent" and saved.model.name == str(tiny_bert)  # the parent's base model
    reloaded = load_run_model(child.run)
    assert torch.equal(batch_logits(reloaded, tiny_bert), batch_logits(child.model, tiny_bert))
    # What the child froze is the parent's tuned (LoRA-merged) model, not the base model.
    tuned = dict(load_run_model(parent.run, merge=True).named_parameters())
    frozen = [(n, p) for n, p in child.model.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(p, tuned[n]) for n, p in frozen)
    base = dict(load_task_model(saved.model, "classification", ["neg", "pos"]).named_parameters())
    assert not torch.equal(tuned["bert.encoder.layer.0.attention.self.query.weight"],
                           base["bert.encoder.layer.0.attention.self.query.weight"])


def test_ner_long_sentences_are_split_into_windows_and_reassembled(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    labels = ["O", "B-LOC", "B-PER"]
    tags = [labels[i % 3] for i in range(40)]
    examples = [{"tokens": ["john", "visited", "paris", "the"] * 10, "tags": tags}, {"tokens": ["mary"], "tags": ["B-PER"]}]
    task = NerTask(tok, labels, max_length=12, stride=4)
    enc = task.encode(examples)
    assert enc.sample_of.count(0) > 3  # the long sentence became several windows
    # Logits that make each window predict the gold tag at every word's first sub-token.
    width = max(len(w) for w in enc.word_ids)
    logits = np.zeros((len(enc.word_ids), width, len(labels)), dtype=np.float32)
    for f, (s, wids) in enumerate(zip(enc.sample_of, enc.word_ids)):
        for j, w in enumerate(wids):
            if w is not None:
                logits[f, j, labels.index(examples[s]["tags"][w])] = 1.0
    predictions = task.predict(examples, enc, logits)
    assert [p["tags"] for p in predictions] == [ex["tags"] for ex in examples]
    assert task.metrics(examples, predictions)["entity_f1"] == 1.0


def test_encoder_forgetting_is_measured_as_embedding_retention(tiny_bert, sentiment_csv, tmp_path):
    corpus = tmp_path / "general.txt"
    corpus.write_text("= title =\n" + "\n".join(f"the film was {w} and very good" for w in ("fine", "sad", "great") * 5), encoding="utf-8")
    config = make_config(tiny_bert, sentiment_csv, tmp_path, method="full")
    config.eval.forgetting_corpus = str(corpus)
    forgetting = train(config, progress=False).report["forgetting"]
    assert forgetting["measure"] == "embedding_cosine" and forgetting["lines"] == 15
    assert 0.0 < forgetting["mean_cosine"] < 1.0  # full tuning at lr 1e-2 moved the body
    head_only = make_config(tiny_bert, sentiment_csv, tmp_path, method="head")
    head_only.eval.forgetting_corpus = str(corpus)
    assert train(head_only, progress=False).report["forgetting"]["mean_cosine"] == pytest.approx(1.0)
    lora = make_config(tiny_bert, sentiment_csv, tmp_path, method="lora")  # a peft-wrapped body
    lora.eval.forgetting_corpus = str(corpus)
    assert 0.0 < train(lora, progress=False).report["forgetting"]["mean_cosine"] <= 1.0


def test_missing_forgetting_corpus_is_refused_before_any_work(tiny_bert, sentiment_csv, tmp_path):
    from core.errors import ConfigError

    config = make_config(tiny_bert, sentiment_csv, tmp_path / "runs")
    config.eval.forgetting_corpus = str(tmp_path / "nowhere.txt")
    with pytest.raises(ConfigError, match="eval.forgetting_corpus': file not found"):
        train(config, progress=False)
    assert not (tmp_path / "runs").exists()


def test_training_flops_are_counted_and_backward_stops_at_the_lowest_trained_group(tiny_bert, sentiment_csv, tmp_path):
    training = {}
    for method in ("full", "last_n", "head"):
        cfg = make_config(tiny_bert, sentiment_csv, tmp_path, method=method, run_id=method, epochs=1)
        training[method] = train(cfg, progress=False).report["training"]
    flops = {m: t["train_flops_per_token"] for m, t in training.items()}
    assert flops["full"] > flops["last_n"] > flops["head"] > 0  # less of the body in backward, fewer FLOPs
    for t in training.values():
        assert 0 < t["forward_backward_seconds"] <= t["train_seconds"] and t["achieved_gflops"] > 0


def attention_kernels(model, batch) -> set[str]:
    from torch.profiler import profile

    with profile() as prof:
        model(**batch).logits.sum().backward()
    return {e.key for e in prof.key_averages() if "attention" in e.key}


def test_attention_dropout_zero_reaches_every_attention_module_and_the_fused_kernel(tiny_bert, sentiment_csv, tmp_path):
    """train.attention_dropout sets the dropout of every attention module of the run's model; at 0,
    training runs torch's fused CPU attention (the model's own 0.1 forces the unfused one), and a
    training-mode forward equals an evaluation one once the other dropouts are off too."""
    cfg = make_config(tiny_bert, sentiment_csv, tmp_path, method="full", attention_dropout=0.0)
    model = prepare(cfg).model
    attention = [m for m in model.modules() if type(m).__name__ == "BertSelfAttention"]
    assert len(attention) == 2 and all(m.dropout.p == 0.0 for m in attention)
    from transformers import AutoTokenizer

    batch = dict(AutoTokenizer.from_pretrained(tiny_bert)(["the movie was very good", "bad"], return_tensors="pt", padding=True))
    model.train()
    assert any("flash_attention" in k for k in attention_kernels(model, batch))
    default = prepare(make_config(tiny_bert, sentiment_csv, tmp_path, method="full")).model.train()
    assert all(m.dropout.p == 0.1 for m in default.modules() if type(m).__name__ == "BertSelfAttention")
    kernels = attention_kernels(default, batch)
    assert "aten::_scaled_dot_product_attention_math" in kernels and not any("flash" in k for k in kernels)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        trained_mode = model(**batch).logits
        assert torch.equal(trained_mode, model.eval()(**batch).logits)


def test_attention_dropout_is_validated_and_refused_where_a_model_has_none(tiny_llama_config):
    from transformers import LlamaForCausalLM

    from core.errors import ConfigError
    from core.models import set_attention_dropout

    with pytest.raises(ConfigError, match=r"train\.attention_dropout.*\[0, 1\)"):
        RunConfig.from_dict({"data": {"train": "x.csv"}, "train": {"attention_dropout": 1.0}}).validate()
    llama = LlamaForCausalLM(tiny_llama_config)
    assert set_attention_dropout(llama, 0.25) == 2
    assert all(m.attention_dropout == 0.25 for m in llama.modules() if type(m).__name__ == "LlamaAttention")
    with pytest.raises(ConfigError, match="found no attention module of Linear"):
        set_attention_dropout(torch.nn.Linear(2, 2), 0.0)
