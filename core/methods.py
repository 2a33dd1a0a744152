"""Training methods: which parameters a run trains. The same API serves the method and baselines.

    camel   groups chosen by relevance scores and the task's complexity (core/select.py), plus the head
    random_groups  random groups of a given size (the control for camel), plus the head
    groups  the expert groups named in `method.select` (names or globs), plus the head
    full    every parameter
    head    the task head only
    bitfit  every bias, plus the head
    last_n  the top `last_n` transformer blocks, plus the head
    lora    LoRA adapters (peft) on `lora_targets`, plus the head (peft `modules_to_save`)

`apply_method` freezes everything, then unfreezes what the method trains; for LoRA it returns the
peft-wrapped model. The optimizer (Trainer's) only ever receives tensors with `requires_grad`.
FFN experts are slices of tensors: `SlicedLinear`s (core/experts.py) train only the selected slices;
`Plan.slices.merge()` writes them back into plain linears after training.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from core.config import MethodConfig
from core.errors import ConfigError
from core.experts import SliceSet, slice_linears
from core.groups import Partition, inspect_model


@dataclass
class Plan:
    """What a method trains, in terms of groups of the run's partition."""

    method: str
    groups: list[str]  # groups trained whole (all methods but lora and bitfit, which cut across groups)
    trainable: int  # number of trained parameters (after wrapping, for LoRA)
    total: int  # parameters of the base model
    slices: SliceSet | None = field(default=None, repr=False)  # when experts are slices
    head_params: list[str] = field(default_factory=list, repr=False)  # names in the (wrapped) model

    def to_dict(self) -> dict:
        return {"method": self.method, "groups": self.groups, "trainable": self.trainable, "total": self.total,
                "trainable_pct": round(100 * self.trainable / self.total, 4)}


def match_groups(partition: Partition, patterns: list[str]) -> list[str]:
    """Group names matching `patterns` (exact names or shell globs like `layer.*`), in partition order."""
    chosen: list[str] = []
    for pat in patterns:
        hits = [n for n in partition.names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError("method.select", f"{pat!r} matches no group; groups are: {', '.join(partition.names)}")
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in partition.names if n in chosen]


def apply_method(model: nn.Module, partition: Partition, cfg: MethodConfig, selected: list[str] | None = None) -> tuple[nn.Module, Plan]:
    """Freeze `model`, unfreeze what `cfg` trains; return the (possibly wrapped) model and its plan.
    `selected`: the group names a selection chose (methods camel and random_groups)."""
    anatomy = inspect_model(model)
    head = set(anatomy.head)
    # A causal LM has no new head (its LM head is pretrained, often tied to the embeddings): fine.
    total = sum(p.numel() for p in model.parameters())
    group_of = partition.group_of()
    head_groups = sorted({group_of[n] for n in head})

    if cfg.name == "lora":
        return _apply_lora(model, cfg, head, total)

    slices: list[dict] = []  # expert slices of the chosen groups (trained through SlicedLinears)
    if cfg.name == "full":
        groups = partition.names
        train = {n for n, _ in model.named_parameters()}
    elif cfg.name == "head":
        groups, train = head_groups, set(head)
    elif cfg.name == "bitfit":
        groups = head_groups
        train = head | {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    elif cfg.name == "last_n":
        if cfg.last_n > anatomy.num_blocks:
            raise ConfigError("method.last_n", f"the model has {anatomy.num_blocks} blocks, asked for the last {cfg.last_n}")
        first = anatomy.num_blocks - cfg.last_n
        prefixes = tuple(f"{anatomy.blocks_prefix}.{i}." for i in range(first, anatomy.num_blocks))
        train = head | {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
        groups = sorted({group_of[n] for n in train}, key=partition.names.index)
    elif cfg.name in ("groups", "camel", "random_groups"):
        if cfg.name == "groups":
            selected = match_groups(partition, cfg.select)
        elif selected is None:
            raise ConfigError("method.name", f"method {cfg.name!r} trains the groups a selection chose; none was given")
        groups = [n for n in partition.names if n in set(selected) | set(head_groups)]
        chosen = [partition.group(g) for g in groups]
        train = {p for g in chosen if not g.slices for p in g.params} | head
        slices = [g.slices for g in chosen if g.slices]
    else:
        raise ConfigError("method.name", f"unknown method {cfg.name!r}")

    for name, param in model.named_parameters():
        param.requires_grad_(name in train)
    sliced = None
    if slices:
        sliced = slice_linears(model, slices, whole=train)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ConfigError("method.name", f"method {cfg.name!r} trains nothing on this model (it has no new task head)")
    return model, Plan(cfg.name, groups, trainable, total, sliced, sorted(head))


def _apply_lora(model: nn.Module, cfg: MethodConfig, head: set[str], total: int) -> tuple[nn.Module, Plan]:
    from peft import LoraConfig, get_peft_model

    module_names = {n for n, _ in model.named_modules()}
    missing = [t for t in cfg.lora_targets if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError("method.lora_targets", f"no module named {', '.join(map(repr, missing))}; linear modules are named: {', '.join(linear)}")
    # The head's modules are trained in full (peft keeps a trainable copy: `modules_to_save`).
    head_modules = sorted({n.rsplit(".", 1)[0] for n in head})
    for _name, param in model.named_parameters():
        param.requires_grad_(False)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), modules_to_save=head_modules)
    wrapped = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    head_params = [n for n, p in wrapped.named_parameters() if p.requires_grad and "modules_to_save" in n]
    return wrapped, Plan("lora", [], trainable, total, None, head_params)
