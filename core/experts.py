"""FFN-neuron experts (MoEfication-style): split each block's FFN neurons into E experts.

A dense FFN computes  out = W_out · act(W_in · x + b_in) + b_out  with I hidden neurons
(gated FFNs: act(W_gate · x) * (W_up · x)). Neuron n owns row n of every input weight (W_in, or
W_gate and W_up together), entry n of the input bias, and column n of W_out. An expert is a set of
neurons, so its parameters are *slices*: {param name: (dim, indices)}.

Clustering: balanced k-means (every expert gets I/E neurons, the remainder spread one each) over
the neurons' input-weight rows ("weights"), or over their activation patterns on a sample of task
tokens ("coactivation"). Deterministic for a seed.

Training a slice: `SliceMask` zeroes the gradient outside selected slices (so Adam's moments stay
exactly zero there) and, after every optimizer step, writes the frozen entries back: decoupled
weight decay (AdamW decays every tensor it holds) can therefore never move them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.errors import ConfigError


@dataclass
class FFN:
    """The FFN of one block, found by shape: input linears H -> I, one output linear I -> H."""

    layer: int
    inputs: list[str]  # module names of the input linears (W_in, or W_gate and W_up)
    output: str  # module name of the output linear (W_out)
    width: int  # I: number of neurons


def find_ffns(model: nn.Module, blocks_prefix: str, num_blocks: int) -> list[FFN]:
    """Locate each block's FFN by shapes, not names: I is the widest output of a linear reading the
    hidden state (H -> I, I > H); the output linear maps I -> H."""
    ffns = []
    for i in range(num_blocks):
        prefix = f"{blocks_prefix}.{i}"
        block = model.get_submodule(prefix)
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        if not linears:
            raise ConfigError("groups.strategy", f"block {prefix} has no linear layers to split into experts")
        hidden = _hidden_size(model, linears)
        width = max((m.out_features for m in linears.values() if m.in_features == hidden), default=0)
        if width <= hidden:
            raise ConfigError("groups.strategy", f"block {prefix}: no FFN wider than the hidden size {hidden} was found")
        inputs = [n for n, m in linears.items() if m.in_features == hidden and m.out_features == width]
        outputs = [n for n, m in linears.items() if m.in_features == width and m.out_features == hidden]
        if len(outputs) != 1 or not 1 <= len(inputs) <= 2:
            raise ConfigError("groups.strategy", f"block {prefix}: cannot tell the FFN apart "
                              f"(inputs {inputs}, outputs {outputs})")
        ffns.append(FFN(i, [f"{prefix}.{n}" for n in inputs], f"{prefix}.{outputs[0]}", width))
    return ffns


def _hidden_size(model: nn.Module, linears: dict[str, nn.Linear]) -> int:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "hidden_size", None):
        return int(config.hidden_size)
    # Most common input size of the block's linears is the hidden size.
    sizes = [m.in_features for m in linears.values()]
    return max(set(sizes), key=sizes.count)


def neuron_slices(model: nn.Module, ffn: FFN, neurons: list[int]) -> dict[str, tuple[int, list[int]]]:
    """The parameter slices that neurons own: input rows (+ bias entries), output columns."""
    slices: dict[str, tuple[int, list[int]]] = {}
    for name in ffn.inputs:
        module = model.get_submodule(name)
        slices[f"{name}.weight"] = (0, neurons)
        if module.bias is not None:
            slices[f"{name}.bias"] = (0, neurons)
    slices[f"{ffn.output}.weight"] = (1, neurons)
    return slices


def neuron_features(model: nn.Module, ffn: FFN) -> torch.Tensor:
    """(I, d) features for weight clustering: the neuron's input-weight rows, unit-normalised."""
    rows = torch.cat([model.get_submodule(n).weight.detach().float() for n in ffn.inputs], dim=1)  # (I, H * inputs)
    return torch.nn.functional.normalize(rows, dim=1)


def balanced_kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 20) -> list[list[int]]:
    """Split the rows of x (n, d) into k clusters of sizes n//k or n//k + 1, grouping similar rows.

    Lloyd's iterations with a capacity-constrained assignment step: all (row, centre) pairs are
    taken in order of distance and a row goes to the nearest centre that still has room.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ConfigError("groups.options.experts", f"must be between 1 and the FFN width {n}, got {k}")
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(n, generator=gen)[:k]].clone()  # (k, d)
    capacity = torch.full((k,), n // k, dtype=torch.long)
    capacity[: n % k] += 1
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(x, centres)  # (n, k)
        order = torch.argsort(dist.flatten(), stable=True).tolist()
        room = capacity.tolist()
        new = [-1] * n
        placed = 0
        for flat in order:  # plain Python ints: this loop is the hot part
            row, centre = divmod(flat, k)
            if new[row] < 0 and room[centre] > 0:
                new[row] = centre
                room[centre] -= 1
                placed += 1
                if placed == n:
                    break
        new_t = torch.tensor(new, dtype=torch.long)
        if torch.equal(new_t, assign):
            break
        assign = new_t
        for c in range(k):
            centres[c] = x[assign == c].mean(0)
    return [sorted(torch.nonzero(assign == c).flatten().tolist()) for c in range(k)]


class SliceMask:
    """Train only some slices of some tensors; keep every other entry bit-identical.

    `masks`: parameter name -> bool tensor of the parameter's shape (True = trainable entry).
    Installing registers gradient hooks; call `restore()` after each optimizer step.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        self.params = {n: params[n] for n in masks}
        self.masks = {n: m.to(params[n].device) for n, m in masks.items()}
        self.frozen = {n: params[n].detach().clone() for n in masks}  # values the masked entries keep
        for p in self.params.values():
            p.requires_grad_(True)
        self.handles = [p.register_hook(_mask_grad(self.masks[n])) for n, p in self.params.items()]

    @torch.no_grad()
    def restore(self) -> None:
        for name, param in self.params.items():
            param.copy_(torch.where(self.masks[name], param, self.frozen[name]))

    def trainable_count(self) -> int:
        return int(sum(m.sum().item() for m in self.masks.values()))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _mask_grad(mask: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * mask

    return hook


def slice_masks(model: nn.Module, slices: list[dict[str, tuple[int, list[int]]]]) -> dict[str, torch.Tensor]:
    """Union of slice sets as boolean masks per parameter."""
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for group in slices:
        for name, (dim, idx) in group.items():
            mask = masks.setdefault(name, torch.zeros_like(params[name], dtype=torch.bool))
            index = torch.tensor(idx, dtype=torch.long)
            mask.index_fill_(dim, index, True)
    return masks
