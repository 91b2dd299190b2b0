"""ModelConfig: the hub configs parse; what we cannot run is refused, naming file and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_oss import ConfigError, ModelConfig
from mlx_oss.converters.synthetic import PRESETS

DATA = Path(__file__).parent / "data"


def hub_config() -> dict:
    return json.loads((DATA / "gpt-oss-20b.config.json").read_text())


def test_gpt_oss_20b_and_120b_configs():
    small = ModelConfig.from_file(DATA / "gpt-oss-20b.config.json")
    big = ModelConfig.from_file(DATA / "gpt-oss-120b.config.json")
    assert (small.num_hidden_layers, small.num_local_experts) == (24, 32)
    assert (big.num_hidden_layers, big.num_local_experts) == (36, 128)
    for c in (small, big):
        assert c.num_experts_per_tok == 4 and c.q_size == 4096 and c.kv_size == 512
        assert c.is_sliding(0) and not c.is_sliding(1)
        assert c.rope.kind == "yarn" and c.rope.factor == 32 and c.rope.truncate is False
        assert c.eos_token_id == (200002,) and c.pad_token_id == 199999
    assert small == PRESETS["20b"] and big == PRESETS["120b"]


def test_hub_spelling_round_trips():
    config = ModelConfig.from_file(DATA / "gpt-oss-20b.config.json")
    assert ModelConfig.from_dict(config.to_hf_dict()) == config


def test_transformers_rope_parameters_spelling_is_read():
    raw = hub_config()
    rope = raw.pop("rope_scaling") | {"rope_theta": raw.pop("rope_theta")}
    assert ModelConfig.from_dict(raw | {"rope_parameters": rope}) == ModelConfig.from_dict(hub_config())


def test_missing_truncate_means_truncated_as_in_transformers():
    raw = hub_config()
    del raw["rope_scaling"]["truncate"]
    assert ModelConfig.from_dict(raw).rope.truncate is True


def write(tmp_path: Path, raw) -> Path:
    path = tmp_path / "config.json"
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "field 'model_type' is 'llama'; this is not a gpt-oss checkpoint"),
        ({"hidden_size": None}, "field 'hidden_size' is missing"),
        ({"num_hidden_layers": 0}, "field 'num_hidden_layers' must be a positive integer, not 0"),
        ({"num_key_value_heads": 7}, "field 'num_key_value_heads' (7) must divide num_attention_heads (64)"),
        ({"num_experts_per_tok": 40}, "field 'num_experts_per_tok' (40) exceeds num_local_experts (32)"),
        ({"hidden_size": 2890}, "field 'hidden_size' (2890) must be a multiple of 32"),
        ({"layer_types": ["sliding_attention"] * 3}, "field 'layer_types' must list one type for each of the 24"),
        ({"layer_types": ["sliding_attention"] * 23 + ["chunked"]}, "unknown layer type 'chunked'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2}}, "field 'rope_scaling.rope_type' is 'linear'"),
        ({"rope_scaling": {"rope_type": "yarn"}}, "field 'rope_scaling.factor' is missing"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quant_method 'gptq'; only 'mxfp4'"),
        ({"attention_bias": False}, "field 'attention_bias' must be true"),
        ({"pad_token_id": 300000}, "field 'pad_token_id' (300000) must be a token id below vocab_size"),
        ({"rms_norm_eps": "small"}, "field 'rms_norm_eps' must be a positive number"),
    ],
)
def test_bad_fields_are_named(tmp_path, change, message):
    raw = hub_config()
    for key, value in change.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_file(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json here"):
        ModelConfig.from_file(tmp_path / "config.json")
    with pytest.raises(ConfigError, match=r"not valid JSON \(line 1, column 2"):
        ModelConfig.from_file(write(tmp_path, "{oops"))
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelConfig.from_file(write(tmp_path, "[1, 2]"))
