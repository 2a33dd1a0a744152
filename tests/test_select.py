"""Scoring, task complexity and the selection rules; camel and random_groups runs end to end."""

from __future__ import annotations

import pytest
import torch
from test_train import batch_logits, make_config
from transformers import BertConfig, BertForSequenceClassification

from core.config import MethodConfig
from core.delta import load_run_model
from core.errors import ConfigError
from core.groups import partition
from core.runs import open_run
from core.scoring import Scores, normalize, score_groups
from core.select import budget_for, measure_complexity, select_groups
from core.train import train


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, max_position_embeddings=32, num_labels=3))


@pytest.fixture(scope="module")
def batches():
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(5, 50, (4, 10), generator=gen), "attention_mask": torch.ones(4, 10, dtype=torch.long),
             "labels": torch.randint(0, 3, (4,), generator=gen)} for _ in range(3)]


def fake_scores(part, values: dict[str, float]) -> Scores:
    raw = {g.name: (None if g.kind in ("head", "head_side") else values.get(g.name, 0.0)) for g in part.groups}
    return Scores("gradient", raw, normalize(raw), normalize(raw), 0.0, 1, 1, 1.0, {})


@pytest.fixture
def layer_part(model):
    return partition(model, "layer")


def method(**kw) -> MethodConfig:
    return MethodConfig(name="camel", **{"scope": "global", **kw})


def test_p_one_selects_every_scored_group(layer_part):
    scores = fake_scores(layer_part, {"embeddings": 1, "layer.0": 2, "layer.1": 3, "pooler": 4})
    sel = select_groups(layer_part, scores, method(rule="cumulative", p=1.0))
    assert set(sel.selected) == set(layer_part.names)


def test_groups_feeding_the_head_are_trained_with_it_unscored(model, batches):
    part = partition(model, "layer")
    assert part.group("pooler").kind == "head_side"
    scores = score_groups(model, part, batches, "gradient")
    assert scores.raw["pooler"] is None and scores.raw["head"] is None
    sel = select_groups(part, scores, method(rule="top_k", top_k=1))
    assert {"pooler", "head"} <= set(sel.selected) and len(sel.selected) == 3


def test_excluded_groups_leave_the_budget_and_threshold_to_the_others(model):
    part = partition(model, "ffn_clusters", {"experts": 4})
    names = [g.name for g in part.groups if g.kind not in ("head", "head_side")]
    values = {n: (100.0 if n.endswith("attention") else 1.0) for n in names}  # attention would fill the budget
    budget = 0.2
    sel = select_groups(part, fake_scores(part, values), method(rule="budget", budget=budget, exclude=["layer.*.attention"]))
    chosen = [c for c in sel.choices if c.selected and c.kind not in ("head", "head_side")]
    assert chosen and not any(c.name.endswith("attention") for c in chosen)
    left = [c for c in sel.choices if not c.selected and not c.name.endswith("attention") and c.kind not in ("head", "head_side")]
    used = sum(c.size for c in sel.choices if c.selected)
    assert all(used + c.size > budget * part.total_params for c in left)  # nothing else would have fit
    p_sel = select_groups(part, fake_scores(part, values), method(rule="cumulative", p=0.5, exclude=["layer.*.attention"]))
    assert sum(1 for c in p_sel.choices if c.selected and c.kind == "expert") >= 2  # p is reached on the eligible groups


def test_tiny_p_selects_only_the_top_group(layer_part):
    scores = fake_scores(layer_part, {"embeddings": 1, "layer.0": 2, "layer.1": 30})
    sel = select_groups(layer_part, scores, method(rule="cumulative", p=0.01))
    assert [c.name for c in sel.choices if c.selected and c.rank] == ["layer.1"]  # plus head and pooler
    reasons = {c.name: c.reason for c in sel.choices}
    assert reasons["head"] == "task head: always trained"
    assert "already reached p=0.010" in reasons["layer.0"]


def test_manual_exclusion_wins_over_scores_and_include_adds(layer_part):
    scores = fake_scores(layer_part, {"embeddings": 1, "layer.0": 2, "layer.1": 30})
    sel = select_groups(layer_part, scores, method(rule="cumulative", p=0.05, exclude=["layer.1"], include=["embeddings"]))
    by = {c.name: c for c in sel.choices}
    assert not by["layer.1"].selected and by["layer.1"].reason == "excluded by the user"
    assert by["embeddings"].selected and by["embeddings"].reason == "included by the user"
    with pytest.raises(ConfigError, match="always trained"):
        select_groups(layer_part, scores, method(rule="cumulative", p=0.5, exclude=["head"]))
    with pytest.raises(ConfigError, match="'layer.9' matches no group"):
        select_groups(layer_part, scores, method(rule="cumulative", p=0.5, exclude=["layer.9"]))


def test_top_k_and_budget_rules(layer_part):
    scores = fake_scores(layer_part, {"embeddings": 5, "layer.0": 2, "layer.1": 3})
    assert set(select_groups(layer_part, scores, method(rule="top_k", top_k=2)).selected) == {"embeddings", "layer.1", "pooler", "head"}
    scores = fake_scores(layer_part, {"embeddings": 5, "layer.0": 2, "layer.1": 30})
    always = sum(layer_part.group(g).numel for g in ("head", "pooler"))
    limit = layer_part.group("embeddings").numel + always
    assert layer_part.group("layer.1").numel > layer_part.group("embeddings").numel
    sel = select_groups(layer_part, scores, method(rule="budget", budget=limit / layer_part.total_params))
    by = {c.name: c for c in sel.choices}
    assert not by["layer.1"].selected and "exceed the parameter budget" in by["layer.1"].reason
    assert by["embeddings"].selected  # the next best still fits
    assert sel.selected_params <= limit


def test_depth_floor_drops_low_groups_that_add_little_and_keeps_those_that_matter(model):
    part = partition(model, "module")  # per block: attention, ffn, norm groups
    names = {g.name: g for g in part.groups}
    low = [n for n, g in names.items() if g.layer == 0 and g.kind == "norm"]
    assert low
    values = {n: (10.0 if g.layer == 1 else 0.1) for n, g in names.items()}
    values[low[0]] = 0.5  # ranks just below block 1's groups: a cumulative p of 0.99 reaches it
    scores = fake_scores(part, values)
    plain = select_groups(part, scores, method(rule="cumulative", p=0.99))
    assert low[0] in plain.selected
    floored = select_groups(part, scores, method(rule="cumulative", p=0.99, depth_keep=0.9))
    by = {c.name: c for c in floored.choices}
    assert not by[low[0]].selected and "below the depth floor (layer 1)" in by[low[0]].reason
    assert floored.settings["depth_floor"] == 1 and floored.settings["captured"] >= 0.9 * floored.settings["captured_without_floor"]
    assert all(names[n].layer in (1, None) or names[n].kind in ("head", "head_side") for n in floored.selected)
    # when the low groups carry the task, the floor stays low
    values = {n: (10.0 if g.layer == 0 else 1.0) for n, g in names.items()}
    kept = select_groups(part, fake_scores(part, values), method(rule="cumulative", p=0.9, depth_keep=0.9))
    assert any(names[n].layer == 0 for n in kept.selected)


def test_layer_scope_reaches_p_within_each_layer(model):
    part = partition(model, "module")
    values = {g.name: float(i + 1) for i, g in enumerate(part.groups)}
    sel = select_groups(part, fake_scores(part, values), MethodConfig(name="camel", rule="cumulative", p=0.3, scope="layer"))
    for layer in (0, 1):
        assert any(c.selected for c in sel.choices if c.layer == layer)


@pytest.mark.parametrize("scorer", ["gradient", "gradient_signal", "gradient_adam", "activation", "random"])
def test_scores_are_reproducible_and_cover_the_groups(model, batches, scorer):
    part = partition(model, "ffn_clusters", {"experts": 4})
    a = score_groups(model, part, batches, scorer, seed=3)
    b = score_groups(model, part, batches, scorer, seed=3)
    assert a.raw == b.raw and a.seconds > 0 and a.batches == 3
    assert a.raw["head"] is None
    scored = {n for n, v in a.raw.items() if v is not None}
    if scorer == "activation":
        assert scored == {g.name for g in part.groups if g.kind == "expert"}
    else:
        assert scored == {g.name for g in part.groups if g.kind not in ("head", "head_side")}
    assert sum(a.normalized.values()) == pytest.approx(1.0)
    assert all(p.requires_grad for p in model.parameters())  # the scorer restored the flags


def test_gradient_scorers_match_per_batch_gradients(model, batches):
    """Fisher trace, noise-corrected ||E g||^2 and the Adam-step decrease, from each batch's own gradient."""
    part = partition(model, "ffn_clusters", {"experts": 4})
    model.eval()
    grads = []
    for b in batches:
        model.zero_grad()
        model(**b).loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    n = len(batches)

    def group_sum(g, per_param):  # sum over the group's entries of per_param(name) (a full tensor)
        if g.slices:
            return sum(float(per_param(name).index_select(dim, torch.tensor(idx)).sum()) for name, (dim, idx) in g.slices.items())
        return sum(float(per_param(name).sum()) for name in g.params)

    mean = {k: sum(gr[k] for gr in grads) / n for k in grads[0]}
    mean_sq = {k: sum(gr[k] ** 2 for gr in grads) / n for k in grads[0]}
    scores = {s: score_groups(model, part, batches, s, probe=False).raw for s in ("gradient", "gradient_signal", "gradient_adam")}
    for g in part.groups:
        if g.kind in ("head", "head_side"):
            continue
        fisher = group_sum(g, lambda k: mean_sq[k])
        signal = max(0.0, (n * group_sum(g, lambda k: mean[k] ** 2) - fisher) / (n - 1))
        adam = group_sum(g, lambda k: mean[k] ** 2 / mean_sq[k].sqrt().clamp_min(1e-30))
        assert scores["gradient"][g.name] == pytest.approx(fisher, rel=1e-4, abs=1e-12), g.name
        assert scores["gradient_signal"][g.name] == pytest.approx(signal, rel=1e-3, abs=1e-9), g.name
        assert scores["gradient_adam"][g.name] == pytest.approx(adam, rel=1e-4, abs=1e-12), g.name
        assert scores["gradient_signal"][g.name] <= fisher * (1 + 1e-6)
    one = score_groups(model, part, batches[:1], "gradient_adam", probe=False).raw  # one batch: Adam's sign step, the L1 norm
    assert one["layer.0.attention"] == pytest.approx(group_sum(part.group("layer.0.attention"), lambda k: grads[0][k].abs()), rel=1e-4)
    with pytest.raises(ConfigError, match="at least 2 batches"):
        score_groups(model, part, batches[:1], "gradient_signal", probe=False)


def test_activation_scorer_needs_experts(model, batches):
    with pytest.raises(ConfigError, match="use groups.strategy ffn_clusters"):
        score_groups(model, partition(model, "layer"), batches, "activation")


def test_complexity_maps_easy_and_hard_tasks_to_different_budgets(model, batches):
    scores = score_groups(model, partition(model, "layer"), batches, "gradient")
    easy = measure_complexity(["neg", "pos"], {"neg": 50, "pos": 50}, 60000, 20.0, False,
                              Scores(**{**scores.__dict__, "probe": {"accuracy": 0.9, "majority": 0.5, "gain": 0.8}}))
    hard = measure_complexity([f"t{i}" for i in range(9)], {"t0": 80, "t1": 5}, 2000, 14.0, True,
                              Scores(**{**scores.__dict__, "probe": {"accuracy": 0.85, "majority": 0.83, "gain": 0.1}}))
    assert easy.value < hard.value
    (p_easy, b_easy), (p_hard, b_hard) = budget_for(easy.value), budget_for(hard.value)
    assert p_easy < p_hard and b_easy < b_hard
    assert budget_for(0.0) == (pytest.approx(0.2), pytest.approx(0.04)) and budget_for(5.0)[1] == pytest.approx(0.2)


def test_camel_run_trains_the_selected_experts_only(tiny_bert, sentiment_csv, tmp_path):
    from core.models import load_task_model

    config = make_config(tiny_bert, sentiment_csv, tmp_path, method="camel", run_id="camel")
    config.groups.options = {"experts": 4}
    config.method.score_batches = 2
    result = train(config, progress=False)
    run = result.run
    sel = run.read_json("selection.json")
    assert sel["rule"] == "auto" and sel["complexity"]["value"] > 0
    assert {g["name"] for g in sel["groups"]} == set(run.read_json("groups.json")["plan"]["groups"]) | {
        g["name"] for g in sel["groups"] if not g["selected"]}
    assert all(g["reason"] for g in sel["groups"])
    assert run.config().groups.strategy == "ffn_clusters"
    assert result.report["selection"]["scoring_fraction_of_epoch"] > 0
    # Unselected experts' slices and every unselected tensor are bit-identical to the base model.
    base = dict(load_task_model(run.config().model, "classification", ["neg", "pos"]).named_parameters())
    part = run.read_json("groups.json")
    selected = set(sel["selected"])
    for g in part["groups"]:
        if g["name"] in selected or g["kind"] == "head":
            continue
        params = dict(result.model.named_parameters())
        for name in g["params"]:
            if "slices" in g:
                dim, idx = g["slices"][name]["dim"], torch.tensor(g["slices"][name]["indices"])
                assert torch.equal(params[name].index_select(dim, idx), base[name].index_select(dim, idx)), (g["name"], name)
            else:
                assert torch.equal(params[name], base[name]), name
    reloaded = load_run_model(open_run("camel", tmp_path))
    assert torch.equal(batch_logits(reloaded, tiny_bert), batch_logits(result.model, tiny_bert))
    # The delta holds exactly the trained entries: expert slices as slices, with their positions.
    from safetensors.torch import load_file

    delta = load_file(run.file("delta.safetensors"))
    assert any("@index" in k for k in delta) == any(g.startswith("layer.") and ".expert." in g for g in selected)
    assert sum(v.numel() for k, v in delta.items() if "@index" not in k) == result.report["method"]["trainable"]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_random_groups_match_a_camel_run_in_size_and_groups(tiny_bert, sentiment_csv, tmp_path, scope):
    """The control draws from the groups camel chose from: with per-layer scope, camel's partition has
    attention head groups, and so has the random run's (its options come from the matched run)."""
    config = make_config(tiny_bert, sentiment_csv, tmp_path, method="camel", run_id="c", epochs=1)
    config.method.scope = scope
    camel = train(config, progress=False)
    config = make_config(tiny_bert, sentiment_csv, tmp_path, method="camel", run_id="r", epochs=1)
    config.method.name, config.method.match_run = "random_groups", "c"
    config.groups.strategy = "ffn_clusters"
    rnd = train(config, progress=False)
    target = camel.report["method"]["trainable"]
    assert rnd.run.read_json("selection.json")["rule"] == "random"
    assert rnd.report["method"]["trainable"] <= target
    assert rnd.report["method"]["trainable"] >= 0.5 * target
    names = [{g["name"] for g in run.read_json("groups.json")["groups"]} for run in (camel.run, rnd.run)]
    assert names[0] == names[1] and any(".heads." in n for n in names[0]) == (scope == "layer")
    assert rnd.run.config().groups.options == ({"attention_experts": "auto"} if scope == "layer" else {})


@pytest.mark.parametrize(("task", "scope", "options", "resolved", "heads"), [
    ("ner", "auto", {}, "layer", "auto"),
    ("qa", "auto", {}, "layer", "auto"),
    ("classification", "auto", {}, "global", None),
    ("ner", "global", {}, "global", None),
    ("classification", "layer", {}, "layer", "auto"),
    ("ner", "auto", {"attention_experts": 0}, "layer", 0),
])
def test_scope_auto_is_per_layer_with_head_groups_for_token_tasks(task, scope, options, resolved, heads):
    from core.config import RunConfig

    config = RunConfig.from_dict({"data": {"task": task, "train": "x.csv"}, "method": {"name": "camel", "scope": scope},
                                  "groups": {"options": dict(options)}})
    config.resolve()
    assert config.method.scope == resolved and config.groups.strategy == "ffn_clusters"
    assert config.groups.options.get("attention_experts") == heads


def _micro_batch_cases(llama_config):
    from transformers import BertForQuestionAnswering, BertForTokenClassification, LlamaForCausalLM

    gen = torch.Generator().manual_seed(1)
    bert = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=32, num_labels=3)
    ids = torch.randint(5, 50, (5, 10), generator=gen)
    mask = torch.ones(5, 10, dtype=torch.long)
    mask[3:, 7:] = 0  # padded rows
    tags = torch.randint(0, 3, (5, 10), generator=gen)
    tags[mask == 0] = -100
    tags[:, 0] = -100
    tags[0, :] = -100  # an example without labelled tokens
    lm_labels = torch.randint(1, 64, (5, 10), generator=gen)
    lm_labels[:, :4] = -100  # the prompt
    lm_labels[1, :] = -100
    torch.manual_seed(0)
    return [
        (BertForSequenceClassification(bert), {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (5,), generator=gen)}),
        (BertForTokenClassification(bert), {"input_ids": ids, "attention_mask": mask, "labels": tags}),
        (BertForQuestionAnswering(BertConfig(**{**bert.to_dict(), "num_labels": 2})), {"input_ids": ids, "attention_mask": mask, "start_positions": torch.tensor([0, 2, 3, 1, 5]),
                                          "end_positions": torch.tensor([0, 4, 3, 2, 6])}),
        (LlamaForCausalLM(llama_config), {"input_ids": ids, "attention_mask": mask, "labels": lm_labels}),
    ]


@pytest.mark.parametrize("case", range(4), ids=["classification", "ner", "qa", "causal_lm"])
def test_scoring_in_micro_batches_gives_the_whole_batch_scores(case, tiny_llama_config):
    net, batch = _micro_batch_cases(tiny_llama_config)[case]
    part = partition(net, "ffn_clusters", {"experts": 4})
    whole = score_groups(net, part, [batch], "gradient", probe=False)
    for size in (1, 2):
        pieces = score_groups(net, part, [batch], "gradient", probe=False, micro_batch=size)
        assert pieces.head_loss == pytest.approx(whole.head_loss, rel=1e-5)
        for name, value in whole.raw.items():
            assert (pieces.raw[name] is None) == (value is None)
            if value is not None:
                assert pieces.raw[name] == pytest.approx(value, rel=1e-4, abs=1e-12), name
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    assert not any(m.sparse for m in net.modules() if isinstance(m, torch.nn.Embedding))  # sparse only while scoring


def test_head_warmup_changes_the_scores_and_restores_the_head(model, batches):
    from core.scoring import head_warmed

    part = partition(model, "layer")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cold = score_groups(model, part, batches, "gradient", probe=False)
    model.eval()
    with head_warmed(model, part, batches, steps=20, lr=1e-2):
        warm = score_groups(model, part, batches, "gradient", probe=False)
        assert not torch.equal(model.classifier.weight, before["classifier.weight"])  # the head did learn
    assert warm.head_loss < cold.head_loss and warm.raw != cold.raw
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # every weight as it was
    assert all(p.requires_grad and p.grad is None for p in model.parameters()) and not model.training
