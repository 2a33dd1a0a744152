"""`RunConfig`: the one object that travels from the UI or the command line to the engine.

It round-trips through JSON and YAML, and every run folder keeps the resolved copy it ran with, so a
run can be re-run from its saved config. Loading validates every field and names the bad one.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.errors import ConfigError

TASKS = ("classification", "ner", "qa", "dialogue")
METHODS = ("camel", "groups", "random_groups", "full", "head", "bitfit", "last_n", "lora")
SCORERS = ("gradient", "gradient_density", "gradient_signal", "gradient_adam", "activation", "random")
RULES = ("auto", "cumulative", "top_k", "budget")
DATA_FORMATS = ("auto", "csv", "tsv", "json", "jsonl", "conll", "at", "hub")


@dataclass
class DataConfig:
    """Where the task data is and how to read it."""

    task: str = "classification"  # classification | ner | qa (extractive) | dialogue (causal LM)
    train: str = ""  # file path, or a `datasets` id when the Hub can be reached
    validation: str | None = None  # file; if absent, a seeded (stratified) split of train
    test: str | None = None  # file; if absent, `test_fraction` of train (0 = no test split)
    format: str = "auto"  # auto | csv | tsv | json | jsonl | conll | at (text@label lines) | hub
    encoding: str = "utf-8"  # e.g. latin-1 for Financial PhraseBank
    text_column: str | None = None  # classification; auto-detected when absent
    label_column: str | None = None  # classification; auto-detected when absent
    token_column: str | None = None  # ner: JSON key, or CoNLL column index (default 0)
    tag_column: str | None = None  # ner: JSON key, or CoNLL column index (default -1, the last)
    hub_config: str | None = None  # `datasets` config name for hub ids
    validation_fraction: float = 0.1
    test_fraction: float = 0.0
    max_train_samples: int | None = None  # take a seeded random subset (quick experiments)
    max_eval_samples: int | None = None
    max_length: int = 128  # tokens; classification truncates, NER and QA use overlapping windows
    stride: int = 32  # NER / QA: tokens shared by consecutive windows of a long input
    question_column: str | None = None  # qa (CSV/JSONL): auto-detected when absent
    context_column: str | None = None
    answer_column: str | None = None  # answer text
    answer_start_column: str | None = None  # character offset of the answer in the context
    max_answer_length: int = 30  # qa: longest predicted answer, in tokens
    prompt_column: str | None = None  # dialogue from columns: the user turn (instruction) ...
    response_column: str | None = None  # ... and the assistant turn (response)
    system_prompt: str | None = None  # dialogue: a system message put before each conversation


@dataclass
class ModelConfig:
    name: str = "minilm"  # "minilm" (embedded all-MiniLM-L6-v2), a local folder, or a Hub id
    trust_remote_code: bool = False  # only when the user asks: runs code shipped with the model


@dataclass
class GroupsConfig:
    strategy: str | None = None  # layer | module | ffn_clusters | rules; None: ffn_clusters for camel, else layer
    options: dict[str, Any] = field(default_factory=dict)  # strategy options, e.g. {"rules": [...]}


@dataclass
class MethodConfig:
    """Which parameters are trained. The task head is always trained."""

    name: str = "camel"  # camel | groups | random_groups | full | head | bitfit | last_n | lora
    select: list[str] = field(default_factory=list)  # groups: group names or globs ("layer.*")
    # camel: score groups on task data, then select (core/scoring.py, core/select.py)
    scorer: str = "gradient"  # gradient | gradient_density | gradient_signal | gradient_adam | activation | random
    rule: str = "auto"  # auto (task complexity -> p and budget) | cumulative | top_k | budget
    p: float | None = None  # cumulative: normalised score to reach (auto: from complexity)
    # cumulative: "global", "layer" (reach p within each layer, as ESFT does), or "auto": "layer" for token-level tasks
    # (NER, QA, dialogue), which gain from adapting every block, "global" for sentence classification (bench/findings.md)
    scope: str = "auto"
    top_k: int | None = None  # top_k: number of groups
    budget: float | None = None  # budget / cap: fraction of the model's parameters (auto: from complexity)
    include: list[str] = field(default_factory=list)  # always trained (names or globs)
    exclude: list[str] = field(default_factory=list)  # never trained; wins over scores and include
    score_batches: int | None = None  # task batches the scorer sees; None: 2 % of an epoch's batches, 2 to 16
    # examples per forward/backward pass while scoring (gradients add up over the batch: same scores, less activation
    # memory, one model-sized gradient buffer). None: 2 for dialogue (vocabulary-sized logits at every position), else
    # the whole batch
    score_micro_batch: int | None = None
    # head-only training steps on the scoring batches before scoring (the head is restored after): scores read under a
    # head that already knows the task rather than a random one. 0: score under the new head
    score_warmup: int = 0
    # depth floor: the highest block at or above which the rule's own choice holds this share of its score; no group
    # below it is trained (backward stops there). None: 0.95 for rule auto, else 1.0 (no floor)
    depth_keep: float | None = None
    # random_groups: random groups as large as this run's trained part (or `budget` when no run is given)
    match_run: str | None = None
    last_n: int = 2  # last_n: how many top blocks
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])


@dataclass
class TrainConfig:
    learning_rate: float | None = None  # None: the method's default (see DEFAULT_LR)
    head_lr: float | None = None  # the new task head's learning rate; None: max(learning_rate, 1e-3)
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 16
    eval_batch_size: int = 64
    grad_accum: int = 1
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    seed: int = 42
    patience: int = 2  # early stopping: evaluations without improvement; 0 disables
    metric: str | None = None  # validation metric for early stopping; None: the task's headline
    eval_steps: int | None = None  # None: evaluate (and checkpoint) every epoch
    threads: int | None = None  # torch CPU threads; None: all cores
    group_by_length: bool = True  # batches of similar length: less padding, same data
    # dropout on attention probabilities while training. None: the model's own (MiniLM 0.1, SmolLM2 0). 0 lets CPU
    # attention run torch's fused kernel, which keeps no attention matrix for backward (any dropout forces the
    # unfused path): measured on 384-token SQuAD batches in bench/findings.md
    attention_dropout: float | None = None


# Partially trained models want higher learning rates than full fine-tuning (DESIGN.md, measured).
DEFAULT_LR = {"full": 5e-5, "camel": 2e-4, "groups": 2e-4, "random_groups": 2e-4, "last_n": 2e-4,
              "head": 1e-3, "bitfit": 1e-3, "lora": 1e-3}

HEADLINE_METRIC = {"classification": "macro_f1", "ner": "entity_f1", "qa": "f1", "dialogue": "loss"}


@dataclass
class EvalConfig:
    """What the final evaluation measures besides the task metric."""

    # Forgetting: causal LMs, perplexity on this general corpus before and after tuning; encoders,
    # cosine similarity of base and tuned sentence embeddings of its lines. None: not measured.
    forgetting_corpus: str | None = None
    forgetting_tokens: int = 8192  # how much of the corpus (causal LM), in tokens
    forgetting_lines: int = 128  # how many lines (encoders)
    generation_samples: int = 8  # dialogue: validation prompts answered and saved in the report
    max_new_tokens: int = 128
    generation_metrics: list[str] = field(default_factory=list)  # dialogue: rouge, chrf, bleu


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    groups: GroupsConfig = field(default_factory=GroupsConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_id: str | None = None  # None: generated from time and method
    runs_dir: str = "runs"
    init_from: str | None = None  # parent run id: start from its tuned weights (lineage)
    notes: str = ""

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        config = _build(cls, data, "")
        config.validate()
        return config

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """Read a `.json`, `.yaml` or `.yml` config file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError("config", f"file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise ConfigError("config", f"{path} is not valid {path.suffix.lstrip('.').upper()}: {e}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError("config", f"{path} must hold a mapping of fields, not {type(data).__name__}")
        return cls.from_dict(data)

    def dump(self, path: str | Path) -> None:
        from core.fileio import atomic_write_json, atomic_write_text

        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            atomic_write_json(path, self.to_dict())

    # ---- derived values ------------------------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        return self.train.learning_rate if self.train.learning_rate is not None else DEFAULT_LR[self.method.name]

    @property
    def metric(self) -> str:
        return self.train.metric or HEADLINE_METRIC[self.data.task]

    def resolve(self) -> None:
        """Fill the defaults that depend on other fields, so the saved config states what ran."""
        if self.groups.strategy is None:
            self.groups.strategy = "ffn_clusters" if self.method.name == "camel" else "layer"
        self.train.learning_rate = self.learning_rate
        if self.train.head_lr is None:
            # A new, random head learns from scratch: it wants a higher rate than the pretrained body.
            self.train.head_lr = max(self.train.learning_rate, 1e-3)
        self.train.metric = self.metric
        if self.method.scope == "auto":
            self.method.scope = "global" if self.data.task == "classification" else "layer"
        if (self.method.name == "camel" and self.method.scope == "layer" and self.groups.strategy == "ffn_clusters"
                and "attention_experts" not in self.groups.options):
            # Within a layer, groups of one size compare on their scores, not their sizes (bench/findings.md).
            self.groups.options["attention_experts"] = "auto"
        if self.method.name == "random_groups" and self.method.match_run and not self.groups.options:
            from core.runs import open_run  # the control draws from the same groups as the run it matches

            matched = open_run(self.method.match_run, self.runs_dir).config().groups
            if matched.strategy == self.groups.strategy:
                self.groups.options = dict(matched.options)
        if self.method.name == "camel" and self.method.depth_keep is None:
            self.method.depth_keep = 0.95 if self.method.rule == "auto" else 1.0
        if self.method.name == "camel" and self.method.score_micro_batch is None:
            self.method.score_micro_batch = min(2, self.train.batch_size) if self.data.task == "dialogue" else self.train.batch_size

    def validate(self) -> None:
        """Check values that types alone cannot; raise ConfigError naming the field."""
        d, m, t = self.data, self.method, self.train
        _choice("data.task", d.task, TASKS)
        _choice("data.format", d.format, DATA_FORMATS)
        _choice("method.name", m.name, METHODS)
        for name, value in [("data.validation_fraction", d.validation_fraction), ("data.test_fraction", d.test_fraction)]:
            if not 0.0 <= value < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {value}")
        if d.validation_fraction + d.test_fraction >= 1.0:
            raise ConfigError("data.test_fraction", "validation_fraction + test_fraction must leave training data")
        _positive("data.max_length", d.max_length)
        _positive("data.max_answer_length", d.max_answer_length)
        for name in ("forgetting_tokens", "forgetting_lines", "max_new_tokens"):
            _positive(f"eval.{name}", getattr(self.eval, name))
        if self.eval.generation_samples < 0:
            raise ConfigError("eval.generation_samples", f"must be >= 0, got {self.eval.generation_samples}")
        for name in self.eval.generation_metrics:
            _choice("eval.generation_metrics", name, ("rouge", "chrf", "bleu"))
        if not 0 <= d.stride < d.max_length // 2:
            raise ConfigError("data.stride", f"must be in [0, max_length/2), got {d.stride}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(d, name)
            if value is not None:
                _positive(f"data.{name}", value)
        if m.name == "groups" and not m.select:
            raise ConfigError("method.select", "method 'groups' needs at least one group name or pattern")
        _choice("method.scorer", m.scorer, SCORERS)
        _choice("method.rule", m.rule, RULES)
        _choice("method.scope", m.scope, ("auto", "global", "layer"))
        if m.p is not None and not 0.0 < m.p <= 1.0:
            raise ConfigError("method.p", f"must be in (0, 1], got {m.p}")
        if m.budget is not None and not 0.0 < m.budget <= 1.0:
            raise ConfigError("method.budget", f"a fraction of the model's parameters in (0, 1], got {m.budget}")
        if m.top_k is not None:
            _positive("method.top_k", m.top_k)
        if m.depth_keep is not None and not 0.0 < m.depth_keep <= 1.0:
            raise ConfigError("method.depth_keep", f"a share of the selection's score in (0, 1] (1 = no depth floor), got {m.depth_keep}")
        if m.name == "camel" and m.rule == "top_k" and m.top_k is None:
            raise ConfigError("method.top_k", "rule 'top_k' needs top_k")
        if m.name == "camel" and m.rule == "budget" and m.budget is None:
            raise ConfigError("method.budget", "rule 'budget' needs budget")
        if m.name == "camel" and m.rule == "cumulative" and m.p is None:
            raise ConfigError("method.p", "rule 'cumulative' needs p")
        if m.name == "random_groups" and m.match_run is None and m.budget is None:
            raise ConfigError("method.match_run", "random_groups needs a run to match in size (match_run) or a budget")
        if m.score_batches is not None:
            _positive("method.score_batches", m.score_batches)
        if m.score_micro_batch is not None:
            _positive("method.score_micro_batch", m.score_micro_batch)
        if m.score_warmup < 0:
            raise ConfigError("method.score_warmup", f"a number of steps >= 0, got {m.score_warmup}")
        _positive("method.last_n", m.last_n)
        _positive("method.lora_r", m.lora_r)
        _positive("method.lora_alpha", m.lora_alpha)
        if m.name == "lora" and not m.lora_targets:
            raise ConfigError("method.lora_targets", "LoRA needs at least one target module name")
        if t.learning_rate is not None:
            _positive("train.learning_rate", t.learning_rate)
        if t.head_lr is not None:
            _positive("train.head_lr", t.head_lr)
        if t.max_steps <= 0:
            _positive("train.epochs", t.epochs)
        for name in ("batch_size", "eval_batch_size", "grad_accum"):
            _positive(f"train.{name}", getattr(t, name))
        if t.weight_decay < 0:
            raise ConfigError("train.weight_decay", f"must be >= 0, got {t.weight_decay}")
        if not 0.0 <= t.warmup_ratio < 1.0:
            raise ConfigError("train.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
        if t.attention_dropout is not None and not 0 <= t.attention_dropout < 1:
            raise ConfigError("train.attention_dropout", f"must be in [0, 1), got {t.attention_dropout}")
        if t.patience < 0:
            raise ConfigError("train.patience", f"must be >= 0, got {t.patience}")
        if t.eval_steps is not None:
            _positive("train.eval_steps", t.eval_steps)
        if t.threads is not None:
            _positive("train.threads", t.threads)
        if self.run_id is not None:
            from core.runs import check_run_id

            check_run_id(self.run_id, field="run_id")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(name, f"{value!r} is not one of {', '.join(choices)}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(name, f"must be > 0, got {value}")


def build_dataclass(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build any config dataclass from a mapping, with field-named errors (used for strategy options)."""
    return _build(cls, data, prefix)


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, checking field names and value types."""
    if not isinstance(data, dict):
        raise ConfigError(prefix or "config", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(where, f"unknown field; known fields here: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if value is None:
        raise ConfigError(path, "must not be empty")
    if origin is list:
        if isinstance(value, str):  # "a,b" from a flag or a terse YAML
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(path, f"expected true or false, got {value!r}")
    if hint in (int, float):
        kind = "an integer" if hint is int else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (hint is int and isinstance(value, float)):
            raise ConfigError(path, f"expected {kind}, got {value!r}")
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(path, f"expected {kind}, got {value!r}") from None
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a CoNLL column index given as a number
        if not isinstance(value, str):
            raise ConfigError(path, f"expected text, got {type(value).__name__}")
        return value
    return value
