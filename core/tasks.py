"""Tasks: how examples become model inputs, and how model outputs become predictions and metrics.

One class per task with the same three steps, so training, evaluation and the UI treat them alike:
    encode(examples)              -> Encoded (a `datasets.Dataset` of features + how to map back)
    predict(examples, enc, logits) -> one prediction per example (label, or tag list)
    metrics(examples, predictions) -> scalars + reports (core.evaluate)

Long inputs:
- classification truncates to `max_length` tokens (the head reads the first token's state);
- QA splits a long context into windows of `max_length` tokens (question + part of the context) that
  share `stride` tokens; a window that does not hold the answer is trained to point at [CLS]. The
  predicted answer is the best-scoring span (start + end logit, at most `max_answer_length` tokens,
  inside the context) over the n best starts and ends of every window, mapped back to characters
  of the context through the tokenizer's offsets.
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
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from core.errors import CamelError
from core.evaluate import (
    classification_metrics,
    classification_scalars,
    ner_metrics,
    ner_scalars,
    qa_metrics,
)


@dataclass
class Encoded:
    dataset: datasets.Dataset
    sample_of: list[int]  # feature -> example index
    word_ids: list[list[Any]] | None = None  # NER: position -> word index; QA: position -> char offsets


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


def length_order(lengths: list[int]) -> np.ndarray:
    """Feature indices from shortest to longest (stable): batches taken in this order hold similar
    lengths, so dynamic padding adds little. `unpermute` puts per-feature outputs back in order."""
    return np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")


def unpermute(values: Any, order: np.ndarray) -> Any:
    """Rows computed in `order` (row j belongs to feature order[j]) back in feature order; tuples
    (QA start and end logits) element-wise."""
    if isinstance(values, tuple):
        return tuple(unpermute(v, order) for v in values)
    out = np.empty_like(values)
    out[order] = values
    return out


def predict_logits(model: nn.Module, task: Any, enc: Encoded, batch_size: int = 64) -> np.ndarray:
    """Logits for every feature, in order. Batches hold similar lengths (less padding); for token
    tasks the result is padded to the longest feature: (features, max_len, labels)."""
    ds = enc.dataset.remove_columns([c for c in ("labels", "start_positions", "end_positions") if c in enc.dataset.column_names])
    lengths = [len(ids) for ids in ds["input_ids"]]
    order = length_order(lengths)
    collate = task.collator()
    device = next(model.parameters()).device
    outputs: list[np.ndarray | None] = [None] * len(ds)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size].tolist()
            batch = collate([ds[i] for i in idx])
            logits = model_logits(model(**{k: v.to(device) for k, v in batch.items()})).float().cpu().numpy()
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


class QaTask:
    name = "qa"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, labels: list[str], max_length: int, stride: int = 32,
                 max_answer_length: int = 30):
        self.tokenizer, self.labels, self.max_length, self.stride = tokenizer, labels, max_length, stride
        self.max_answer_length = max_answer_length

    def encode(self, examples: list[dict]) -> Encoded:
        enc = self.tokenizer(
            [ex["question"] for ex in examples],
            [ex["context"] for ex in examples],
            truncation="only_second",
            max_length=self.max_length,
            stride=self.stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        sample_of = list(enc["overflow_to_sample_mapping"])
        starts, ends, offsets = [], [], []
        for f, s in enumerate(sample_of):
            seq_ids = enc.sequence_ids(f)
            # Offsets of context tokens only; None elsewhere (question, specials): never an answer.
            offsets.append([o if seq_ids[j] == 1 else None for j, o in enumerate(enc["offset_mapping"][f])])
            answers = examples[s].get("answers") or []
            start_tok = end_tok = 0  # [CLS]: "the answer is not in this window"
            if answers:
                a0 = answers[0]["answer_start"]
                a1 = a0 + len(answers[0]["text"])
                ctx = [j for j, sid in enumerate(seq_ids) if sid == 1]
                lo, hi = ctx[0], ctx[-1]
                off = enc["offset_mapping"][f]
                if off[lo][0] <= a0 and off[hi][1] >= a1:
                    start_tok = next(j for j in range(lo, hi + 1) if off[j][1] > a0)
                    end_tok = next(j for j in range(hi, lo - 1, -1) if off[j][0] < a1)
            starts.append(start_tok)
            ends.append(end_tok)
        cols = {k: enc[k] for k in enc if k not in ("overflow_to_sample_mapping", "offset_mapping")}
        cols["start_positions"], cols["end_positions"] = starts, ends
        return Encoded(datasets.Dataset.from_dict(cols), sample_of, offsets)

    def collator(self):
        return DataCollatorWithPadding(self.tokenizer)

    def predict(self, examples: list[dict], enc: Encoded, logits: Any) -> list[dict[str, Any]]:
        """Per example, the best-scoring span (start + end logit) over all its windows: exact, over every
        pair of context tokens with start <= end and at most `max_answer_length` tokens."""
        start_logits, end_logits = _split_span_logits(logits)
        best: list[dict[str, Any] | None] = [None] * len(examples)
        for f, (s, offsets) in enumerate(zip(enc.sample_of, enc.word_ids)):
            n = len(offsets)
            context = np.array([o is not None for o in offsets])
            width = np.subtract.outer(np.arange(n), np.arange(n)).T  # [i, j] = j - i
            ok = context[:, None] & context[None, :] & (width >= 0) & (width < self.max_answer_length)
            scores = np.where(ok, start_logits[f][:n, None] + end_logits[f][None, :n], -np.inf)
            i, j = divmod(int(scores.argmax()), n)
            score = float(scores[i, j])
            if ok[i, j] and (best[s] is None or score > best[s]["score"]):
                a, b = offsets[i][0], offsets[j][1]
                best[s] = {"answer": examples[s]["context"][a:b], "start": a, "end": b, "score": score}
        return [b or {"answer": "", "start": 0, "end": 0, "score": float("-inf")} for b in best]

    def metrics(self, examples: list[dict], predictions: list[dict], full: bool = True) -> dict[str, Any]:
        return qa_metrics([p["answer"] for p in predictions], [[a["text"] for a in ex["answers"]] for ex in examples])


def answer_question(model: nn.Module, tokenizer: PreTrainedTokenizerBase, question: str, context: str,
                    max_length: int = 384, stride: int = 128, max_answer_length: int = 30) -> dict[str, Any]:
    """Answer a question from a context with a QA model: {"answer", "start", "end", "score"}
    (character offsets into `context`; long contexts are windowed as in training)."""
    if not question.strip() or not context.strip():
        raise CamelError("a question and a context are both needed")
    task = QaTask(tokenizer, [], max_length, stride, max_answer_length)
    examples = [{"question": question.strip(), "context": context, "answers": []}]
    enc = task.encode(examples)
    return task.predict(examples, enc, predict_logits(model, task, enc))[0]


def _split_span_logits(logits: Any) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) logits from Trainer's tuple, or from predict_logits' stacked (features, len, 2)."""
    if isinstance(logits, (tuple, list)):
        return np.asarray(logits[0]), np.asarray(logits[1])
    return logits[..., 0], logits[..., 1]


# Used when a tokenizer has no chat template of its own (ChatML, as SmolLM2 and many others use).
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class DialogueTask:
    """Causal-LM tuning on conversations: the model's chat template, loss on assistant turns only.

    Each assistant turn's tokens (its text and end-of-turn marker) are labels; system and user turns
    and the template's own markup are -100, ignored by the loss. A conversation longer than
    `max_length` tokens is cut at the end; one left with no assistant token is dropped (counted)."""

    name = "dialogue"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, labels: list[str], max_length: int, stride: int = 0,
                 max_new_tokens: int = 128, generation_samples: int = 8, generation_metrics: tuple[str, ...] = ()):
        self.tokenizer, self.labels, self.max_length = tokenizer, labels, max_length
        self.max_new_tokens, self.generation_samples = max_new_tokens, generation_samples
        self.generation_metrics = tuple(generation_metrics)
        if not tokenizer.chat_template:
            tokenizer.chat_template = CHATML
        self.dropped = 0

    def render(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and its labels (-100 outside assistant turns)."""
        tok = self.tokenizer

        def ids(msgs: list[dict], prompt: bool = False) -> list[int]:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
            return tok(text, add_special_tokens=False)["input_ids"]

        full = ids(messages)
        labels = [-100] * len(full)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = ids(messages[:i], prompt=True), ids(messages[: i + 1])
            if full[: len(upto)] != upto or upto[: len(before)] != before:
                raise CamelError("this tokenizer's chat template does not render a conversation as a prefix of its "
                                 "continuation, so prompt tokens cannot be masked reliably")
            labels[len(before): len(upto)] = upto[len(before):]
        return full, labels

    def encode(self, examples: list[dict]) -> Encoded:
        cols: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        kept = []
        for i, ex in enumerate(examples):
            ids, labels = self.render(ex["messages"])
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if all(lab == -100 for lab in labels[1:]):
                continue  # nothing left to learn from: the response was cut away
            cols["input_ids"].append(ids)
            cols["attention_mask"].append([1] * len(ids))
            cols["labels"].append(labels)
            kept.append(i)
        self.dropped = len(examples) - len(kept)
        return Encoded(datasets.Dataset.from_dict(cols), kept)

    def collator(self):
        return DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=-100, padding=True)

    def evaluate(self, model: nn.Module, examples: list[dict], enc: Encoded, batch_size: int = 16) -> tuple[dict, list]:
        """Response loss and perplexity (token-weighted), plus generated answers to a fixed sample."""
        from core.evaluate import generation_scores, language_model_loss

        loss, tokens = language_model_loss(model, [enc.dataset[i] for i in range(len(enc.dataset))], self.collator(), batch_size)
        samples = []
        for ex in examples[: self.generation_samples]:
            prompt = ex["messages"][:-1]
            reply = "".join(generate_reply(model, self.tokenizer, prompt, max_new_tokens=self.max_new_tokens, temperature=0.0))
            samples.append({"prompt": prompt[-1]["content"], "reference": ex["messages"][-1]["content"], "generated": reply})
        metrics = {"loss": loss, "perplexity": float(np.exp(loss)), "response_tokens": tokens, "n": len(enc.sample_of),
                   "dropped_too_long": len(examples) - len(enc.sample_of), "samples": samples}
        if self.generation_metrics and samples:
            metrics["generation"] = generation_scores([s["generated"] for s in samples], [s["reference"] for s in samples],
                                                      self.generation_metrics)
        return metrics, samples


def generate_reply(model: nn.Module, tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_new_tokens: int = 256,
                   temperature: float = 0.7, top_p: float = 0.9):
    """Stream the assistant's reply to a chat history, piece by piece (a generator of text chunks).

    Stops at the end-of-turn token (or end of sequence); temperature 0 decodes greedily."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(next(model.parameters()).device)
    stop = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
            if isinstance(t, int) and t != tokenizer.unk_token_id]
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    kwargs = {**inputs, "max_new_tokens": max_new_tokens, "eos_token_id": stop or None, "streamer": streamer,
              "pad_token_id": tokenizer.pad_token_id, **sampling}
    was_training = model.training
    model.eval()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread below)
            errors.append(e)
            streamer.end()

    thread = Thread(target=run, daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        thread.join()
        model.train(was_training)
    if errors:
        raise errors[0]


TASKS = {"classification": ClassificationTask, "ner": NerTask, "qa": QaTask, "dialogue": DialogueTask}


def evaluate_task(task: Any, model: nn.Module, examples: list[dict], enc: Encoded, batch_size: int = 64) -> tuple[dict, list]:
    """Metrics and per-example predictions of `model` on `examples` (encoded as `enc`)."""
    if hasattr(task, "evaluate"):
        return task.evaluate(model, examples, enc, batch_size)
    predictions = task.predict(examples, enc, predict_logits(model, task, enc, batch_size))
    return task.metrics(examples, predictions), predictions


def make_task(name: str, tokenizer: PreTrainedTokenizerBase, labels: list[str], max_length: int, stride: int,
              **options: Any):
    return TASKS[name](tokenizer, labels, max_length, stride, **options)


def task_for(data_cfg: Any, tokenizer: PreTrainedTokenizerBase, labels: list[str], eval_cfg: Any = None):
    """The task object a DataConfig (and, for dialogue, an EvalConfig) describes."""
    options: dict[str, Any] = {"max_answer_length": data_cfg.max_answer_length} if data_cfg.task == "qa" else {}
    if data_cfg.task == "dialogue" and eval_cfg is not None:
        options = {"max_new_tokens": eval_cfg.max_new_tokens, "generation_samples": eval_cfg.generation_samples,
                   "generation_metrics": tuple(eval_cfg.generation_metrics)}
    return make_task(data_cfg.task, tokenizer, labels, data_cfg.max_length, data_cfg.stride, **options)


def model_logits(output: Any) -> torch.Tensor:
    """One tensor per batch: classification/NER logits, or QA start and end stacked on a last axis."""
    if getattr(output, "start_logits", None) is not None:
        return torch.stack([output.start_logits, output.end_logits], dim=-1)
    return output.logits


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)
