"""FFN-neuron experts (MoEfication-style): split each block's FFN neurons into E experts.

A dense FFN computes  out = W_out · act(W_in · x + b_in) + b_out  with I hidden neurons
(gated FFNs: act(W_gate · x) * (W_up · x)). Neuron n owns row n of every input weight (W_in, or
W_gate and W_up together), entry n of the input bias, and column n of W_out. An expert is a set of
neurons, so its parameters are *slices*: {param name: (dim, indices)}.

Clustering: balanced k-means (every expert gets I/E neurons, the remainder spread one each) over
the neurons' input-weight rows ("weights"), or over their activation patterns on a sample of task
tokens ("coactivation"). Deterministic for a seed.

Attention heads split the same way (`attention_experts`): a head group owns the rows of the query,
key and value projections for its heads and the matching columns of the output projection.

Training a slice: `slice_linears` swaps each partly trained linear for a `SlicedLinear`, which keeps
the original weight frozen and trains a separate parameter holding just the selected rows (input
linears: weight rows and bias entries) or columns (output linear). Its backward computes the weight
gradient of those rows or columns only: no full-weight gradient is materialised, the optimizer's
state covers the slices alone, and the frozen entries are never written (they stay bit-identical
whatever the optimizer does). `SliceSet.merge()` writes the trained slices back into plain linears.
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


@dataclass
class Attention:
    """The attention of one block: its query, key, value and output projections, and its heads."""

    layer: int
    query: str  # module names
    key: str
    value: str
    output: str
    heads: int
    kv_heads: int  # fewer than `heads` with grouped-query attention
    head_dim: int


ROLES = {"query": ("query", "q_proj", "q_lin", "q"), "key": ("key", "k_proj", "k_lin", "k"),
         "value": ("value", "v_proj", "v_lin", "v"), "output": ("o_proj", "out_proj", "out_lin", "dense", "o")}


def find_attentions(model: nn.Module, blocks_prefix: str, num_blocks: int) -> list[Attention]:
    """Locate each block's attention projections by their role names (BERT `query`/`key`/`value`/
    `output.dense`, Llama `q_proj`/`k_proj`/`v_proj`/`o_proj`, DistilBERT `q_lin`/.../`out_lin`) and
    its head counts from the model config. Fused projections (GPT-2's `c_attn`) are not supported."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        raise ConfigError("groups.options.attention_experts", "the model config gives no num_attention_heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    out = []
    for i in range(num_blocks):
        prefix = f"{blocks_prefix}.{i}"
        linears = {n: m for n, m in model.get_submodule(prefix).named_modules()
                   if isinstance(m, nn.Linear) and any("attn" in p or "attention" in p for p in n.lower().split("."))}
        found = {}
        for role, names in ROLES.items():
            hits = [n for n in linears if n.rsplit(".", 1)[-1] in names]
            if len(hits) != 1:
                raise ConfigError("groups.options.attention_experts", f"block {prefix}: cannot find one {role} projection "
                                  f"of its attention among {sorted(linears) or 'no linear layers'} (fused q/k/v is not supported)")
            found[role] = f"{prefix}.{hits[0]}"
        q = model.get_submodule(found["query"])
        head_dim = getattr(config, "head_dim", None) or q.out_features // heads
        if q.out_features != heads * head_dim or model.get_submodule(found["key"]).out_features != kv_heads * head_dim:
            raise ConfigError("groups.options.attention_experts", f"block {prefix}: projection sizes do not match "
                              f"{heads} heads ({kv_heads} key/value heads) of size {head_dim}")
        out.append(Attention(i, found["query"], found["key"], found["value"], found["output"], heads, kv_heads, head_dim))
    return out


def head_groups(attention: Attention, groups: int) -> list[list[int]]:
    """Split the key/value heads into `groups` contiguous, near-equal sets (query heads follow the
    key/value head they read; without grouped-query attention they are the same heads)."""
    if not 1 <= groups <= attention.kv_heads:
        raise ConfigError("groups.options.attention_experts",
                          f"must be between 1 and the number of key/value heads {attention.kv_heads}, got {groups}")
    bounds = [round(g * attention.kv_heads / groups) for g in range(groups + 1)]
    return [list(range(bounds[g], bounds[g + 1])) for g in range(groups)]


def head_slices(model: nn.Module, attention: Attention, kv_heads: list[int]) -> dict[str, tuple[int, list[int]]]:
    """The parameter slices that a set of key/value heads (and their query heads) own: the rows of
    the query, key and value projections (+ bias entries) and the columns of the output projection."""
    d, per_kv = attention.head_dim, attention.heads // attention.kv_heads
    kv_rows = [h * d + j for h in kv_heads for j in range(d)]
    q_rows = [h * d + j for kv in kv_heads for h in range(kv * per_kv, (kv + 1) * per_kv) for j in range(d)]
    slices: dict[str, tuple[int, list[int]]] = {}
    for name, rows in ((attention.query, q_rows), (attention.key, kv_rows), (attention.value, kv_rows)):
        slices[f"{name}.weight"] = (0, rows)
        if model.get_submodule(name).bias is not None:
            slices[f"{name}.bias"] = (0, rows)
    slices[f"{attention.output}.weight"] = (1, q_rows)
    return slices


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


class _SlicedLinearFn(torch.autograd.Function):
    """y = x W^T + b for a `weight` that already holds `w_slice` at `index` along `dim`.

    Backward: the input gradient through the whole weight; the weight gradient of the slice only
    (dim 0: rows, k x in; dim 1: columns, out x k); bias gradients for a bias trained whole and for a
    sliced one (`b_slice`: the entries at `index`)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, w_slice, b_slice, index, dim):
        # What the slice's weight gradient reads: the whole input for rows, only the trained input
        # columns for columns (an FFN output linear keeps k of its 4H input features, not all of them,
        # so the activation feeding it can be freed after the forward pass).
        kept = None
        if ctx.needs_input_grad[3]:
            kept = x if dim == 0 else x.index_select(-1, index)
        ctx.save_for_backward(kept, index)
        # Not a saved tensor: SlicedLinear rewrites the trained entries in place before every call
        # (the same values until the optimizer steps, which happens after backward).
        ctx.weight, ctx.dim = weight, dim
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        kept, index = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x = grad @ ctx.weight if need[0] else None
        g = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
        grad_w = None
        if need[3]:
            x2 = kept.reshape(-1, kept.shape[-1])  # (tokens, in) for rows, (tokens, k) for columns
            grad_w = g.index_select(1, index).t() @ x2 if ctx.dim == 0 else g.t() @ x2
        sums = g.sum(0) if need[2] or need[4] else None
        return (grad_x, None, sums if need[2] else None, grad_w,
                sums.index_select(0, index) if need[4] else None, None, None)


class SlicedLinear(nn.Module):
    """A linear layer whose weight is frozen except some rows (`dim` 0, with the same bias entries) or
    some columns (`dim` 1). The trained entries are the parameters `weight_slice` (and `bias_slice`);
    `weight` and `bias` are the original tensors, written at `index` from the slices before each
    forward, nowhere else (a bias may also train whole, as its own group)."""

    def __init__(self, linear: nn.Linear, dim: int, index: list[int], slice_bias: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.linear = [linear]  # kept out of the module tree: merge() puts it back in place
        self.weight, self.bias = linear.weight, linear.bias
        self.dim = dim
        self.register_buffer("index", torch.tensor(index, dtype=torch.long, device=linear.weight.device), persistent=False)
        self.weight.requires_grad_(False)
        self.weight_slice = nn.Parameter(self.weight.detach().index_select(dim, self.index).clone())
        self.bias_slice = None
        if slice_bias:
            self.bias.requires_grad_(False)
            self.bias_slice = nn.Parameter(self.bias.detach().index_select(0, self.index).clone())

    @torch.no_grad()
    def write_slices(self) -> None:
        """Copy the trained entries into the weight (and bias): k rows or columns, not the whole tensor."""
        self.weight.index_copy_(self.dim, self.index, self.weight_slice.to(self.weight.dtype))
        if self.bias_slice is not None:
            self.bias.index_copy_(0, self.index, self.bias_slice.to(self.bias.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.write_slices()
        return _SlicedLinearFn.apply(x, self.weight, self.bias, self.weight_slice, self.bias_slice, self.index, self.dim)

    def merge(self) -> nn.Linear:
        """The original linear with the trained slices written into it."""
        self.write_slices()
        return self.linear[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, trained {len(self.index)} along dim {self.dim}"


@dataclass
class SliceSet:
    """The partly trained tensors of a model: parameter name -> (dim, indices of the trained entries)."""

    model: nn.Module
    slices: dict[str, tuple[int, torch.Tensor]]
    modules: dict[str, SlicedLinear]  # module name -> its sliced stand-in while training

    def merge(self) -> None:
        """Put the original linears back with the trained slices written in (`self.slices` still says
        which entries trained: the delta, core/delta.py, saves those)."""
        for name, module in self.modules.items():
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, module.merge())
        self.modules = {}


def slice_linears(model: nn.Module, slices: list[dict[str, tuple[int, list[int]]]], whole: set[str]) -> SliceSet:
    """Train the union of `slices` (expert groups' {param: (dim, indices)}) through `SlicedLinear`s.

    Tensors in `whole` (trained whole by another group) and tensors whose slices cover every index
    are trained whole instead (`requires_grad` set here). Every sliced tensor must be the weight of a
    linear layer (rows or columns) or its bias (entries, with the weight's rows)."""
    params = dict(model.named_parameters())
    union: dict[str, tuple[int, set[int]]] = {}
    for group in slices:
        for name, (dim, idx) in group.items():
            seen = union.setdefault(name, (dim, set()))
            if seen[0] != dim:
                raise ConfigError("method.select", f"{name} is sliced along dims {seen[0]} and {dim} by different groups")
            seen[1].update(idx)
    by_module: dict[str, dict[str, tuple[int, list[int]]]] = {}
    out: dict[str, tuple[int, torch.Tensor]] = {}
    for name, (dim, idx) in union.items():
        if name in whole:
            continue
        if len(idx) == params[name].shape[dim]:
            params[name].requires_grad_(True)
            continue
        module_name, _, kind = name.rpartition(".")
        by_module.setdefault(module_name, {})[kind] = (dim, sorted(idx))
    modules: dict[str, SlicedLinear] = {}
    for module_name, kinds in by_module.items():
        linear = model.get_submodule(module_name)
        weight = kinds.get("weight")
        if not isinstance(linear, nn.Linear) or weight is None or set(kinds) - {"weight", "bias"} or (
                "bias" in kinds and (weight[0] != 0 or kinds["bias"][1] != weight[1])):
            raise ConfigError("method.select", f"{module_name}: only rows or columns of a linear layer's weight "
                              f"(rows with their bias entries) can be trained in slices; got {sorted(kinds)}")
        sliced = SlicedLinear(linear, weight[0], weight[1], slice_bias="bias" in kinds)
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent), child, sliced)
        modules[module_name] = sliced
        out[f"{module_name}.weight"] = (sliced.dim, sliced.index)
        if sliced.bias_slice is not None:
            out[f"{module_name}.bias"] = (0, sliced.index)
    return SliceSet(model, out, modules)
