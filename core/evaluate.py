"""Metrics, computed locally with scikit-learn and seqeval (no Hub metric scripts: they fail offline).

Classification: sklearn's classification report, accuracy, macro / micro / weighted F1, confusion matrix.
NER: seqeval's entity-level report (the honest NER metric: an entity counts only when its whole span
and type are right; CoNLL `conlleval` rules) as the headline, with the token-level report beside it.
"""

from __future__ import annotations

from typing import Any

from seqeval.metrics import classification_report as entity_report
from seqeval.metrics import f1_score as entity_f1
from seqeval.metrics import precision_score as entity_precision
from seqeval.metrics import recall_score as entity_recall
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
)


def classification_metrics(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict[str, Any]:
    """Scalars (accuracy and F1s) plus the full report and confusion matrix (rows: true, cols: predicted)."""
    return {
        **classification_scalars(y_true, y_pred, labels),
        "n": len(y_true),
        "report": classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0),
        "confusion_matrix": {"labels": labels, "matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist()},
    }


def classification_scalars(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(y_true, y_pred, labels=labels, average="micro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
    }


def ner_metrics(true_tags: list[list[str]], pred_tags: list[list[str]], labels: list[str]) -> dict[str, Any]:
    """Entity-level (headline) and token-level reports for tag sequences."""
    flat_true = [t for seq in true_tags for t in seq]
    flat_pred = [t for seq in pred_tags for t in seq]
    return {
        **ner_scalars(true_tags, pred_tags),
        "n": len(true_tags),
        "entity_report": _plain(entity_report(true_tags, pred_tags, output_dict=True, zero_division=0)),
        "token_report": classification_report(flat_true, flat_pred, labels=labels, output_dict=True, zero_division=0),
    }


def ner_scalars(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict[str, float]:
    flat_true = [t for seq in true_tags for t in seq]
    flat_pred = [t for seq in pred_tags for t in seq]
    return {
        "entity_f1": float(entity_f1(true_tags, pred_tags, zero_division=0)),
        "entity_precision": float(entity_precision(true_tags, pred_tags, zero_division=0)),
        "entity_recall": float(entity_recall(true_tags, pred_tags, zero_division=0)),
        "token_accuracy": float(accuracy_score(flat_true, flat_pred)) if flat_true else 0.0,
    }


def _plain(report: dict) -> dict:
    """seqeval returns numpy numbers: make the report JSON-ready."""
    return {k: {m: (int(v) if m == "support" else float(v)) for m, v in d.items()} for k, d in report.items()}


def format_report(section: dict[str, Any]) -> str:
    """A per-label table (like sklearn's text report) from a classification or NER metrics dict."""
    from core.groups import format_table

    report = section.get("entity_report") or section.get("report") or {}
    scalars = [f"{k} {v:.4f}" for k, v in section.items() if isinstance(v, float)]
    if not report:  # QA, dialogue: no per-label table
        return "  ".join(scalars)
    rows = [("label", "precision", "recall", "f1", "support")]
    for label, m in report.items():
        if isinstance(m, dict):
            rows.append((label, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1-score']:.4f}", str(int(m["support"]))))
    return format_table(rows) + "\n" + "  ".join(scalars)


def evaluate_run(run, data_path: str, overrides: dict[str, Any] | None = None, name: str | None = None,
                 batch_size: int = 64) -> dict[str, Any]:
    """Evaluate a completed run's tuned model on another data file (e.g. a held-out test set).

    The file is read with the run's data options (format, columns, encoding), which `overrides` can
    change. Labels must be ones the run was trained on. The result goes to `eval/<name>.json` in the
    run, with per-example predictions beside it.
    """
    import dataclasses
    import re
    from pathlib import Path

    from core.data import check_labels, read_examples
    from core.delta import load_run_model
    from core.models import load_tokenizer
    from core.tasks import evaluate_task, prediction_records, task_for

    config = run.config()
    data_cfg = dataclasses.replace(config.data, **(overrides or {}))
    examples = read_examples(data_path, data_cfg)
    labels = run.labels()
    check_labels(data_cfg.task, examples, labels, data_path)
    model = load_run_model(run)
    task = task_for(data_cfg, load_tokenizer(config.model), labels, config.eval)
    enc = task.encode(examples)
    metrics, predictions = evaluate_task(task, model, examples, enc, batch_size)
    result = {"run_id": run.id, "data": str(data_path), "metric": config.metric, **metrics}
    name = name or re.sub(r"[^A-Za-z0-9._-]+", "-", Path(data_path).stem).strip("-.") or "eval"
    run.write_json(f"eval/{name}.json", result)
    run.write_jsonl(f"eval/{name}.predictions.jsonl", prediction_records(examples, predictions))
    return result


# ---- extractive QA (SQuAD v1.1 evaluation, written here: the Hub metric script fails offline) ----
def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a/an/the), single spaces."""
    import re
    import string

    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_f1(prediction: str, gold: str) -> float:
    from collections import Counter

    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(predictions: list[str], golds: list[list[str]]) -> dict[str, Any]:
    """Exact match and F1 in percent, each the best over a question's gold answers (as SQuAD does)."""
    em = [max(float(normalize_answer(p) == normalize_answer(g)) for g in gs) for p, gs in zip(predictions, golds)]
    f1 = [max(answer_f1(p, g) for g in gs) for p, gs in zip(predictions, golds)]
    n = max(len(predictions), 1)
    return {"exact_match": 100.0 * sum(em) / n, "f1": 100.0 * sum(f1) / n, "n": len(predictions)}


# ---- language models: response loss, forgetting, generation scores ------------------------------
LOGITS_PER_PASS = 2**25  # vocabulary x positions per forward pass: 128 MB of fp32 logits


def language_model_loss(model, rows: list[dict], collate, batch_size: int = 16) -> tuple[float, int]:
    """Mean next-token loss over every labelled token (token-weighted, unlike a mean of batch means),
    and the number of those tokens. Passes hold at most `batch_size` rows and LOGITS_PER_PASS logits
    (a 49k vocabulary makes each position's logits larger than the model's activations)."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    longest = max((len(r["input_ids"]) for r in rows), default=1)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1
    batch_size = max(1, min(batch_size, LOGITS_PER_PASS // (longest * vocab)))
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]  # (batch, seq-1): token t is predicted at position t-1
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="sum")
            total += float(nll)
            count += int((labels != -100).sum())
    model.train(was_training)
    return (total / count if count else float("nan")), count


def corpus_lines(path: str, limit: int) -> list[str]:
    from core.errors import DataError

    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("=")]  # WikiText headings
    except FileNotFoundError:
        raise DataError(path, "forgetting corpus not found (eval.forgetting_corpus)") from None
    return lines[:limit]


def corpus_perplexity(model, tokenizer, path: str, max_tokens: int = 8192, window: int = 256) -> dict[str, Any]:
    """Perplexity of a causal LM on the first `max_tokens` tokens of a general text, in windows."""
    import math

    ids: list[int] = []
    for line in corpus_lines(path, 100_000):
        ids.extend(tokenizer(line + "\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    rows = [{"input_ids": ids[i:i + window], "attention_mask": [1] * len(ids[i:i + window]), "labels": ids[i:i + window]}
            for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]
    from transformers import DataCollatorForSeq2Seq

    loss, tokens = language_model_loss(model, rows, DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True), 8)
    return {"perplexity": math.exp(loss), "tokens": tokens}


def sentence_embeddings(model, tokenizer, lines: list[str], batch_size: int = 32):
    """Mean-pooled last hidden states of the pretrained body, one unit vector per line."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # unwrap peft
    body = getattr(inner, getattr(inner, "base_model_prefix", ""), inner)
    out = []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(lines), batch_size):
            enc = tokenizer(lines[start:start + batch_size], truncation=True, max_length=128, padding=True, return_tensors="pt")
            hidden = body(**enc).last_hidden_state  # (batch, seq, H)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    model.train(was_training)
    return torch.cat(out).numpy()


def generation_scores(generated: list[str], references: list[str], metrics: tuple[str, ...]) -> dict[str, float]:
    """ROUGE (rouge-score) and chrF / BLEU (sacrebleu) of generated texts against references."""
    out: dict[str, float] = {}
    if "rouge" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        scores = [scorer.score(ref, gen) for gen, ref in zip(generated, references)]
        for key in ("rouge1", "rouge2", "rougeL"):
            out[key] = 100.0 * sum(s[key].fmeasure for s in scores) / len(scores)
    if "chrf" in metrics or "bleu" in metrics:
        import sacrebleu

        if "chrf" in metrics:
            out["chrf"] = float(sacrebleu.corpus_chrf(generated, [references]).score)
        if "bleu" in metrics:
            out["bleu"] = float(sacrebleu.corpus_bleu(generated, [references]).score)
    return out
