"""ModelConfig: the hub configs parse; what we cannot run is refused, naming file and field."""

from __future__ import annotations

import json
import os
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
        ({"rms_norm_eps": "small"}, "field 'rms_norm_eps' must be a positive finite number, not 'small'"),
        # issue 15: every field is checked for its type, finiteness and a sane size
        ({"rope_theta": float("nan")}, "field 'rope_theta' must be a finite number above 1, not nan"),
        ({"rope_theta": float("inf")}, "field 'rope_theta' must be a finite number above 1, not inf"),
        ({"rope_theta": 10**400}, "field 'rope_theta' must be a finite number above 1"),
        ({"rope_theta": True}, "field 'rope_theta' must be a finite number above 1, not True"),
        ({"rms_norm_eps": float("nan")}, "field 'rms_norm_eps' must be a positive finite number, not nan"),
        ({"rms_norm_eps": 10**400}, "field 'rms_norm_eps' must be a positive finite number"),
        ({"swiglu_limit": float("-inf")}, "field 'swiglu_limit' must be a positive finite number, not -inf"),
        ({"swiglu_limit": True}, "field 'swiglu_limit' must be a positive finite number, not True"),
        ({"rope_scaling": ["yarn"]}, "field 'rope_scaling' must be an object of rotary embedding parameters"),
        ({"rope_scaling": "yarn"}, "field 'rope_scaling' must be an object of rotary embedding parameters"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": float("nan"), "original_max_position_embeddings": 4096}},
            "field 'rope_scaling.factor' must be a positive finite number, not nan",
        ),
        (
            {
                "rope_scaling": {
                    "rope_type": "yarn",
                    "factor": 32,
                    "original_max_position_embeddings": 4096,
                    "beta_fast": float("inf"),
                }
            },
            "field 'rope_scaling.beta_fast' must be a positive finite",
        ),
        (
            {
                "rope_scaling": {
                    "rope_type": "yarn",
                    "factor": 32,
                    "original_max_position_embeddings": 4096,
                    "truncate": "no",
                }
            },
            "field 'rope_scaling.truncate' must be true or false, not 'no'",
        ),
        ({"rope_scaling": {"rope_type": ["yarn"]}}, "field 'rope_scaling.rope_type' is ['yarn']"),
        ({"layer_types": [{"a": 1}] * 24}, "unknown layer type {'a': 1}"),
        ({"layer_types": [["sliding_attention"]] * 24}, "unknown layer type ['sliding_attention']"),
        ({"layer_types": "sliding_attention"}, "field 'layer_types' must list one type for each of the 24"),
        ({"num_hidden_layers": 10**9}, "field 'num_hidden_layers' (1000000000) is beyond any gpt-oss model's"),
        ({"num_hidden_layers": True}, "field 'num_hidden_layers' must be a positive integer, not True"),
        ({"num_hidden_layers": 24.0}, "field 'num_hidden_layers' must be a positive integer, not 24.0"),
        ({"hidden_size": 2**40}, "field 'hidden_size' (1099511627776) is beyond any gpt-oss model's"),
        ({"num_local_experts": 10**12}, "field 'num_local_experts' (1000000000000) is beyond"),
        ({"vocab_size": 10**10}, "field 'vocab_size' (10000000000) is beyond"),
        ({"max_position_embeddings": 10**30}, "field 'max_position_embeddings' (10"),
        ({"tie_word_embeddings": "false"}, "field 'tie_word_embeddings' must be true or false, not 'false'"),
        ({"tie_word_embeddings": 0}, "field 'tie_word_embeddings' must be true or false, not 0"),
        ({"eos_token_id": [200002, True]}, "field 'eos_token_id' must be a token id or a list of them"),
        ({"eos_token_id": 2**40}, "field 'eos_token_id' must be a token id or a list of them"),
        ({"pad_token_id": False}, "field 'pad_token_id' (False) must be a token id"),
        ({"model_type": ["gpt_oss"] * 1000}, "field 'model_type' is a list; this is not a gpt-oss checkpoint"),
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


def test_malformed_files_are_one_clear_error(tmp_path):
    """Not UTF-8, nested too deeply for the parser, too large, or not a regular file: a ConfigError naming it."""
    path = tmp_path / "config.json"
    path.write_bytes(b'{"model_type": "gpt_oss\xff"}')
    with pytest.raises(ConfigError, match=r"config.json: not UTF-8 text \(byte 23\)"):
        ModelConfig.from_file(path)
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ConfigError, match="config.json: not valid JSON: nested too deeply"):
        ModelConfig.from_file(path)
    path.write_text(" " * (5 * 1024 * 1024) + "{}")
    with pytest.raises(ConfigError, match="config.json: 5242882 bytes, more than the 4194304"):
        ModelConfig.from_file(path)
    path.write_text('{"hidden_size": ' + "1" * 5000 + "}")  # json.loads refuses to convert so many digits
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON \(Exceeds the limit \(4300 digits\)"):
        ModelConfig.from_file(path)
    path.unlink()
    os.mkfifo(path)  # opening a FIFO for reading blocks until a writer comes: never open one
    with pytest.raises(ConfigError, match="config.json: cannot read: a FIFO, not a regular file"):
        ModelConfig.from_file(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json here"):
        ModelConfig.from_file(tmp_path / "config.json")
    with pytest.raises(ConfigError, match=r"not valid JSON \(line 1, column 2"):
        ModelConfig.from_file(write(tmp_path, "{oops"))
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelConfig.from_file(write(tmp_path, "[1, 2]"))
