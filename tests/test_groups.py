"""Partition strategies on a BERT-like encoder and a Llama-like decoder, built in-process."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForTokenClassification, LlamaForCausalLM, LlamaForSequenceClassification

from core.errors import ConfigError
from core.groups import STRATEGIES, inspect_model, partition, preview, preview_rules


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=32, num_labels=5)
    return BertForTokenClassification(cfg)


@pytest.fixture(scope="module")
def llama(tiny_llama_config):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config)


@pytest.fixture(params=["bert", "llama", "llama_cls"])
def any_model(request, bert, llama, tiny_llama_config):
    if request.param == "llama_cls":
        return LlamaForSequenceClassification(tiny_llama_config)
    return {"bert": bert, "llama": llama}[request.param]


@pytest.mark.parametrize("strategy", ["layer", "module"])
def test_every_parameter_lands_in_exactly_one_group(any_model, strategy):
    part = partition(any_model, strategy)
    names = [p for g in part.groups for p in g.params]
    assert sorted(names) == sorted(n for n, _ in any_model.named_parameters())
    assert len(names) == len(set(names))
    assert sum(g.numel for g in part.groups) == part.total_params == sum(p.numel() for p in any_model.parameters())


def test_block_list_is_found_without_model_specific_names(bert, llama):
    assert (inspect_model(bert).blocks_prefix, inspect_model(bert).num_blocks) == ("bert.encoder.layer", 3)
    assert (inspect_model(llama).blocks_prefix, inspect_model(llama).num_blocks) == ("model.layers", 2)
    assert inspect_model(bert).head == ("classifier.weight", "classifier.bias")
    assert inspect_model(llama).head == ("lm_head.weight",)


def test_layer_strategy_groups(bert, llama):
    assert partition(bert, "layer").names == ["embeddings", "layer.0", "layer.1", "layer.2", "head"]
    assert partition(llama, "layer").names == ["embed_tokens", "layer.0", "layer.1", "norm", "head"]
    block = partition(bert, "layer").group("layer.1")
    assert block.layer == 1 and all(p.startswith("bert.encoder.layer.1.") for p in block.params)


def test_module_strategy_roles_on_encoder_and_decoder(bert, llama):
    part = partition(bert, "module")
    att = part.group("layer.0.attention").params
    assert "bert.encoder.layer.0.attention.self.query.weight" in att
    assert "bert.encoder.layer.0.attention.output.dense.weight" in att
    assert set(part.group("layer.0.ffn").params) == {
        "bert.encoder.layer.0.intermediate.dense.weight", "bert.encoder.layer.0.intermediate.dense.bias",
        "bert.encoder.layer.0.output.dense.weight", "bert.encoder.layer.0.output.dense.bias"}
    assert set(part.group("layer.0.norm").params) == {
        "bert.encoder.layer.0.attention.output.LayerNorm.weight", "bert.encoder.layer.0.attention.output.LayerNorm.bias",
        "bert.encoder.layer.0.output.LayerNorm.weight", "bert.encoder.layer.0.output.LayerNorm.bias"}
    lpart = partition(llama, "module")
    assert {p.rsplit(".", 2)[-2] for p in lpart.group("layer.1.attention").params} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert {p.rsplit(".", 2)[-2] for p in lpart.group("layer.1.ffn").params} == {"gate_proj", "up_proj", "down_proj"}
    assert {p.rsplit(".", 2)[-2] for p in lpart.group("layer.1.norm").params} == {"input_layernorm", "post_attention_layernorm"}
    assert not any(g.kind == "other" and g.layer is not None for g in lpart.groups)


def test_module_strategy_can_separate_biases(bert):
    part = partition(bert, "module", {"separate_biases": True})
    assert all(p.endswith(".bias") for p in part.group("layer.2.bias").params)
    assert not any(p.endswith(".bias") for p in part.group("layer.2.attention").params)


RULES = [
    {"match": r"model\.layers\.\d+\.mlp\..*", "group": "ffn"},
    {"match": ".input_layernorm.weight", "group": "pre_norm"},
    {"match": "model.embed_tokens.weight", "group": "embed"},
]


def test_rules_strategy_suffix_regex_and_exact_names(llama):
    part = partition(llama, "rules", {"rules": RULES})
    assert len(part.group("ffn").params) == 6
    assert part.group("pre_norm").params == ("model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight")
    assert part.group("embed").params == ("model.embed_tokens.weight",)
    assert part.group("head").params == ("lm_head.weight",)
    unmatched = part.group("unmatched").params  # reported, never dropped
    assert "model.norm.weight" in unmatched and "model.layers.0.self_attn.q_proj.weight" in unmatched


def test_overlapping_rules_are_an_error_naming_both(llama):
    rules = [{"match": r"model\.layers\.0\..*", "group": "first"}, {"match": ".q_proj.weight", "group": "queries"}]
    with pytest.raises(ConfigError, match=r"rules\[1\].*'model.layers.0.self_attn.q_proj.weight' is matched by rule 0 .*first.* and rule 1 .*queries"):
        partition(llama, "rules", {"rules": rules})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rules": [{"match": "(", "group": "x"}]}, r"rules\[0\].match.*invalid regular expression"),
        ({"rules": [{"match": "x"}]}, "exactly the keys 'match' and 'group'"),
        ({"rules": []}, "at least one rule"),
        ({"rules": [{"match": ".q_proj.weight", "group": "w"}], "unmatched": "error"}, "parameters match no rule"),
        ({"rules": [{"match": "x", "group": "x"}], "colour": "red"}, "unknown option for strategy 'rules'"),
    ],
)
def test_bad_rules_name_the_problem(llama, options, message):
    with pytest.raises(ConfigError, match=message):
        partition(llama, "rules", options)


def test_unknown_strategy(bert):
    with pytest.raises(ConfigError, match="'experts' is not one of"):
        partition(bert, "experts")
    assert {"layer", "module", "rules"} <= set(STRATEGIES)


def test_previews_list_every_parameter(llama):
    part = partition(llama, "layer")
    rows = preview(llama, part)
    assert len(rows) == len(list(llama.parameters())) and all(r["group"] for r in rows)
    rp = preview_rules(llama, [{"match": r".*q_proj.*", "group": "q"}, {"match": ".0.self_attn.q_proj.weight", "group": "q0"}])
    assert rp["overlaps"] == {"model.layers.0.self_attn.q_proj.weight": [0, 1]}
    assert "lm_head.weight" in rp["unmatched"]
