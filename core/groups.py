"""Expert groups: named partitions of a model's parameters.

A strategy is a config dataclass plus a function `(model, config) -> Partition`, registered by name
(the pattern of huggingface/peft). Every parameter lands in exactly one group; parameters no rule
claims are reported in an `unmatched` group, never dropped.

Strategies:
    layer   one group per transformer block (`layer.<i>`), one per other top-level part of the body
            (BERT: `embeddings`, `pooler`; Llama: `embed_tokens`, `norm`), and `head`. Parts after the
            last block (pooler, final norm) have kind `head_side`: they feed the head directly.
    module  within each block: `layer.<i>.attention` (q/k/v/o), `layer.<i>.ffn`, `layer.<i>.norm`
            (and `layer.<i>.bias` with separate_biases); outside blocks as in `layer`.
    ffn_clusters  as `module`, but each block's FFN neurons split into E experts
            `layer.<i>.expert.<e>` (slices of the FFN weights; see core/experts.py), and with
            `attention_experts` its attention heads into groups `layer.<i>.heads.<a>`.
    rules   user rules `{match, group}`. A `match` made of a dot and name characters only
            (`.q_proj.weight`) is a suffix: it matches names ending with it. Any other `match` is a
            regular expression that must match the whole name (`layer\.\d+\.mlp\..*`); an exact
            parameter name is such a regex. Two rules matching one parameter is an error naming both.

The block list is found generically: the `nn.ModuleList` of identical modules holding the most
parameters (`bert.encoder.layer`, `model.layers`, ...), so no per-model name tables are needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.errors import ConfigError
from core.models import head_param_names

SUFFIX = re.compile(r"\.[\w.]+")  # ".q_proj.weight": a suffix rule; anything else is a regex


@dataclass(frozen=True)
class ExpertGroup:
    name: str
    kind: str  # embeddings | block | attention | ffn | norm | bias | head | head_side | other | rule | unmatched | expert | heads
    params: tuple[str, ...]  # whole tensors; for an expert, the tensors it owns slices of
    numel: int  # parameters the group owns (for an expert: the entries of its slices)
    layer: int | None = None
    slices: dict[str, tuple[int, list[int]]] | None = None  # expert: param -> (dim, indices along dim)

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "layer": self.layer, "numel": self.numel, "params": list(self.params)}
        if self.slices:
            out["slices"] = {n: {"dim": d, "indices": idx} for n, (d, idx) in self.slices.items()}
        return out


@dataclass
class Partition:
    strategy: str
    groups: list[ExpertGroup]
    total_params: int

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def group(self, name: str) -> ExpertGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def group_of(self) -> dict[str, str]:
        """Parameter name -> group name, for tensors owned whole by one group (not expert slices)."""
        return {p: g.name for g in self.groups if not g.slices for p in g.params}

    def sliced_params(self) -> dict[str, list[str]]:
        """Parameter name -> the expert groups owning slices of it."""
        out: dict[str, list[str]] = {}
        for g in self.groups:
            for p in g.slices or {}:
                out.setdefault(p, []).append(g.name)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "total_params": self.total_params, "groups": [g.to_dict() for g in self.groups]}

    def table(self, trainable: set[str] | None = None) -> str:
        """Human-readable table: one row per group."""
        rows = [("group", "kind", "tensors", "params", "% model") + (("train",) if trainable is not None else ())]
        for g in self.groups:
            row = (g.name, g.kind, str(len(g.params)), f"{g.numel:,}", f"{100 * g.numel / self.total_params:.2f}")
            if trainable is not None:
                row += ("yes" if g.name in trainable else "",)
            rows.append(row)
        return format_table(rows)


@dataclass
class ModelAnatomy:
    """Where the generic parts of a transformer are, found by structure rather than by name."""

    body_prefix: str  # "bert", "model", or "" when the model is the body itself
    blocks_prefix: str  # full name of the block ModuleList, e.g. "bert.encoder.layer"
    num_blocks: int
    head: tuple[str, ...]  # parameter names of the task head
    head_side: frozenset[str] = frozenset()  # body parameters after the last block (pooler, final norm)


def inspect_model(model: nn.Module) -> ModelAnatomy:
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not hasattr(model, prefix):
        prefix = ""
    blocks_prefix, best = "", -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) != 1:
                continue
            size = sum(p.numel() for p in module.parameters())
            if size > best:
                blocks_prefix, best = name, size
    if best <= 0:
        raise ConfigError("model.name", f"{type(model).__name__} has no list of transformer blocks to partition")
    head = tuple(head_param_names(model))
    # Body parts registered after the last block feed the head directly (BERT's pooler, a final norm).
    names = [n for n, _ in model.named_parameters()]
    last_block = max((i for i, n in enumerate(names) if n.startswith(blocks_prefix + ".")), default=-1)
    head_side = frozenset(n for n in names[last_block + 1:] if n not in head)
    return ModelAnatomy(prefix, blocks_prefix, len(model.get_submodule(blocks_prefix)), head, head_side)


# ---- registry -----------------------------------------------------------------------------------
STRATEGIES: dict[str, tuple[type, Callable[[nn.Module, Any], Partition]]] = {}


def register(name: str, config_cls: type):
    def wrap(fn: Callable[[nn.Module, Any], Partition]):
        STRATEGIES[name] = (config_cls, fn)
        return fn

    return wrap


def partition(model: nn.Module, strategy: str = "layer", options: dict[str, Any] | None = None,
              calibration: list[dict] | None = None) -> Partition:
    """Partition `model` with the strategy registered as `strategy`, configured by `options`.
    `calibration` (a few task batches) is used by strategies that look at activations."""
    if strategy not in STRATEGIES:
        raise ConfigError("groups.strategy", f"{strategy!r} is not one of {', '.join(STRATEGIES)}")
    from core.config import build_dataclass

    config_cls, fn = STRATEGIES[strategy]
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"groups.options.{unknown[0]}", f"unknown option for strategy {strategy!r}; "
                          f"known: {', '.join(sorted(known)) or 'none'}")
    config = build_dataclass(config_cls, options, "groups.options")  # checks and converts value types
    result = fn(model, config, calibration) if strategy == "ffn_clusters" else fn(model, config)
    _check_complete(model, result)
    return result


# ---- strategies ---------------------------------------------------------------------------------
@dataclass
class LayerConfig:
    pass


@dataclass
class ModuleConfig:
    separate_biases: bool = False  # biases of each block in their own `layer.<i>.bias` group


@dataclass
class FFNClustersConfig:
    experts: int = 8  # E: experts per block
    features: str = "weights"  # "weights": input-weight rows; "coactivation": activations on task data
    # split each block's attention heads into this many groups `layer.<i>.heads.<a>`; "auto": as many as make a group
    # about as large as one FFN expert (at most one per key/value head); 0: one `layer.<i>.attention` group
    attention_experts: str | int = 0
    seed: int = 0
    iters: int = 20  # balanced k-means iterations


@dataclass
class RulesConfig:
    rules: list[dict[str, str]] = field(default_factory=list)  # [{"match": regex|name|.suffix, "group": name}]
    unmatched: str = "group"  # "group": collect in `unmatched`; "error": refuse


@register("layer", LayerConfig)
def partition_layers(model: nn.Module, config: LayerConfig) -> Partition:
    anatomy = inspect_model(model)
    return _assemble(model, "layer", lambda name: _outer_group(name, anatomy, lambda i, rest: (f"layer.{i}", "block", i)))


@register("module", ModuleConfig)
def partition_modules(model: nn.Module, config: ModuleConfig) -> Partition:
    anatomy = inspect_model(model)
    role = _module_roles(model, config.separate_biases)
    return _assemble(model, "module", lambda name: _outer_group(name, anatomy, lambda i, rest: role(i, rest, name)))


@register("ffn_clusters", FFNClustersConfig)
def partition_ffn_clusters(model: nn.Module, config: FFNClustersConfig, calibration: list[dict] | None = None) -> Partition:
    """Per block: E experts `layer.<i>.expert.<e>` over the FFN neurons, plus the module groups
    (attention, norm, and `ffn` for what no neuron owns, such as the FFN output bias). With
    `attention_experts` A, the attention heads too: `layer.<i>.heads.<a>` (`attention` keeps what
    no head owns, such as the output projection's bias)."""
    from core.experts import balanced_kmeans, find_attentions, find_ffns, head_groups, head_slices, neuron_features, neuron_slices

    if config.features not in ("weights", "coactivation"):
        raise ConfigError("groups.options.features", f"must be 'weights' or 'coactivation', got {config.features!r}")
    if config.features == "coactivation" and not calibration:
        raise ConfigError("groups.options.features", "'coactivation' clusters neurons by their activations on task data; "
                          "it needs calibration batches (given when training or scoring a run)")
    anatomy = inspect_model(model)
    ffns = find_ffns(model, anatomy.blocks_prefix, anatomy.num_blocks)
    acts = _ffn_activations(model, ffns, calibration) if config.features == "coactivation" else None
    experts: list[ExpertGroup] = []
    sliced: set[str] = set()
    params = dict(model.named_parameters())
    for ffn in ffns:
        feats = acts[ffn.layer] if acts is not None else neuron_features(model, ffn)
        clusters = balanced_kmeans(feats, config.experts, seed=config.seed + ffn.layer, iters=config.iters)
        for e, neurons in enumerate(clusters):
            slices = neuron_slices(model, ffn, neurons)
            experts.append(ExpertGroup(f"layer.{ffn.layer}.expert.{e}", "expert", tuple(slices), _slice_numel(params, slices),
                                       ffn.layer, slices))
            sliced.update(slices)
    head_count = _attention_experts(config.attention_experts)
    attentions = []
    if head_count is None:
        with contextlib.suppress(ConfigError):  # unknown attention layout: its attention stays one group
            attentions = find_attentions(model, anatomy.blocks_prefix, anatomy.num_blocks)
    elif head_count > 0:
        attentions = find_attentions(model, anatomy.blocks_prefix, anatomy.num_blocks)
    if attentions:
        size = sum(g.numel for g in experts) / len(experts)  # one FFN expert's parameters
        for att in attentions:
            count = head_count
            if count is None:  # head groups about as large as an FFN expert
                whole = sum(params[f"{m}.weight"].numel() for m in (att.query, att.key, att.value, att.output))
                count = max(1, min(att.kv_heads, round(whole / size)))
            for a, kv_heads in enumerate(head_groups(att, count)):
                slices = head_slices(model, att, kv_heads)
                experts.append(ExpertGroup(f"layer.{att.layer}.heads.{a}", "heads", tuple(slices), _slice_numel(params, slices),
                                           att.layer, slices))
                sliced.update(slices)
    role = _module_roles(model, False)
    rest = _assemble(model, "ffn_clusters",
                     lambda name: _outer_group(name, anatomy, lambda i, r: role(i, r, name)), skip=sliced)
    # Keep block order: each block's experts follow its other groups.
    groups: list[ExpertGroup] = []
    for i, g in enumerate(rest.groups):
        groups.append(g)
        last_of_block = i + 1 == len(rest.groups) or rest.groups[i + 1].layer != g.layer
        if g.layer is not None and last_of_block:
            groups.extend(x for x in experts if x.layer == g.layer)
    return Partition("ffn_clusters", groups, rest.total_params)


def _slice_numel(params: dict[str, torch.Tensor], slices: dict[str, tuple[int, list[int]]]) -> int:
    """Entries owned by slices {param: (dim, indices)}."""
    return sum(len(idx) * params[n].numel() // params[n].shape[dim] for n, (dim, idx) in slices.items())


def _attention_experts(value: str | int) -> int | None:
    """The attention_experts option as a count (None: "auto")."""
    if str(value).strip().lower() == "auto":
        return None
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise ConfigError("groups.options.attention_experts", f"must be 'auto', 0 (one attention group) or a number of head groups, got {value!r}")
    return count


def _module_roles(model: nn.Module, separate_biases: bool) -> Callable[[int, str, str], tuple[str, str, int]]:
    norm_params = {
        f"{mod_name}.{p}" if mod_name else p
        for mod_name, mod in model.named_modules()
        if "norm" in type(mod).__name__.lower()
        for p, _ in mod.named_parameters(recurse=False)
    }

    def role(i: int, rest: str, full: str) -> tuple[str, str, int]:
        if separate_biases and rest.endswith(".bias") and full not in norm_params:
            return f"layer.{i}.bias", "bias", i
        if full in norm_params:
            return f"layer.{i}.norm", "norm", i
        parts = rest.lower().split(".")
        if any("attn" in p or "attention" in p for p in parts):
            return f"layer.{i}.attention", "attention", i
        if any(p in ("mlp", "intermediate", "output", "ffn", "feed_forward", "fc1", "fc2") for p in parts):
            return f"layer.{i}.ffn", "ffn", i
        return f"layer.{i}.other", "other", i

    return role


def _ffn_activations(model: nn.Module, ffns: list, calibration: list[dict], max_tokens: int = 4096) -> dict[int, torch.Tensor]:
    """(I, tokens) activation patterns of each FFN's neurons on calibration batches (unit rows)."""

    collected: dict[int, list[torch.Tensor]] = {f.layer: [] for f in ffns}
    masks: list[torch.Tensor] = []

    def hook_for(layer: int):
        def hook(module, args):
            collected[layer].append(args[0].detach().flatten(0, -2).float())  # (batch*seq, I)
        return hook

    handles = [model.get_submodule(f.output).register_forward_pre_hook(hook_for(f.layer)) for f in ffns]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in calibration:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                masks.append(inputs["attention_mask"].flatten().bool() if "attention_mask" in inputs else None)
                model(**inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for layer, chunks in collected.items():
        acts = torch.cat([c[m] if m is not None else c for c, m in zip(chunks, masks)])[:max_tokens]  # (tokens, I)
        out[layer] = torch.nn.functional.normalize(acts.T, dim=1)  # (I, tokens)
    return out


@register("rules", RulesConfig)
def partition_rules(model: nn.Module, config: RulesConfig) -> Partition:
    if config.unmatched not in ("group", "error"):
        raise ConfigError("groups.options.unmatched", f"must be 'group' or 'error', got {config.unmatched!r}")
    if not config.rules:
        raise ConfigError("groups.options.rules", "the rules strategy needs at least one rule")
    matchers = [_compile_rule(i, r) for i, r in enumerate(config.rules)]
    head = set(head_param_names(model))
    unmatched: list[str] = []

    def assign(name: str) -> tuple[str, str, int | None]:
        hits = [(i, group) for i, (match, group, test) in enumerate(matchers) if test(name)]
        if len(hits) > 1:
            (a, ga), (b, gb) = hits[:2]
            raise ConfigError(
                f"groups.options.rules[{b}]",
                f"parameter {name!r} is matched by rule {a} ({matchers[a][0]!r} -> {ga}) "
                f"and rule {b} ({matchers[b][0]!r} -> {gb}); rules must not overlap",
            )
        if hits:
            return hits[0][1], "rule", None
        if name in head:
            return "head", "head", None
        unmatched.append(name)
        return "unmatched", "unmatched", None

    result = _assemble(model, "rules", assign)
    if unmatched and config.unmatched == "error":
        more = f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        raise ConfigError("groups.options.rules", f"{len(unmatched)} parameters match no rule: {', '.join(unmatched[:5])}{more}")
    return result


# ---- previews -----------------------------------------------------------------------------------
def preview(model: nn.Module, part: Partition) -> list[dict[str, Any]]:
    """One row per parameter: name, shape, size and the group it fell in (like peft's inspect)."""
    group_of = part.group_of()
    sliced = part.sliced_params()
    return [
        {"param": n, "shape": list(p.shape), "numel": p.numel(),
         "group": group_of.get(n) or (f"sliced: {sliced[n][0]} ... {sliced[n][-1]}" if n in sliced else "")}
        for n, p in model.named_parameters()
    ]


def preview_rules(model: nn.Module, rules: list[dict[str, str]]) -> dict[str, Any]:
    """For a rule editor: what each rule matches and what nothing matches, without raising on overlap."""
    matchers = [_compile_rule(i, r) for i, r in enumerate(rules)]
    names = [n for n, _ in model.named_parameters()]
    matched = {i: [n for n in names if test(n)] for i, (_, _, test) in enumerate(matchers)}
    claimed: dict[str, list[int]] = {}
    for i, hits in matched.items():
        for n in hits:
            claimed.setdefault(n, []).append(i)
    return {
        "rules": [{"match": m, "group": g, "params": matched[i]} for i, (m, g, _) in enumerate(matchers)],
        "unmatched": [n for n in names if n not in claimed],
        "overlaps": {n: idx for n, idx in claimed.items() if len(idx) > 1},
    }


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if j == 0 or not c[:1].isdigit() else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=False))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- helpers ------------------------------------------------------------------------------------
def _outer_group(name: str, anatomy: ModelAnatomy, in_block: Callable[[int, str], tuple[str, str, int]]) -> tuple[str, str, int | None]:
    """Group of a parameter outside the per-block roles: head, block, or a named part of the body."""
    if name in anatomy.head:
        return "head", "head", None
    block = anatomy.blocks_prefix + "."
    if name.startswith(block):
        index, _, rest = name[len(block):].partition(".")
        return in_block(int(index), rest)
    rest = name[len(anatomy.body_prefix) + 1:] if anatomy.body_prefix else name
    # Skip containers of the block list ("encoder" in bert.encoder.layer): name the part itself.
    containers = anatomy.blocks_prefix[len(anatomy.body_prefix) + 1 if anatomy.body_prefix else 0:].split(".")[:-1]
    parts = rest.split(".")
    while len(parts) > 1 and containers and parts[0] == containers[0]:
        parts, containers = parts[1:], containers[1:]
    part = parts[0] if len(parts) > 1 else "other"
    kind = "head_side" if name in anatomy.head_side else "embeddings" if "embed" in part else "other"
    return part, kind, None


def _assemble(model: nn.Module, strategy: str, assign: Callable[[str], tuple[str, str, int | None]],
              skip: set[str] = frozenset()) -> Partition:
    members: dict[str, list[str]] = {}
    meta: dict[str, tuple[str, int | None]] = {}
    sizes: dict[str, int] = {}
    total = 0
    for name, param in model.named_parameters():
        if name in skip:  # owned in slices by experts
            total += param.numel()
            continue
        group, kind, layer = assign(name)
        members.setdefault(group, []).append(name)
        meta.setdefault(group, (kind, layer))
        sizes[group] = sizes.get(group, 0) + param.numel()
        total += param.numel()
    groups = [ExpertGroup(g, meta[g][0], tuple(ps), sizes[g], meta[g][1]) for g, ps in members.items()]
    return Partition(strategy, groups, total)


def _compile_rule(i: int, rule: Any) -> tuple[str, str, Callable[[str], bool]]:
    where = f"groups.options.rules[{i}]"
    if not isinstance(rule, dict) or set(rule) != {"match", "group"}:
        raise ConfigError(where, "each rule is a mapping with exactly the keys 'match' and 'group'")
    match, group = rule["match"], rule["group"]
    if not isinstance(match, str) or not match or not isinstance(group, str) or not group.strip():
        raise ConfigError(where, "'match' and 'group' must be non-empty text")
    if SUFFIX.fullmatch(match):
        return match, group, lambda name: name.endswith(match)
    try:
        pattern = re.compile(match)
    except re.error as e:
        raise ConfigError(f"{where}.match", f"invalid regular expression {match!r}: {e}") from None
    return match, group, lambda name: pattern.fullmatch(name) is not None


def _check_complete(model: nn.Module, part: Partition) -> None:
    """Every parameter entry in exactly one group: whole tensors once, expert slices covering each
    sliced tensor's indices exactly once. Selection and training rely on it."""
    params = dict(model.named_parameters())
    whole: set[str] = set()
    for g in part.groups:
        if g.slices:
            continue
        dup = whole.intersection(g.params)
        if dup:
            raise AssertionError(f"parameters in two groups: {sorted(dup)[:3]}")
        whole.update(g.params)
    covered: dict[str, list[int]] = {}
    for g in part.groups:
        for name, (_dim, idx) in (g.slices or {}).items():
            covered.setdefault(name, []).extend(idx)
    for name, idx in covered.items():
        dim = next(g.slices[name][0] for g in part.groups if g.slices and name in g.slices)
        if sorted(idx) != list(range(params[name].shape[dim])):
            raise AssertionError(f"expert slices of {name} do not cover each index exactly once")
    if whole & set(covered):
        raise AssertionError("a tensor is both whole in a group and sliced")
    if whole | set(covered) != set(params):
        raise AssertionError(f"partition misses parameters: {sorted(set(params) - whole - set(covered))[:3]}")
    if sum(g.numel for g in part.groups) != part.total_params:
        raise AssertionError("group sizes do not add up to the model size")


__all__ = ["STRATEGIES", "ExpertGroup", "Partition", "partition", "preview", "preview_rules"]
