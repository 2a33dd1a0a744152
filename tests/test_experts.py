"""FFN-neuron experts: clustering covers every neuron once, and slice training keeps every
unselected entry bit-identical under AdamW with weight decay (optimizer state included)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaForCausalLM

from core.errors import ConfigError
from core.experts import SliceMask, balanced_kmeans, find_ffns, slice_masks
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


def test_slice_mask_keeps_unselected_entries_and_adam_state_exact(llama):
    """AdamW decays every tensor it holds: masked entries must still not move, and their moments stay 0."""
    model = LlamaForCausalLM(llama.config)
    model.load_state_dict(llama.state_dict())
    part = partition(model, "ffn_clusters", {"experts": 4})
    chosen = [part.group("layer.1.expert.2").slices]
    for p in model.parameters():
        p.requires_grad_(False)
    mask = SliceMask(model, slice_masks(model, chosen))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    ids = torch.randint(1, 64, (2, 10))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        mask.restore()
        opt.zero_grad()
    for name, p in model.named_parameters():
        if name in mask.masks:
            m = mask.masks[name]
            assert torch.equal(p[~m], before[name][~m]), name
            assert not torch.equal(p[m], before[name][m]), name
            state = opt.state[p]
            assert torch.count_nonzero(state["exp_avg"][~m]) == 0 and torch.count_nonzero(state["exp_avg_sq"][~m]) == 0
        else:
            assert torch.equal(p, before[name]), name
    assert mask.trainable_count() == part.group("layer.1.expert.2").numel
    # The delta keeps the slices alone (gate/up rows, down columns) and rebuilds the tuned tensors exactly.
    from core.delta import apply_delta, trained_state

    delta = trained_state(model, mask.masks)
    assert sum(v.numel() for k, v in delta.items() if "@index" not in k) == mask.trainable_count()
    assert {k.rsplit("@index", 1)[1] for k in delta if "@index" in k} == {"0", "1"}
    fresh = LlamaForCausalLM(llama.config)
    fresh.load_state_dict(llama.state_dict())
    apply_delta(fresh, delta, "test")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
