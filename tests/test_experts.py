"""FFN-neuron experts: clustering covers every neuron once, and slice training keeps every
unselected entry bit-identical under AdamW with weight decay (optimizer state included)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaForCausalLM

from core.errors import ConfigError
from core.experts import balanced_kmeans, find_ffns, slice_linears
from core.groups import inspect_model, partition


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, max_position_embeddings=32))


@pytest.fixture(scope="module")
def llama(tiny_llama_config):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config)


@pytest.mark.parametrize("which", ["bert", "llama"])
@pytest.mark.parametrize("experts", [3, 4])
def test_experts_cover_every_ffn_neuron_exactly_once(bert, llama, which, experts):
    model = {"bert": bert, "llama": llama}[which]
    part = partition(model, "ffn_clusters", {"experts": experts})
    anatomy = inspect_model(model)
    for ffn in find_ffns(model, anatomy.blocks_prefix, anatomy.num_blocks):
        groups = [g for g in part.groups if g.kind == "expert" and g.layer == ffn.layer]
        neurons = [next(iter(g.slices.values()))[1] for g in groups]
        assert len(groups) == experts
        assert sorted(n for ns in neurons for n in ns) == list(range(ffn.width))
        assert max(map(len, neurons)) - min(map(len, neurons)) <= 1  # balanced
        for g in groups:  # every tensor of an expert is sliced along the same neurons
            assert {tuple(idx) for _, idx in g.slices.values()} == {tuple(neurons[groups.index(g)])}
    if which == "llama":
        names = {n.rsplit(".", 2)[-2] for n in part.group("layer.0.expert.0").slices}
        assert names == {"gate_proj", "up_proj", "down_proj"}  # gate and up rows of a neuron together


def test_clustering_is_deterministic_by_seed(bert):
    a = partition(bert, "ffn_clusters", {"experts": 4, "seed": 1})
    b = partition(bert, "ffn_clusters", {"experts": 4, "seed": 1})
    c = partition(bert, "ffn_clusters", {"experts": 4, "seed": 2})
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()


def test_balanced_kmeans_groups_similar_rows():
    torch.manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, 0.0]])
    x = torch.cat([c + 0.1 * torch.randn(10, 2) for c in centres])
    clusters = balanced_kmeans(x, 3, seed=0)
    assert sorted(map(tuple, clusters)) == [tuple(range(0, 10)), tuple(range(10, 20)), tuple(range(20, 30))]


@pytest.mark.parametrize(("options", "message"), [
    ({"experts": 0}, "must be between 1 and the FFN width"),
    ({"experts": "many"}, "groups.options.experts': expected an integer"),
    ({"features": "coactivation"}, "needs calibration batches"),
    ({"features": "colour"}, "must be 'weights' or 'coactivation'"),
])
def test_bad_expert_options(bert, options, message):
    with pytest.raises(ConfigError, match=message):
        partition(bert, "ffn_clusters", options)


def test_coactivation_clustering_uses_task_activations(bert):
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(5, 50, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}]
    part = partition(bert, "ffn_clusters", {"experts": 4, "features": "coactivation"}, calibration=batches)
    assert len([g for g in part.groups if g.kind == "expert"]) == 8
    assert part.to_dict() != partition(bert, "ffn_clusters", {"experts": 4}).to_dict()


def _copy(model):
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()  # no dropout: runs compared against each other see the same activations


def _sliced_copy(model, groups, whole=(), options=None):
    model = _copy(model)
    part = partition(model, "ffn_clusters", options or {"experts": 4})
    for name, p in model.named_parameters():
        p.requires_grad_(name in whole)
    return model, part, slice_linears(model, [part.group(g).slices for g in groups], whole=set(whole))


def _loss(model, ids):
    labels = ids if isinstance(model, LlamaForCausalLM) else torch.tensor([0, 1, 1])
    return model(input_ids=ids, labels=labels).loss


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_sliced_linears_give_the_gradients_of_the_whole_weights(bert, llama, which):
    """Slice gradients equal the selected rows / columns of the full weight gradient (bias entries
    too), a bias trained whole beside a sliced weight gets its full gradient, and the input gradient
    still flows through the whole weight (checked on the embeddings below)."""
    base = {"bert": bert, "llama": llama}[which]
    embeddings = next(n for n, _ in base.named_parameters() if "embed" in n)
    whole = [embeddings] + [n for n, _ in base.named_parameters() if n.endswith("layer.1.output.dense.bias")]
    model, part, sliced = _sliced_copy(base, ["layer.1.expert.2", "layer.1.expert.0"], whole)
    assert {type(model.get_submodule(n)).__name__ for n in sliced.modules} == {"SlicedLinear"}
    reference = _copy(base)
    ids = torch.randint(1, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    _loss(model, ids).backward()
    _loss(reference, ids).backward()
    full = dict(reference.named_parameters())
    for module_name, module in sliced.modules.items():
        expected = full[f"{module_name}.weight"].grad.index_select(module.dim, module.index)
        torch.testing.assert_close(module.weight_slice.grad, expected)
        assert module.weight.grad is None
        if module.bias_slice is not None:
            torch.testing.assert_close(module.bias_slice.grad, full[f"{module_name}.bias"].grad[module.index])
    assert (which == "bert") == any(m.bias_slice is not None for m in sliced.modules.values())
    for name, p in model.named_parameters():
        if name in whole:
            torch.testing.assert_close(p.grad, full[name].grad)
    # The delta of sliced weights and biases (sharing their indices) saves as safetensors.
    from safetensors.torch import save

    from core.delta import trained_state

    sliced.merge()
    assert save(trained_state(model, sliced.slices))


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_head_groups_own_whole_heads_and_train_as_slices(bert, llama, which):
    """Attention head groups: query rows of their heads, key/value rows of the key/value heads those
    read (grouped-query attention on the tiny Llama: 4 query heads over 2 key/value heads), output
    columns of their heads; every head in exactly one group; slice gradients equal the full ones."""
    base = {"bert": bert, "llama": llama}[which]
    options = {"experts": 4, "attention_experts": 2}
    part = partition(base, "ffn_clusters", options)
    cfg = base.config
    d = cfg.hidden_size // cfg.num_attention_heads
    per_kv = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    for layer in range(cfg.num_hidden_layers):
        groups = [g for g in part.groups if g.kind == "heads" and g.layer == layer]
        assert [g.name for g in groups] == [f"layer.{layer}.heads.0", f"layer.{layer}.heads.1"]
        q_rows = []
        for g in groups:
            by_role = {n.rsplit(".", 2)[-2]: (dim, idx) for n, (dim, idx) in g.slices.items() if n.endswith("weight")}
            q = by_role.get("q_proj") or by_role["query"]
            k = by_role.get("k_proj") or by_role["key"]
            o = by_role.get("o_proj") or by_role["dense"]
            assert q[0] == k[0] == 0 and o[0] == 1 and o[1] == q[1]
            assert len(q[1]) == per_kv * len(k[1]) and len(q[1]) % d == 0
            kv_heads = sorted({r // d for r in k[1]})
            assert sorted({r // d for r in q[1]}) == [h for kv in kv_heads for h in range(kv * per_kv, (kv + 1) * per_kv)]
            q_rows += q[1]
        assert sorted(q_rows) == list(range(cfg.hidden_size))
    # partition() checked that every parameter is in exactly one group; what the heads leave is the output bias
    rest = [g for g in part.groups if g.name == "layer.0.attention"]
    assert [list(g.params) for g in rest] == ([["bert.encoder.layer.0.attention.output.dense.bias"]] if which == "bert" else [])
    model, _, sliced = _sliced_copy(base, ["layer.1.heads.1", "layer.0.expert.1"], options=options)
    reference = _copy(base)
    ids = torch.randint(1, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    _loss(model, ids).backward()
    _loss(reference, ids).backward()
    full = dict(reference.named_parameters())
    assert len(sliced.modules) == 4 + (3 if which == "llama" else 2)  # q, k, v, o; the expert's input(s) and output
    for module_name, module in sliced.modules.items():
        torch.testing.assert_close(module.weight_slice.grad, full[f"{module_name}.weight"].grad.index_select(module.dim, module.index))
        if module.bias_slice is not None:
            torch.testing.assert_close(module.bias_slice.grad, full[f"{module_name}.bias"].grad[module.index])
    with pytest.raises(ConfigError, match="attention_experts.*between 1 and the number of key/value heads"):
        partition(base, "ffn_clusters", {"attention_experts": 5})


def _kept_input_widths(module, x):
    """Widths of the activation-shaped tensors autograd keeps for one forward and backward of `module`."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        module(x).sum().backward()
    return sorted(t.shape[-1] for t in saved if t.dim() == x.dim())


def test_a_column_slice_keeps_only_its_input_columns_for_backward():
    """What autograd keeps for a sliced linear: the whole input for rows (their weight gradient reads
    every input feature), only the k trained input columns for columns (an FFN output linear must not
    keep its whole 4H-wide input alive), nothing when the slice is not being trained."""
    from core.experts import SlicedLinear

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    for dim, index, kept_width in [(0, [1, 3], 16), (1, [0, 4, 9], 3)]:
        sliced = SlicedLinear(torch.nn.Linear(16, 8), dim, index, slice_bias=dim == 0)
        assert _kept_input_widths(sliced, x) == [kept_width]
        reference = torch.nn.Linear(16, 8)
        reference.load_state_dict({"weight": sliced.weight, "bias": sliced.bias})
        reference(x).sum().backward()
        torch.testing.assert_close(sliced.weight_slice.grad, reference.weight.grad.index_select(dim, torch.tensor(index)))
    sliced.weight_slice.requires_grad_(False)
    assert _kept_input_widths(sliced, x) == []


def test_sliced_training_keeps_unselected_entries_exact_and_saves_the_slices(llama):
    """AdamW with weight decay holds the slices alone; every other entry stays bit-identical; merging
    puts plain linears back with the same outputs, and the delta rebuilds the tuned tensors exactly."""
    model, part, sliced = _sliced_copy(llama, ["layer.1.expert.2"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("_slice")}
    trained = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trained) == part.group("layer.1.expert.2").numel
    opt = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.5)
    ids = torch.randint(1, 64, (2, 10))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    sliced.merge()
    assert not any(type(m).__name__ == "SlicedLinear" for m in model.modules())
    assert not any(n.endswith("_slice") for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)
    for name, p in model.named_parameters():
        if name in sliced.slices:
            dim, index = sliced.slices[name]
            keep = torch.ones(p.shape[dim], dtype=torch.bool)
            keep[index] = False
            assert torch.equal(p.index_select(dim, torch.nonzero(keep).flatten()),
                               before[name].index_select(dim, torch.nonzero(keep).flatten())), name
            assert not torch.equal(p.index_select(dim, index), before[name].index_select(dim, index)), name
        else:
            assert torch.equal(p, before[name]), name
    # The delta keeps the slices alone (gate/up rows, down columns) and rebuilds the tuned tensors exactly.
    from core.delta import apply_delta, trained_state

    delta = trained_state(model, sliced.slices)
    assert sum(v.numel() for k, v in delta.items() if "@index" not in k) == part.group("layer.1.expert.2").numel
    assert {k.rsplit("@index", 1)[1] for k in delta if "@index" in k} == {"0", "1"}
    fresh = _copy(llama)
    apply_delta(fresh, delta, "test")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_slices_covering_a_whole_tensor_train_it_whole(llama):
    model, part, sliced = _sliced_copy(llama, [f"layer.0.expert.{e}" for e in range(4)])
    assert sliced.modules == {} and sliced.slices == {}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(part.group("layer.0.expert.0").slices)


@pytest.mark.parametrize(("experts", "groups"), [(2, 2), (4, 4), (8, 4)])
def test_auto_head_groups_are_about_an_experts_size(experts, groups):
    """"auto": attention (4 x 32 x 32 weights) in groups of about one FFN expert's size (2 x 32 x 64 / E),
    at most one group per key/value head (4 here)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=64, max_position_embeddings=32))
    part = partition(model, "ffn_clusters", {"experts": experts, "attention_experts": "auto"})
    assert [g.name for g in part.groups if g.kind == "heads" and g.layer == 1] == [f"layer.1.heads.{a}" for a in range(groups)]
    for bad in ("many", -1):
        with pytest.raises(ConfigError, match="attention_experts.*'auto', 0"):
            partition(model, "ffn_clusters", {"attention_experts": bad})
