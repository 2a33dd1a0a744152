"""Selection: which expert groups to train, and how many, from their relevance scores.

Rules (each records, for every group, whether it is in and why):

    cumulative  ESFT's rule: take groups in order of normalised score until the cumulative score
                reaches p; globally, or within each layer (`scope="layer"`). RunConfig resolves scope
                "auto" to "layer" for token-level tasks, with attention split into head groups of an
                expert's size, and to "global" for sentence classification: measured on CoNLL-2003
                and PhraseBank (bench/findings.md), gradient scores rank the top blocks first, which
                suits a sentence read from the top but starves the lower blocks that token tasks use.
    top_k       the k best-scored groups.
    budget      best-scored groups while their parameters fit in a fraction of the model.
    auto        p and a parameter budget from the task's measured complexity (below), then
                cumulative under that budget.
Depth floor (`depth_keep`, default 0.95 under auto): backward runs down to the lowest trained group, so
a tiny norm group in block 0 costs a backward pass through the whole body. The floor is the highest
block at or above which the rule's own choice holds `depth_keep` of its score; groups below it are
not trained (their reason says so), and the rule runs again above it to spend the budget they freed.
Manual `include` / `exclude` (names or globs): excluded groups are out before the rule runs (its budget
and threshold go to the other groups) and exclusion wins over everything; included groups are added on top. The task
head is always in, and so are the body parts between the last block and the head (pooler, final
norm: see core/scoring.py), unless excluded by name.

Task complexity (`measure_complexity`), each part in [0, 1]:

    labels  log(K) / log(64) for K labels (tags for token tasks): more outputs, more to learn
    probe   1 - gain of a linear probe on the frozen model's features over the majority class:
            how much of the task a read-out of the untrained model still misses
    spread  normalised entropy of the relevance scores: flat scores mean no small set of groups
            carries the task
    value = 0.4 labels + 0.4 probe + 0.2 spread

`budget_for(value)` maps it to the rule's settings: p = 0.2 + 0.7 value, and a parameter budget of
0.04 + 0.16 value of the model (4 % for a trivial task, 20 % at most). An easy task (2-class
sentiment that a probe of MiniLM already mostly solves) therefore trains a few groups; a hard one
(9-tag NER, 27 intents) trains more.
"""

from __future__ import annotations

import fnmatch
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from core.config import MethodConfig
from core.errors import ConfigError
from core.groups import Partition, format_table
from core.scoring import Scores, entropy

WEIGHTS = {"labels": 0.4, "probe": 0.4, "spread": 0.2}


@dataclass
class Complexity:
    num_labels: int
    label_entropy: float  # normalised label entropy of the training data (1 = balanced)
    train_size: int
    mean_length: float  # tokens per training input
    token_level: bool
    head_loss: float  # task loss of the untrained head
    chance_loss: float  # log(K): the loss of a uniform guess
    probe_accuracy: float
    majority_accuracy: float
    score_spread: float
    components: dict[str, float] = field(default_factory=dict)
    value: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_complexity(labels: list[str], label_counts: dict[str, int], train_size: int, mean_length: float,
                       token_level: bool, scores: Scores) -> Complexity:
    k = len(labels)
    probe = scores.probe or {}
    components = {
        "labels": min(1.0, math.log(k) / math.log(64)),
        "probe": 1.0 - float(probe.get("gain", 0.0)),
        "spread": entropy(list(scores.normalized.values())),
    }
    value = sum(WEIGHTS[name] * v for name, v in components.items())
    return Complexity(
        num_labels=k,
        label_entropy=entropy([float(label_counts.get(lab, 0)) for lab in labels]),
        train_size=train_size,
        mean_length=round(mean_length, 2),
        token_level=token_level,
        head_loss=round(scores.head_loss, 4),
        chance_loss=round(math.log(k), 4),
        probe_accuracy=round(float(probe.get("accuracy", float("nan"))), 4),
        majority_accuracy=round(float(probe.get("majority", float("nan"))), 4),
        score_spread=round(components["spread"], 4),
        components={k: round(v, 4) for k, v in components.items()},
        value=round(value, 4),
    )


def budget_for(value: float) -> tuple[float, float]:
    """Complexity in [0, 1] -> (cumulative threshold p, parameter budget as a fraction of the model)."""
    value = min(1.0, max(0.0, value))
    return 0.2 + 0.7 * value, 0.04 + 0.16 * value


@dataclass
class Choice:
    name: str
    kind: str
    layer: int | None
    size: int
    score: float | None
    normalized: float | None
    rank: int | None
    selected: bool
    reason: str


@dataclass
class Selection:
    rule: str
    settings: dict[str, Any]
    choices: list[Choice]
    total_params: int
    complexity: Complexity | None = None
    scoring: dict[str, Any] | None = None

    @property
    def selected(self) -> list[str]:
        return [c.name for c in self.choices if c.selected]

    @property
    def selected_params(self) -> int:
        return sum(c.size for c in self.choices if c.selected)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "settings": self.settings,
            "selected": self.selected,
            "selected_params": self.selected_params,
            "selected_pct": round(100 * self.selected_params / self.total_params, 4),
            "complexity": self.complexity.to_dict() if self.complexity else None,
            "scoring": self.scoring,
            "groups": [asdict(c) for c in self.choices],
        }

    def table(self) -> str:
        rows = [("group", "kind", "params", "score", "norm", "rank", "train", "reason")]
        for c in sorted(self.choices, key=lambda c: (c.rank is None, c.rank or 0)):
            rows.append((c.name, c.kind, f"{c.size:,}", _fmt(c.score), _fmt(c.normalized),
                         str(c.rank) if c.rank else "", "yes" if c.selected else "", c.reason))
        return format_table(rows)


def select_groups(part: Partition, scores: Scores, cfg: MethodConfig, complexity: Complexity | None = None) -> Selection:
    """Apply the configured rule (and manual include/exclude) to scored groups."""
    if cfg.scope not in ("global", "layer"):
        raise ConfigError("method.scope", f"{cfg.scope!r} must be resolved to 'global' or 'layer' first (RunConfig.resolve)")
    settings: dict[str, Any] = {"scorer": scores.scorer}
    budget = cfg.budget
    if cfg.rule == "auto":
        if complexity is None:
            raise ConfigError("method.rule", "rule 'auto' needs the task complexity")
        p, auto_budget = budget_for(complexity.value)
        p = cfg.p if cfg.p is not None else p
        budget = budget if budget is not None else auto_budget
        settings.update(p=round(p, 4), budget=round(budget, 4), scope=cfg.scope, complexity=complexity.value)
        rule = "cumulative"
    else:
        rule, p = cfg.rule, cfg.p
        settings.update(p=p, budget=budget, top_k=cfg.top_k, scope=cfg.scope)
    norm = scores.layer_normalized if cfg.scope == "layer" else scores.normalized
    if cfg.rule == "top_k" or (cfg.rule == "budget" and cfg.scope != "layer"):
        norm = scores.normalized
    choices = _rank(part, scores.raw, norm)
    by_name = {c.name: c for c in choices}
    excluded = _matching(part, cfg.exclude, "method.exclude")
    if any(by_name[name].kind == "head" for name in excluded):
        raise ConfigError("method.exclude", "the task head is always trained; it cannot be excluded")
    # Excluded groups are out before the rule runs: the budget and the score threshold go to the others.
    ranked = [c for c in choices if c.rank is not None and c.name not in excluded]
    limit = budget * part.total_params if budget is not None else math.inf
    used = sum(c.size for c in choices if c.selected)  # head and head-side parts

    def run(floor: int | None) -> list[tuple[bool, str]]:
        return _apply_rule(ranked, rule, p, cfg, limit, budget, used, floor)

    decisions = run(None)
    keep = cfg.depth_keep if cfg.depth_keep is not None else 1.0
    if keep < 1.0 and ranked:
        decisions, depth = _depth_floor(ranked, run, decisions, keep)
        settings.update(depth_keep=keep, **depth)
    for c, (selected, reason) in zip(ranked, decisions):
        c.selected, c.reason = selected, reason

    for name in _matching(part, cfg.include, "method.include"):
        if not by_name[name].selected:
            by_name[name].selected, by_name[name].reason = True, "included by the user"
    for name in excluded:
        by_name[name].selected, by_name[name].reason = False, "excluded by the user"
    return Selection(rule if cfg.rule != "auto" else "auto", settings, choices, part.total_params, complexity,
                     scores.to_dict())


def _apply_rule(ranked: list[Choice], rule: str, p: float | None, cfg: MethodConfig, limit: float, budget: float | None,
                used: int, floor: int | None) -> list[tuple[bool, str]]:
    """(selected, reason) for each ranked group under the rule; groups below `floor` are not eligible."""
    out: list[tuple[bool, str]] = []
    reached: dict[Any, float] = {}
    for c in ranked:
        if floor is not None and _depth(c) < floor:
            out.append((False, f"below the depth floor (layer {floor}): would make backward run through lower layers"))
        elif rule == "cumulative":
            scope = c.layer if cfg.scope == "layer" else "all"
            so_far = reached.get(scope, 0.0)
            if so_far >= p:
                out.append((False, f"cumulative score {so_far:.3f} already reached p={p:.3f}" + (f" in layer {c.layer}" if cfg.scope == "layer" else "")))
            elif used + c.size > limit:
                out.append((False, f"would exceed the parameter budget ({budget:.1%} of the model)"))
            else:
                used, reached[scope] = used + c.size, so_far + (c.normalized or 0.0)
                out.append((True, f"rank {c.rank}: cumulative score {reached[scope]:.3f} (p={p:.3f})"))
        elif rule == "top_k":
            out.append((c.rank <= cfg.top_k, f"rank {c.rank} {'within' if c.rank <= cfg.top_k else 'outside'} top {cfg.top_k}"))
        elif used + c.size <= limit:  # budget
            used += c.size
            out.append((True, f"rank {c.rank}: fits the budget ({budget:.1%})"))
        else:
            out.append((False, f"would exceed the parameter budget ({budget:.1%} of the model)"))
    return out


def _depth(c: Choice) -> int:
    """Where a group sits for backward: its block, or -1 (below every block) for embeddings and unplaced groups."""
    return c.layer if c.layer is not None else -1


def _depth_floor(ranked: list[Choice], run, unfloored: list[tuple[bool, str]], keep: float):
    """The highest floor layer at or above which the unfloored selection's own groups hold `keep` of its score.

    Backward stops at the lowest trained group, so a low group costs a pass through every block above it,
    however small it is. Groups below the floor are dropped and the rule runs again among the groups at or
    above it, so the budget they freed goes to the next-best groups there."""
    chosen = [(c, _depth(c)) for c, (sel, _) in zip(ranked, unfloored) if sel]
    full = sum(c.normalized or 0.0 for c, _ in chosen)
    floor = min((d for _, d in chosen), default=None)
    for candidate in sorted({d for _, d in chosen}, reverse=True):
        if sum(c.normalized or 0.0 for c, d in chosen if d >= candidate) >= keep * full:
            floor = candidate
            break
    decisions = run(floor)
    captured = sum(c.normalized or 0.0 for c, (sel, _) in zip(ranked, decisions) if sel)
    return decisions, {"depth_floor": floor, "captured_without_floor": round(full, 4), "captured": round(captured, 4)}


def select_random(part: Partition, target_params: int, seed: int, cfg: MethodConfig) -> Selection:
    """Random groups whose size approaches `target_params` (the control for scoring).

    Groups are drawn in a seeded random order and kept while they fit; the head is always in."""
    choices = _rank(part, {g.name: None for g in part.groups}, {})
    excluded = set(_matching(part, cfg.exclude, "method.exclude"))
    rng = random.Random(seed)
    order = [c for c in choices if not c.selected]
    rng.shuffle(order)
    used = sum(c.size for c in choices if c.selected)
    for c in order:
        if c.name in excluded:
            c.reason = "excluded by the user"
        elif used + c.size <= target_params:
            c.selected, used = True, used + c.size
            c.reason = "drawn at random; fits the target size"
        else:
            c.reason = "drawn at random; would exceed the target size"
    return Selection("random", {"target_params": target_params, "seed": seed}, choices, part.total_params)


def _rank(part: Partition, raw: dict[str, float | None], norm: dict[str, float]) -> list[Choice]:
    """Rank scorable groups by normalised score in the rule's scope (ties: raw score)."""
    scored = sorted((g for g in part.groups if raw.get(g.name) is not None),
                    key=lambda g: (-norm.get(g.name, 0.0), -raw[g.name]))
    rank = {g.name: i + 1 for i, g in enumerate(scored)}
    choices = []
    for g in part.groups:
        always = g.kind in ("head", "head_side")
        reason = ("task head: always trained" if g.kind == "head" else
                  "feeds the task head directly: trained with it" if always else
                  "not scored by this scorer" if g.name not in rank else "")
        choices.append(Choice(name=g.name, kind=g.kind, layer=g.layer, size=g.numel, score=raw.get(g.name),
                              normalized=norm.get(g.name), rank=rank.get(g.name), selected=always, reason=reason))
    return sorted(choices, key=lambda c: (c.rank is None, c.rank or 0))


def _matching(part: Partition, patterns: list[str], field_name: str) -> list[str]:
    out = []
    for pat in patterns:
        hits = [n for n in part.names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(field_name, f"{pat!r} matches no group; groups are: {', '.join(part.names)}")
        out.extend(h for h in hits if h not in out)
    return out


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3g}"
