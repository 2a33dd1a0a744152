"""Relevance scores: how much each expert group matters to a task, measured on the task's own data.

Scorers (registered by name; each returns a raw score per group, None where it does not apply):

    gradient    the group's share of the squared task gradient: sum over its parameters of the mean
                squared gradient over N task batches (the trace of the group's empirical diagonal
                Fisher), with the new (untrained) task head in place. It is the first-order loss
                decrease a gradient step on that group alone would buy, so larger groups that
                matter score higher, and tiny groups with steep but few parameters do not win by
                density alone. Expert slices count the gradient entries of their own rows/columns.
    gradient_density  the same per parameter (mean instead of sum): favours small, steep groups
                such as norms and biases; useful with the `budget` rule (best value per parameter).
    gradient_signal  the squared norm of the group's *expected* gradient, ||E g||^2, estimated without
                the batch noise: (B ||mean g||^2 - mean ||g_b||^2) / (B - 1) over B batches, at least 0.
                The Fisher trace above is ||E g||^2 plus the gradient's variance; this keeps only the
                part that a consistent descent direction buys. Needs B >= 2 and one model-sized buffer.
    gradient_adam  the first-order loss decrease of one Adam step (unit learning rate) on the group:
                sum over its parameters of mean(g)^2 / sqrt(mean(g^2)) over the batches (with one batch,
                the gradient's L1 norm: Adam's first step is lr * sign(g)). Camel trains with AdamW,
                whose steps do not scale with the gradient, so a group deep in the body with small but
                consistent gradients is worth what its consistency says, not its squared magnitude.
                Two model-sized buffers.
    activation  FFN experts only: mean absolute activation of the expert's neurons over the task's
                tokens (padding excluded), the dense analogue of ESFT's gate score. Other groups: None.
    random      a seeded uniform draw per group (the control: does scoring matter?).

Scores are normalised globally (sum to 1 over scorable groups) and per layer (sum to 1 within each
block; groups outside blocks form one scope). The head is never scored: it is always trained. Nor
are the body parts between the last block and the head (BERT's pooler, a final norm): right under
a new, random head their gradient dwarfs every block's (measured on MiniLM: the pooler holds ~40x
the squared gradient of the top block's attention), which says more about the random head than
about relevance. Camel trains them with the head; they are small.
Each pass also measures what the task complexity needs: the untrained head's loss, and a linear
probe of the frozen model's features (how much of the task a read-out alone already solves).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import GenerationMixin

from core.errors import ConfigError
from core.groups import Partition, inspect_model


@dataclass
class Scores:
    scorer: str
    raw: dict[str, float | None]  # group -> raw score (None: not scorable by this scorer)
    normalized: dict[str, float]  # global: scorable groups sum to 1
    layer_normalized: dict[str, float]  # within each layer scope
    seconds: float
    batches: int
    examples: int
    head_loss: float  # mean task loss with the untrained head
    probe: dict[str, float] = field(default_factory=dict)  # linear probe on frozen features

    def to_dict(self) -> dict[str, Any]:
        return {"scorer": self.scorer, "seconds": round(self.seconds, 3), "batches": self.batches,
                "examples": self.examples, "head_loss": self.head_loss, "probe": self.probe,
                "raw": self.raw, "normalized": self.normalized, "layer_normalized": self.layer_normalized}


SCORERS: dict[str, Callable[..., dict[str, float | None]]] = {}


def register(name: str):
    def wrap(fn):
        SCORERS[name] = fn
        return fn

    return wrap


def score_groups(model: nn.Module, part: Partition, batches: list[dict[str, torch.Tensor]], scorer: str = "gradient",
                 seed: int = 0, probe: bool = True, micro_batch: int | None = None) -> Scores:
    """Score every group of `part` on `batches` (dicts of model inputs with their targets).
    `probe`: also fit the linear probe of frozen features (class-labelled tasks only).
    `micro_batch`: gradient scorers run each batch in pieces of this many examples and add up their
    gradients, so the scores are the whole batch's (to float rounding) at a fraction of the activation
    memory, for one model-sized gradient buffer. None: whole batches."""
    if scorer not in SCORERS:
        raise ConfigError("method.scorer", f"{scorer!r} is not one of {', '.join(SCORERS)}")
    if not batches:
        raise ConfigError("method.score_batches", "no task batches to score on")
    start = time.perf_counter()
    was_training = model.training
    model.eval()  # no dropout: scores are reproducible
    features = _ProbeFeatures() if probe else None
    try:
        kwargs = {"micro_batch": micro_batch} if scorer.startswith("gradient") else {}
        raw, losses = SCORERS[scorer](model, part, batches, seed=seed, probe=features, **kwargs)
    finally:
        model.train(was_training)
    head = {g.name for g in part.groups if g.kind in ("head", "head_side")}
    raw = {name: (None if name in head else value) for name, value in raw.items()}
    fitted = features.fit(seed) if features is not None else {}
    return Scores(
        scorer=scorer,
        raw=raw,
        normalized=normalize(raw),
        layer_normalized=normalize_per_layer(raw, part),
        seconds=time.perf_counter() - start,  # the passes and the probe: all that selection needs
        batches=len(batches),
        examples=sum(int(b["input_ids"].shape[0]) for b in batches),
        head_loss=float(np.mean(losses)) if losses else float("nan"),
        probe=fitted,
    )


@contextlib.contextmanager
def head_warmed(model: nn.Module, part: Partition, batches: list[dict], steps: int, lr: float = 1e-3, seed: int = 0):
    """Train only the task head (and what feeds it) for `steps` steps on `batches`, for scoring under a
    head that already reads the task instead of a random one; the head's weights, every parameter's
    requires_grad and the model's mode are restored on exit, so training starts from the same head."""
    if steps <= 0:
        yield
        return
    params = dict(model.named_parameters())
    head = [params[n] for g in part.groups if g.kind in ("head", "head_side") for n in g.params if n in params]
    saved = [p.detach().clone() for p in head]
    flags = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    try:
        for p in params.values():
            p.requires_grad_(False)
        for p in head:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(head, lr=lr)
        torch.manual_seed(seed)  # dropout
        model.train()
        for step in range(steps):
            model(**batches[step % len(batches)]).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(head, saved):
                p.copy_(value)
                p.grad = None
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)


def normalize(raw: dict[str, float | None]) -> dict[str, float]:
    values = {k: v for k, v in raw.items() if v is not None}
    total = sum(values.values())
    if total <= 0:
        return {k: 1.0 / len(values) for k in values} if values else {}
    return {k: v / total for k, v in values.items()}


def normalize_per_layer(raw: dict[str, float | None], part: Partition) -> dict[str, float]:
    scopes: dict[Any, dict[str, float | None]] = {}
    for g in part.groups:
        if raw.get(g.name) is not None:
            scopes.setdefault(g.layer, {})[g.name] = raw[g.name]
    out: dict[str, float] = {}
    for scope in scopes.values():
        out.update(normalize(scope))
    return out


# ---- scorers ------------------------------------------------------------------------------------
@register("gradient")
def score_gradient(model: nn.Module, part: Partition, batches: list[dict], seed: int = 0,
                   probe: _ProbeFeatures | None = None, per_parameter: bool = False,
                   micro_batch: int | None = None, mode: str = "fisher") -> tuple[dict[str, float | None], list[float]]:
    """Trace of each group's empirical diagonal Fisher (per parameter with `per_parameter`); with
    mode `signal`, the noise-corrected squared norm of the mean gradient; with `adam`, the first-order
    decrease of an Adam step (see the module docstring).

    Each parameter's batch gradient is folded into its groups' sums as soon as backward has produced
    it, then freed: whole batches never hold a model-sized set of gradients or squared-gradient
    buffers. In `micro_batch` pieces, gradients accumulate until the batch's last piece, then fold."""
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    takes: dict[str, list[tuple[str, int | None, torch.Tensor | None]]] = {n: [] for n in params}  # param -> (group, dim, idx)
    for g in part.groups:
        for n in g.slices or g.params:
            dim, idx = g.slices[n] if g.slices else (None, None)
            takes[n].append((g.name, dim, None if idx is None else torch.tensor(idx, device=params[n].device)))
    totals = {g.name: 0.0 for g in part.groups}
    sums: dict[str, torch.Tensor] = {}  # signal, adam: each parameter's gradient summed over batches
    squares: dict[str, torch.Tensor] = {}  # adam: and its square
    last_piece = [True]
    if mode == "signal" and len(batches) < 2:
        raise ConfigError("method.score_batches", "the gradient_signal scorer needs at least 2 batches")

    def fold(name: str):
        def hook(p: torch.Tensor) -> None:
            if not last_piece[0]:
                return  # the batch's gradient is still being added up
            grad = p.grad.detach()
            if grad.is_sparse:  # a token embedding's: only the rows of the batch's tokens
                grad = grad.coalesce()  # repeated tokens summed, as a dense gradient would hold them
                if mode == "fisher" and all(idx is None for _, _, idx in takes[name]):
                    _add_to_groups(grad.values().float(), takes[name], totals, _sum_of_squares)
                    p.grad = None
                    return
                grad = grad.to_dense()
            grad = grad.float()
            if mode != "fisher":
                sums[name] = grad.clone() if name not in sums else sums[name].add_(grad)
            if mode == "adam":
                sq = grad ** 2
                squares[name] = sq if name not in squares else squares[name].add_(sq)
            _add_to_groups(grad, takes[name], totals, _sum_of_squares)
            p.grad = None
        return hook

    losses = []
    handles = []
    sparse = _sparse_embeddings(model) if mode == "fisher" else []
    try:
        for module in sparse:
            module.sparse = True
        for n, p in params.items():
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(fold(n)))
        causal = isinstance(model, GenerationMixin)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            pieces = split_batch(batch, micro_batch, causal)
            loss = 0.0
            for i, (piece, share) in enumerate(pieces):
                last_piece[0] = i == len(pieces) - 1
                out = model(**piece, output_hidden_states=probe is not None)
                (out.loss * share).backward()
                loss += share * float(out.loss.detach())
                if probe is not None:
                    probe.add(out, piece)
                del out  # its logits are not needed while the next piece runs
            losses.append(loss)
    finally:
        last_piece[0] = True
        for module in sparse:
            module.sparse = False
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(flags[n])
    n = len(batches)
    if mode == "adam":  # sum of mean(g)^2 / sqrt(mean(g^2))
        step = {g.name: 0.0 for g in part.groups}
        for name, total in sums.items():
            _add_to_groups((total / n) ** 2 / (squares[name] / n).sqrt().clamp_min(1e-30), takes[name], step)
        return step, losses
    if mode == "signal":  # (n ||mean g||^2 - mean ||g_b||^2) / (n - 1): unbiased for ||E g||^2
        mean_sq = {g.name: 0.0 for g in part.groups}
        for name, total in sums.items():
            _add_to_groups((total / n) ** 2, takes[name], mean_sq)
        return {g.name: max(0.0, (n * mean_sq[g.name] - totals[g.name] / n) / (n - 1))
                for g in part.groups}, losses
    return {g.name: totals[g.name] / n / (g.numel if per_parameter and g.numel else 1)
            for g in part.groups}, losses


def _add_to_groups(values: torch.Tensor, takes: list[tuple[str, int | None, torch.Tensor | None]], into: dict[str, float],
                   total: Callable[[torch.Tensor], torch.Tensor] = torch.sum) -> None:
    """Add to each group taking part of a parameter the `total` (default: the sum) of `values` (per entry
    of that parameter) over its part: the whole tensor, or its slice (dim, index)."""
    whole = None
    for group, dim, idx in takes:
        if idx is None:
            whole = float(total(values)) if whole is None else whole
            into[group] += whole
        else:
            into[group] += float(total(values.index_select(dim, idx)))


def _sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """A dot product with itself: no squared copy of the tensor."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


def _sparse_embeddings(model: nn.Module) -> list[nn.Embedding]:
    """The model's token embeddings whose gradient can be sparse while scoring: a batch touches a few
    hundred of their rows, and a dense gradient would be written, squared and summed over the whole
    vocabulary. Not those already sparse, nor a matrix tied to the output layer (its gradient is dense)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = getattr(output, "weight", None)
    return [m for m in model.modules() if isinstance(m, nn.Embedding) and not m.sparse and m.weight is not tied]


def split_batch(batch: dict[str, torch.Tensor], size: int | None, causal: bool) -> list[tuple[dict[str, torch.Tensor], float]]:
    """A collated batch in pieces of at most `size` examples, each with its share of the batch's loss.

    Models average their loss over loss terms: examples (sequence classification, QA) or labelled
    tokens (token classification; causal LMs after shifting the labels by one). A piece's share is
    its count of those terms, so the shares' weighted sum of piece losses is the batch's loss."""
    n = int(batch["input_ids"].shape[0])
    if not size or size >= n:
        return [(batch, 1.0)]
    pieces = [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]
    terms = [_loss_terms(piece, causal) for piece in pieces]
    total = sum(terms)
    if total == 0:
        return [(batch, 1.0)]
    return [(piece, t / total) for piece, t in zip(pieces, terms) if t > 0]  # no terms: no loss, no gradient


def _loss_terms(batch: dict[str, torch.Tensor], causal: bool) -> int:
    labels = batch.get("labels")
    if labels is None or labels.dim() == 1:
        return int(batch["input_ids"].shape[0])
    if causal:
        labels = labels[:, 1:]
    return int((labels != -100).sum())


@register("gradient_density")
def score_gradient_density(model: nn.Module, part: Partition, batches: list[dict], seed: int = 0,
                           probe: _ProbeFeatures | None = None, micro_batch: int | None = None) -> tuple[dict[str, float | None], list[float]]:
    """Mean squared gradient per parameter of each group."""
    return score_gradient(model, part, batches, seed, probe, per_parameter=True, micro_batch=micro_batch)


@register("gradient_signal")
def score_gradient_signal(model: nn.Module, part: Partition, batches: list[dict], seed: int = 0,
                          probe: _ProbeFeatures | None = None, micro_batch: int | None = None) -> tuple[dict[str, float | None], list[float]]:
    """Squared norm of each group's expected gradient, the batch noise taken out."""
    return score_gradient(model, part, batches, seed, probe, micro_batch=micro_batch, mode="signal")


@register("gradient_adam")
def score_gradient_adam(model: nn.Module, part: Partition, batches: list[dict], seed: int = 0,
                        probe: _ProbeFeatures | None = None, micro_batch: int | None = None) -> tuple[dict[str, float | None], list[float]]:
    """First-order loss decrease of an Adam step on each group."""
    return score_gradient(model, part, batches, seed, probe, micro_batch=micro_batch, mode="adam")


@register("activation")
def score_activation(model: nn.Module, part: Partition, batches: list[dict], seed: int = 0,
                     probe: _ProbeFeatures | None = None) -> tuple[dict[str, float | None], list[float]]:
    """Mean |activation| of each FFN expert's neurons over real (non-padding) task tokens."""
    from core.experts import find_ffns

    experts = [g for g in part.groups if g.kind == "expert"]
    if not experts:
        raise ConfigError("method.scorer", "the activation scorer scores FFN experts: use groups.strategy ffn_clusters")
    anatomy = inspect_model(model)
    ffns = {f.layer: f for f in find_ffns(model, anatomy.blocks_prefix, anatomy.num_blocks)}
    mass = {layer: torch.zeros(f.width) for layer, f in ffns.items()}
    tokens = 0
    current_mask: list[torch.Tensor] = []

    def hook_for(layer: int):
        def hook(module, args):
            act = args[0].detach().float().abs()  # (batch, seq, I): the output linear's input
            mass[layer] += (act * current_mask[0].unsqueeze(-1)).sum((0, 1))
        return hook

    handles = [model.get_submodule(f.output).register_forward_pre_hook(hook_for(f.layer)) for f in ffns.values()]
    losses = []
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).float()
                current_mask[:] = [mask]
                tokens += int(mask.sum())
                out = model(**batch, output_hidden_states=probe is not None)
                losses.append(float(out.loss))
                if probe is not None:
                    probe.add(out, batch)
    finally:
        for h in handles:
            h.remove()
    scores: dict[str, float | None] = {g.name: None for g in part.groups}
    for g in experts:
        neurons = next(iter(g.slices.values()))[1]
        scores[g.name] = float(mass[g.layer][neurons].mean()) / max(tokens, 1)
    return scores, losses


@register("random")
def score_random(model: nn.Module, part: Partition, batches: list[dict], seed: int = 0,
                 probe: _ProbeFeatures | None = None) -> tuple[dict[str, float | None], list[float]]:
    rng = random.Random(seed)
    losses = []
    with torch.no_grad():
        for batch in batches:  # the loss and probe still describe the task for the complexity figures
            out = model(**batch, output_hidden_states=probe is not None)
            losses.append(float(out.loss))
            if probe is not None:
                probe.add(out, batch)
    return {g.name: rng.random() for g in part.groups}, losses


# ---- linear probe -------------------------------------------------------------------------------
class _ProbeFeatures:
    """Frozen last-layer features and labels seen while scoring, for a quick linear probe.

    Sequence tasks: the first token's state; token tasks: the state of each labelled sub-token."""

    def __init__(self, max_rows: int = 4000):
        self.x: list[np.ndarray] = []
        self.y: list[np.ndarray] = []
        self.max_rows = max_rows

    def add(self, out: Any, batch: dict) -> None:
        if "labels" not in batch or not getattr(out, "hidden_states", None):
            return  # span (QA) and generative tasks: no class labels to probe
        hidden = out.hidden_states[-1].detach().float()  # (batch, seq, H)
        labels = batch["labels"]
        if labels.dim() == 1:
            self.x.append(hidden[:, 0].numpy())
            self.y.append(labels.numpy())
        else:
            keep = labels != -100
            self.x.append(hidden[keep].numpy())
            self.y.append(labels[keep].numpy())

    def fit(self, seed: int) -> dict[str, float]:
        """2-fold cross-validated accuracy of a logistic regression, and the majority-class accuracy."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_score

        if not self.x:
            return {}
        x = np.concatenate(self.x)[: self.max_rows]
        y = np.concatenate(self.y)[: self.max_rows]
        counts = np.bincount(y)
        majority = float(counts.max() / counts.sum())
        if len(np.unique(y)) < 2 or min(c for c in counts if c > 0) < 2:
            return {"accuracy": majority, "majority": majority, "gain": 0.0, "rows": int(len(y))}
        clf = LogisticRegression(max_iter=300, C=1.0)
        folds = 2
        accuracy = float(cross_val_score(clf, x, y, cv=folds).mean())
        gain = (accuracy - majority) / (1.0 - majority) if majority < 1.0 else 0.0
        return {"accuracy": accuracy, "majority": majority, "gain": max(0.0, min(1.0, gain)), "rows": int(len(y))}


def entropy(values: list[float]) -> float:
    """Normalised entropy in [0, 1] of a distribution (1 = flat)."""
    vals = [v for v in values if v > 0]
    if len(vals) < 2:
        return 0.0
    total = sum(vals)
    h = -sum(v / total * math.log(v / total) for v in vals)
    return h / math.log(len(values))
