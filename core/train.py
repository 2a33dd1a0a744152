"""Selective training, top to bottom: data -> model -> groups -> method -> Trainer -> report -> delta.

`train(config)` runs one RunConfig to completion in a new run folder; `resume(run_id)` continues an
interrupted or failed run from its last checkpoint. Everything a UI needs while it runs is in the run
folder (status.json, metrics.jsonl), so it can be started as `python -m core train` in a subprocess.
"""

from __future__ import annotations

import gc
import math
import os
import random
import resource
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import SequentialSampler
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback
from transformers.utils import SAFE_WEIGHTS_NAME

from core.config import RunConfig
from core.data import TaskData, label_counts, load_task_data
from core.delta import DELTA_FILE, load_run_model, save_delta
from core.errors import ConfigError, RunError
from core.evaluate import corpus_lines, corpus_perplexity, sentence_embeddings
from core.groups import Partition, partition
from core.methods import Plan, apply_method
from core.models import load_task_model, load_tokenizer, set_attention_dropout
from core.runs import Run, create_run, open_run
from core.scoring import head_warmed, score_groups
from core.select import Selection, measure_complexity, select_groups, select_random
from core.tasks import evaluate_task, length_order, prediction_records, task_for, unpermute


@dataclass
class RunResult:
    run: Run
    model: nn.Module
    report: dict[str, Any]


@dataclass
class Prepared:
    """Everything a run trains with, built the same way for a new run and a resumed one."""

    config: RunConfig
    data: TaskData
    task: Any
    model: nn.Module
    partition: Partition
    plan: Plan
    selection: Selection | None = None


def prepare(config: RunConfig, saved_selection: list[str] | None = None) -> Prepared:
    """Data, tokenizer, model, partition and (for camel / random_groups) the selection.

    `saved_selection`: group names chosen earlier (resuming a run): reused instead of re-scoring."""
    config.resolve()
    set_seed(config.train.seed)
    torch.set_num_threads(config.train.threads or os.cpu_count() or 1)
    parent_labels = None
    if config.init_from:
        parent_labels = open_run(config.init_from, config.runs_dir).labels()
    data = load_task_data(config.data, seed=config.train.seed, labels=parent_labels)
    tokenizer = load_tokenizer(config.model)
    task = task_for(config.data, tokenizer, data.labels, config.eval)
    if config.init_from:
        model = load_run_model(open_run(config.init_from, config.runs_dir), merge=True)
        model.train()
    else:
        model = load_task_model(config.model, config.data.task, data.labels)
    if config.train.attention_dropout is not None:
        set_attention_dropout(model, config.train.attention_dropout)
    m = config.method
    needs_batches = (m.name == "camel" and saved_selection is None) or config.groups.options.get("features") == "coactivation"
    n_batches = m.score_batches or score_batches_for(len(data.train), config.train.batch_size)
    batches = task_batches(task, data.train, n_batches, config.train.batch_size, config.train.seed) if needs_batches else None
    part = partition(model, config.groups.strategy, config.groups.options, calibration=batches)
    selection = None
    if saved_selection is not None:
        chosen = saved_selection
    elif m.name == "camel":
        start = time.perf_counter()
        with head_warmed(model, part, batches, m.score_warmup, lr=config.train.head_lr, seed=config.train.seed):
            scores = score_groups(model, part, batches, m.scorer, seed=config.train.seed,
                                  probe=config.data.task in ("classification", "ner"), micro_batch=m.score_micro_batch)
        scores.seconds = time.perf_counter() - start  # a head warm-up is part of what scoring cost
        mean_length = float(np.mean([float(b["attention_mask"].sum(1).float().mean()) for b in batches]))
        complexity = measure_complexity(data.labels or [f"position {i}" for i in range(config.data.max_length)],
                                        label_counts(config.data.task, data.train), len(data.train),
                                        mean_length, config.data.task != "classification", scores)
        selection = select_groups(part, scores, m, complexity)
        chosen = selection.selected
    elif m.name == "random_groups":
        target = _random_target(config, part)
        selection = select_random(part, target, config.train.seed, m)
        chosen = selection.selected
    else:
        chosen = None
    model, plan = apply_method(model, part, m, selected=chosen)
    return Prepared(config, data, task, model, part, plan, selection)


def score_batches_for(train_size: int, batch_size: int) -> int:
    """Default scoring sample: 2 % of an epoch's batches, at least 2, at most 16. A scoring batch
    costs about two training steps (a full backward pass), so scoring stays near 4 % of an epoch."""
    return max(2, min(16, round(0.02 * math.ceil(train_size / batch_size))))


def task_batches(task: Any, examples: list[dict], n_batches: int, batch_size: int, seed: int) -> list[dict]:
    """A seeded sample of `n_batches` training batches, collated as the model takes them."""
    rng = random.Random(seed)
    sample = rng.sample(examples, min(len(examples), n_batches * batch_size))
    enc = task.encode(sample)
    collate = task.collator()
    rows = [enc.dataset[i] for i in range(len(enc.dataset))][: n_batches * batch_size]
    rows.sort(key=lambda r: len(r["input_ids"]))  # batches of similar length: little padding to pay for
    return [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def _random_target(config: RunConfig, part: Partition) -> int:
    m = config.method
    if m.match_run:
        other = open_run(m.match_run, config.runs_dir)
        plan = other.read_json("groups.json").get("plan", {})
        if "trainable" not in plan:
            raise RunError(f"run {m.match_run!r} has no trained plan to match")
        return int(plan["trainable"])
    return int(m.budget * part.total_params)


def train(config: RunConfig, progress: bool = True) -> RunResult:
    """Train a new run described by `config`; returns the run, the tuned model and its report."""
    config.validate()
    if not config.data.train:
        raise ConfigError("data.train", "no training data given")
    corpus = config.eval.forgetting_corpus
    if corpus and not os.path.isfile(corpus):  # found out before any work, not after training
        raise ConfigError("eval.forgetting_corpus", f"file not found: {corpus}")
    config.resolve()  # resolve defaults so the saved config re-runs as is
    if config.init_from:
        inherit_parent(config)
    run = create_run(config)
    return _run_guarded(run, config, resume_from=None, progress=progress)


def inherit_parent(config: RunConfig) -> None:
    """Re-tuning: the parent run's tuned model is the starting point, so its base model and task are
    this run's too (the lineage is the `init_from` field of the saved config)."""
    parent = open_run(config.init_from, config.runs_dir)
    state = parent.status().get("state")
    if state != "completed":
        raise RunError(f"run {config.init_from!r} is {state}; only a completed run can be tuned again")
    parent_cfg = parent.config()
    if parent_cfg.data.task != config.data.task:
        raise RunError(f"run {config.init_from!r} is a {parent_cfg.data.task} run; cannot re-tune it for {config.data.task}")
    config.model = parent_cfg.model


def resume(run_id: str, runs_dir: str = "runs", progress: bool = True) -> RunResult:
    """Continue a failed or interrupted run from its latest checkpoint (from scratch if it has none)."""
    run = open_run(run_id, runs_dir)
    state = run.status().get("state")
    if state not in ("failed", "interrupted", "created"):
        raise RunError(f"run {run_id!r} is {state}; only failed or interrupted runs can be resumed")
    config = run.config()
    config.runs_dir = str(runs_dir)
    run.log({"event": "resume", "checkpoint": run.latest_checkpoint()})
    return _run_guarded(run, config, resume_from=run.latest_checkpoint(), progress=progress)


def _run_guarded(run: Run, config: RunConfig, resume_from: str | None, progress: bool) -> RunResult:
    """Run training; whatever happens, leave the run folder marked with what happened."""
    restore = _sigterm_as_interrupt()
    try:
        run.set_status("running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        return _train(run, config, resume_from, progress)
    except KeyboardInterrupt:
        run.set_status("interrupted", error="stopped by the user or a signal; resume with `python -m core train --resume`")
        raise
    except BaseException as e:
        run.set_status("failed", error=f"{type(e).__name__}: {e}")
        if run.writer:
            run.file("error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        raise
    finally:
        restore()


def _train(run: Run, config: RunConfig, resume_from: str | None, progress: bool) -> RunResult:
    t0 = time.perf_counter()
    saved = run.read_json("selection.json")["selected"] if resume_from and run.file("selection.json").is_file() else None
    prep = prepare(config, saved_selection=saved)
    data, task, model, plan = prep.data, prep.task, prep.model, prep.plan
    run.write_json("labels.json", data.labels)
    run.write_json("data.json", data.summary())
    run.write_json("groups.json", {**prep.partition.to_dict(), "plan": plan.to_dict()})
    if prep.selection is not None:
        run.write_json("selection.json", prep.selection.to_dict())
    run.set_status("running", plan=plan.to_dict(), sizes={k: len(getattr(data, k)) for k in ("train", "validation", "test")})

    train_enc = task.encode(data.train)
    val_enc = task.encode(data.validation)
    forgetting_before = measure_forgetting(config, model, task) if config.eval.forgetting_corpus else None
    t = config.train
    steps_per_epoch = math.ceil(len(train_enc.dataset) / (t.batch_size * t.grad_accum))
    args = TrainingArguments(
        output_dir=str(run.file("checkpoints")),
        learning_rate=config.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the total steps
        eval_strategy="steps" if t.eval_steps else "epoch",
        save_strategy="steps" if t.eval_steps else "epoch",
        eval_steps=t.eval_steps,
        save_steps=t.eval_steps,
        save_total_limit=1,  # plus the best one, which Trainer keeps: checkpoints stay bounded
        load_best_model_at_end=True,
        metric_for_best_model=config.metric,
        greater_is_better=not config.metric.endswith("loss"),
        logging_strategy="steps",
        logging_steps=max(1, min(50, steps_per_epoch // 5)),
        seed=t.seed,
        data_seed=t.seed,
        report_to=[],
        disable_tqdm=not progress,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # also what lets torchrun on CPUs train in parallel (gloo)
        label_names=["start_positions", "end_positions"] if task.name == "qa" else ["labels"],
        prediction_loss_only=task.name == "dialogue",
    )

    # Evaluation during training runs over the validation features shortest first (little padding:
    # about twice as fast on CoNLL's mixed lengths); compute_metrics puts the logits back in order.
    val_order = length_order([len(ids) for ids in val_enc.dataset["input_ids"]])

    def compute_metrics(p) -> dict[str, float]:
        logits = p.predictions  # QA: (start, end); others: logits, or a tuple led by them
        if isinstance(logits, tuple) and task.name != "qa":
            logits = logits[0]
        logits = unpermute(logits, val_order)
        return task.metrics(data.validation, task.predict(data.validation, val_enc, logits), full=False)

    generative = task.name == "dialogue"  # evaluated by loss during training: no logits to keep
    callbacks: list[TrainerCallback] = [RunLogger(run)]
    if t.patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.patience))
    trainer = RunTrainer(
        trained_only=plan.method != "lora" and plan.trainable < plan.total,
        model=model,
        args=args,
        data_collator=task.collator(),
        train_dataset=train_enc.dataset,
        eval_dataset=val_enc.dataset.select(val_order),
        processing_class=task.tokenizer,
        compute_metrics=None if generative else compute_metrics,
        callbacks=callbacks,
    )
    params = dict(model.named_parameters())
    trainer.head_params = [params[n] for n in plan.head_params if n in params]
    trainer.head_lr = config.train.head_lr
    trainer.remove_callback(PrinterCallback)  # the run folder is the log; the terminal gets a bar
    t_train = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.perf_counter() - t_train
    train_peak_mb = peak_rss_mb()  # data, scoring and training: what training needed
    # Optimizer state is not needed to evaluate: free it before evaluation allocates its own.
    optimizer_params = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    trainer.optimizer, trainer.lr_scheduler = None, None
    gc.collect()
    model = trainer.model
    if plan.slices is not None:  # trained slices back into plain linears: evaluated and saved as a plain model
        plan.slices.merge()
    model.eval()

    report: dict[str, Any] = {"run_id": run.id, "task": config.data.task, "method": plan.to_dict(), "labels": data.labels}
    if prep.selection is not None:
        sel = prep.selection.to_dict()
        report["selection"] = {k: sel[k] for k in ("rule", "settings", "selected", "selected_params", "selected_pct", "complexity")}
        if sel["scoring"]:
            report["selection"]["scoring_seconds"] = sel["scoring"]["seconds"]
    for split, examples in (("validation", data.validation), ("test", data.test)):
        if examples:
            enc = val_enc if split == "validation" else task.encode(examples)
            report[split], preds = evaluate_task(task, model, examples, enc, t.eval_batch_size)
            # Dialogue predictions are the generated samples, for the first examples in order.
            run.write_jsonl(f"predictions/{split}.jsonl", prediction_records(examples, preds))
    if forgetting_before is not None:
        report["forgetting"] = compare_forgetting(forgetting_before, measure_forgetting(config, model, task))
    delta_bytes = save_delta(model, run, plan.method, plan.slices.slices if plan.slices is not None else None)
    epochs_done = float(trainer.state.epoch or 0.0)
    train_tokens = sum(len(ids) for ids in train_enc.dataset["input_ids"]) * epochs_done  # real tokens, no padding
    report["training"] = {
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": round(train_seconds / epochs_done, 2) if epochs_done else None,
        "epochs": round(epochs_done, 3),
        "steps": trainer.state.global_step,
        "tokens_per_second": round(train_tokens / train_seconds, 1) if train_seconds else None,
        "train_loss": output.training_loss,
        "best_checkpoint_metric": trainer.state.best_metric,
        "learning_rate": config.learning_rate,
        "head_lr": config.train.head_lr,
        "train_peak_rss_mb": train_peak_mb,
        "peak_rss_mb": peak_rss_mb(),  # the whole run, evaluation included
        **trainer.meter.report(),
        # What the optimizer held: equals the plan's trainable count (frozen tensors never enter it).
        "optimizer_params": optimizer_params,
        "delta_bytes": delta_bytes,
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }
    scoring = report.get("selection", {}).get("scoring_seconds")
    if scoring is not None and report["training"]["seconds_per_epoch"]:
        report["selection"]["scoring_fraction_of_epoch"] = round(scoring / report["training"]["seconds_per_epoch"], 4)
    headline = {config.metric: report["validation"].get(config.metric)}
    if generative:
        headline["perplexity"] = report["validation"]["perplexity"]
    if data.test:
        headline[f"test_{config.metric}"] = report["test"].get(config.metric)
    report["headline"] = headline
    run.write_json("report.json", report)
    run.remove_checkpoints()
    run.set_status("completed", headline=headline, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   delta=DELTA_FILE, **{k: report["training"][k] for k in ("train_seconds", "train_peak_rss_mb", "peak_rss_mb", "delta_bytes")})
    return RunResult(run, model, report)


def measure_forgetting(config: RunConfig, model: nn.Module, task: Any) -> dict[str, Any]:
    """What the model knows of general text: perplexity (causal LM) or sentence embeddings (encoders)."""
    corpus = config.eval.forgetting_corpus
    if task.name == "dialogue":
        return {"corpus": corpus, **corpus_perplexity(model, task.tokenizer, corpus, config.eval.forgetting_tokens)}
    lines = corpus_lines(corpus, config.eval.forgetting_lines)
    return {"corpus": corpus, "lines": len(lines), "embeddings": sentence_embeddings(model, task.tokenizer, lines)}


def compare_forgetting(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Causal LM: perplexity before and after tuning. Encoders: mean cosine similarity between each
    line's base and tuned sentence embedding (1.0: the body represents general text as before)."""
    if "perplexity" in before:
        return {"measure": "perplexity", "corpus": before["corpus"], "tokens": before["tokens"],
                "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
                "increase": after["perplexity"] - before["perplexity"]}
    cosine = (before["embeddings"] * after["embeddings"]).sum(-1)
    return {"measure": "embedding_cosine", "corpus": before["corpus"], "lines": before["lines"],
            "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min())}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@dataclass
class StepMeter:
    """Time in forward + backward (not evaluation, optimizer or data loading) and the FLOPs it ran,
    counted by torch's FLOP counter on the first batch (per padded token; attention's share grows with
    length, so this is close, not exact, for batches of other lengths)."""

    flops_per_token: float | None = None
    seconds: float = 0.0
    tokens: int = 0

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"forward_backward_seconds": round(self.seconds, 2)}
        if self.flops_per_token is not None:
            out["train_flops_per_token"] = round(self.flops_per_token)
            if self.seconds > 0:
                out["achieved_gflops"] = round(self.flops_per_token * self.tokens / self.seconds / 1e9, 2)
        return out


class RunTrainer(Trainer):
    """Trainer whose evaluation keeps the dataset's order, and whose checkpoints of partly trained
    models hold only the trained tensors.

    With length grouping on, Trainer also length-groups (reorders) evaluation batches; our metrics map
    each prediction back to its feature by position (NER windows -> words), so the order given (shortest
    first, undone in compute_metrics) must be kept.
    """

    def __init__(self, *args, trained_only: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_params: list[nn.Parameter] = []
        self.head_lr: float | None = None
        self.meter = StepMeter()
        # Partly trained plain models (not peft, which saves its adapters itself): checkpoints hold the
        # trained tensors only. The frozen ones are the base (or parent) model's, which resuming rebuilds
        # from the run's config; a camel checkpoint of MiniLM is then ~14 MB instead of 90, saved and
        # loaded back (best model at the end) in a fraction of the time and memory.
        self.trained_only = trained_only

    def _trained(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.trained_only or state_dict is not None:  # state_dict: given by sharded engines
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        tensors = {n: p.detach().contiguous() for n, p in self._trained().items()}
        save_file(tensors, os.path.join(output_dir, SAFE_WEIGHTS_NAME), metadata={"format": "pt", "contents": "trained tensors"})

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """A trained-only checkpoint leaves the frozen tensors "missing" by design; a trained tensor it
        lacks, or a tensor this model does not have, means it belongs to another run: refuse it."""
        if not self.trained_only:
            return super()._issue_warnings_after_load(load_result)
        lacking = sorted(set(self._trained()) & set(load_result.missing_keys))
        if lacking or load_result.unexpected_keys:
            raise RunError(f"checkpoint does not match this run's trained tensors: missing {lacking[:5]}, "
                           f"unexpected {sorted(load_result.unexpected_keys)[:5]}")

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward and backward of one batch, timed; the first one is also counted in FLOPs."""
        ids = inputs.get("input_ids")
        tokens = int(ids.numel()) if ids is not None else 0  # padded: what the matmuls ran on
        if self.meter.flops_per_token is None and tokens:
            with FlopCounterMode(display=False) as counter:  # slow: this step is not timed
                loss = super().training_step(model, inputs, num_items_in_batch)
            self.meter.flops_per_token = counter.get_total_flops() / tokens
            return loss
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.meter.seconds += time.perf_counter() - start
        self.meter.tokens += tokens
        return loss

    def _get_eval_sampler(self, eval_dataset):
        return SequentialSampler(eval_dataset)

    def create_optimizer(self, model=None):
        """Trainer's AdamW groups (decay / no decay), each split so the new head gets `head_lr`."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh and self.head_lr is not None and self.head_params:
            head = {id(p) for p in self.head_params}
            groups = []
            for group in optimizer.param_groups:
                for is_head in (False, True):
                    params = [p for p in group["params"] if (id(p) in head) == is_head]
                    if params:
                        groups.append({**group, "params": params, "lr": self.head_lr if is_head else group["lr"]})
            optimizer.param_groups = groups
        return optimizer


class RunLogger(TrainerCallback):
    """Mirror Trainer's progress into the run folder: metrics.jsonl lines and status.json progress."""

    def __init__(self, run: Run, every_seconds: float = 1.0):
        self.run, self.every, self.last = run, every_seconds, 0.0

    def _progress(self, state) -> dict:
        return {"step": state.global_step, "max_steps": state.max_steps, "epoch": round(state.epoch or 0.0, 4)}

    def on_train_begin(self, args, state, control, **kwargs):
        self.run.set_status("running", progress=self._progress(state))

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.run.set_status("running", progress=self._progress(state))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        kind = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        self.run.log({"kind": kind, "step": state.global_step, "epoch": state.epoch, **logs})
        if kind == "eval":
            self.run.set_status("running", progress=self._progress(state),
                                last_eval={k[5:]: v for k, v in logs.items() if k.startswith("eval_")})


def _sigterm_as_interrupt():
    """Turn SIGTERM (a UI's stop button, a scheduler) into KeyboardInterrupt so the run is marked."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)
