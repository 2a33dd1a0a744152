"""RunConfig: JSON/YAML round trip and validation that names the bad field."""

from __future__ import annotations

import pytest

from core.config import RunConfig
from core.errors import ConfigError


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_round_trips(tmp_path, suffix):
    cfg = RunConfig.from_dict({"data": {"task": "ner", "train": "t.txt"}, "method": {"name": "lora", "lora_r": 4},
                               "groups": {"strategy": "rules", "options": {"rules": [{"match": ".bias", "group": "b"}]}},
                               "train": {"learning_rate": 1e-3}})
    path = tmp_path / f"c{suffix}"
    cfg.dump(path)
    assert RunConfig.load(path) == cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"lerning_rate": 1}}, r"'train.lerning_rate': unknown field"),
        ({"train": {"epochs": "three"}}, r"'train.epochs': expected a number"),
        ({"train": {"batch_size": 0}}, r"'train.batch_size': must be > 0"),
        ({"train": {"batch_size": True}}, r"'train.batch_size': expected an integer"),
        ({"data": {"task": "summarise"}}, r"'data.task': 'summarise' is not one of"),
        ({"method": {"name": "groups", "select": []}}, r"'method.select': method 'groups' needs"),
        ({"data": {"validation_fraction": 1.5}}, r"'data.validation_fraction': must be in \[0, 1\)"),
        ({"run_id": "../etc"}, r"'run_id': '../etc' is not a valid run id"),
        ({"model": "minilm"}, r"'model': expected a mapping"),
        ({"method": {"depth_keep": 1.5}}, r"'method.depth_keep': a share of the selection's score in \(0, 1\]"),
        ({"method": {"score_micro_batch": 0}}, r"'method.score_micro_batch': must be > 0"),
        ({"method": {"score_warmup": -1}}, r"'method.score_warmup': a number of steps >= 0"),
        ({"method": {"select": "layer.1, layer.2"}}, None),
    ],
)
def test_bad_values_name_their_field(data, message):
    if message is None:
        assert RunConfig.from_dict(data).method.select == ["layer.1", "layer.2"]
        return
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(data)


def test_invalid_yaml_file_is_reported(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="c.yaml is not valid YAML"):
        RunConfig.load(path)


def test_depth_floor_is_on_for_auto_selection_only():
    def resolved(method: dict) -> float | None:
        config = RunConfig.from_dict({"method": method})
        config.resolve()
        return config.method.depth_keep

    assert resolved({}) == 0.95
    assert resolved({"rule": "top_k", "top_k": 2}) == 1.0
    assert resolved({"depth_keep": 0.5}) == 0.5


def test_scoring_runs_dialogue_in_pieces_of_two_by_default():
    def resolved(data: dict, method: dict | None = None) -> int | None:
        config = RunConfig.from_dict({"data": data, "method": method or {}, "train": {"batch_size": 8}})
        config.resolve()
        return config.method.score_micro_batch

    assert resolved({"task": "dialogue"}) == 2
    assert resolved({"task": "ner"}) == 8  # whole batches
    assert resolved({"task": "dialogue"}, {"score_micro_batch": 4}) == 4


def test_method_default_learning_rates():
    assert RunConfig.from_dict({"method": {"name": "full"}}).learning_rate == 5e-5
    assert RunConfig.from_dict({"method": {"name": "lora"}}).learning_rate == 1e-3
    assert RunConfig.from_dict({"method": {"name": "lora"}, "train": {"learning_rate": 0.01}}).learning_rate == 0.01
