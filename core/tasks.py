"""Tasks: how examples become model inputs, and how model outputs become predictions and metrics.

One class per task with the same three steps, so training, evaluation and the UI treat them alike:
    encode(examples)              -> Encoded (a `datasets.Dataset` of features + how to map back)
    predict(examples, enc, logits) -> one prediction per example (label, or tag list)
    metrics(examples, predictions) -> scalars + reports (core.evaluate)

Long inputs:
- classification truncates to `max_length` tokens (the head reads the first token's state);
- NER splits a long sentence into overlapping windows of `max_length` tokens that share `stride`
  tokens. Each word is labelled on its first sub-token (the others get -100, ignored by the loss,
  as in transformers' run_ner.py). When windows overlap, a word's prediction is taken from the window
  where its first sub-token has the most context on both sides. Every word gets a prediction; a word
  the tokenizer turns into no tokens at all (rare control characters) is predicted "O".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn
from transformers import (
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from core.evaluate import (
    classification_metrics,
    classification_scalars,
    ner_metrics,
    ner_scalars,
)


@dataclass
class Encoded:
    dataset: datasets.Dataset
    sample_of: list[int]  # feature -> example index
    word_ids: list[list[int | None]] | None = None  # NER: feature position -> word index


class ClassificationTask:
    name = "classification"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, labels: list[str], max_length: int, stride: int = 0):
        self.tokenizer, self.labels, self.max_length = tokenizer, labels, max_length
        self.label2id = {lab: i for i, lab in enumerate(labels)}

    def encode(self, examples: list[dict]) -> Encoded:
        enc = self.tokenizer([ex["text"] for ex in examples], truncation=True, max_length=self.max_length)
        cols = {k: enc[k] for k in enc}
        cols["labels"] = [self.label2id.get(ex.get("label"), -100) for ex in examples]
        return Encoded(datasets.Dataset.from_dict(cols), list(range(len(examples))))

    def collator(self):
        return DataCollatorWithPadding(self.tokenizer)

    def predict(self, examples: list[dict], enc: Encoded, logits: np.ndarray) -> list[dict[str, Any]]:
        probs = _softmax(logits)
        ids = probs.argmax(-1)
        return [{"label": self.labels[i], "score": float(p[i])} for i, p in zip(ids, probs, strict=False)]

    def metrics(self, examples: list[dict], predictions: list[dict], full: bool = True) -> dict[str, Any]:
        y_true = [ex["label"] for ex in examples]
        y_pred = [p["label"] for p in predictions]
        fn = classification_metrics if full else lambda t, p, labs: classification_scalars(t, p, labs)
        return fn(y_true, y_pred, self.labels)


class NerTask:
    name = "ner"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, labels: list[str], max_length: int, stride: int = 32):
        self.tokenizer, self.labels, self.max_length, self.stride = tokenizer, labels, max_length, stride
        self.label2id = {lab: i for i, lab in enumerate(labels)}

    def encode(self, examples: list[dict]) -> Encoded:
        enc = self.tokenizer(
            [ex["tokens"] for ex in examples],
            is_split_into_words=True,
            truncation=True,
            max_length=self.max_length,
            stride=self.stride,
            return_overflowing_tokens=True,
        )
        sample_of = list(enc["overflow_to_sample_mapping"])
        word_ids, labels = [], []
        for f, s in enumerate(sample_of):
            wids = enc.word_ids(f)
            tags = examples[s].get("tags")
            row, prev = [], None
            for w in wids:
                # Label the first sub-token of each word; -100 (ignored) for the rest and specials.
                row.append(self.label2id.get(tags[w], -100) if tags is not None and w is not None and w != prev else -100)
                prev = w
            word_ids.append(wids)
            labels.append(row)
        cols = {k: enc[k] for k in enc if k != "overflow_to_sample_mapping"}
        cols["labels"] = labels
        return Encoded(datasets.Dataset.from_dict(cols), sample_of, word_ids)

    def collator(self):
        return DataCollatorForTokenClassification(self.tokenizer)

    def predict(self, examples: list[dict], enc: Encoded, logits: np.ndarray) -> list[dict[str, Any]]:
        ids = logits.argmax(-1) if logits.ndim == 3 else logits
        # For each (example, word): (context score, tag id) of the best window seen so far.
        best: list[dict[int, tuple[int, int]]] = [{} for _ in examples]
        for f, (s, wids) in enumerate(zip(enc.sample_of, enc.word_ids, strict=False)):
            content = [j for j, w in enumerate(wids) if w is not None]
            lo, hi = content[0], content[-1]
            prev = None
            for j, w in enumerate(wids):
                if w is not None and w != prev:
                    context = min(j - lo, hi - j)
                    if w not in best[s] or context > best[s][w][0]:
                        best[s][w] = (context, int(ids[f, j]))
                prev = w
        return [
            {"tags": [self.labels[best[s][w][1]] if w in best[s] else "O" for w in range(len(ex["tokens"]))]}
            for s, ex in enumerate(examples)
        ]

    def metrics(self, examples: list[dict], predictions: list[dict], full: bool = True) -> dict[str, Any]:
        true = [ex["tags"] for ex in examples]
        pred = [p["tags"] for p in predictions]
        return ner_metrics(true, pred, self.labels) if full else ner_scalars(true, pred)


def predict_logits(model: nn.Module, task: Any, enc: Encoded, batch_size: int = 64) -> np.ndarray:
    """Logits for every feature, in order. Batches hold similar lengths (less padding); for token
    tasks the result is padded to the longest feature: (features, max_len, labels)."""
    ds = enc.dataset.remove_columns([c for c in ("labels",) if c in enc.dataset.column_names])
    lengths = [len(ids) for ids in ds["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    collate = task.collator()
    device = next(model.parameters()).device
    outputs: list[np.ndarray | None] = [None] * len(ds)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size].tolist()
            batch = collate([ds[i] for i in idx])
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy()
            for row, i in enumerate(idx):
                outputs[i] = logits[row, : lengths[i]] if logits.ndim == 3 else logits[row]
    model.train(was_training)
    if not outputs:
        return np.zeros((0,))
    if outputs[0].ndim == 1:
        return np.stack(outputs)
    padded = np.zeros((len(outputs), max(lengths), outputs[0].shape[-1]), dtype=np.float32)
    for i, o in enumerate(outputs):
        padded[i, : len(o)] = o
    return padded


def prediction_records(examples: list[dict], predictions: list[dict]) -> list[dict]:
    """One record per example: where it came from, the gold answer, and the prediction."""
    return [{**{k: v for k, v in ex.items() if k != "file"}, "predicted": p} for ex, p in zip(examples, predictions, strict=False)]


TASKS = {"classification": ClassificationTask, "ner": NerTask}


def make_task(name: str, tokenizer: PreTrainedTokenizerBase, labels: list[str], max_length: int, stride: int):
    return TASKS[name](tokenizer, labels, max_length, stride)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)
