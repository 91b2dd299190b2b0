"""`ModelConfig`: the shape of a gpt-oss model, read from a Hugging Face `config.json`.

The hub configs of gpt-oss-20b and gpt-oss-120b use the transformers field names
(`num_local_experts`, `rope_scaling`, `rope_theta`); newer transformers writes `rope_parameters`
instead of the last two. Both spellings are read. Anything we could not run correctly is refused
with a message naming the file and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .regular_files import read_json

SLIDING = "sliding_attention"
FULL = "full_attention"
MXFP4_BLOCK = 32  # values per MXFP4 block along the input dimension
MAX_CONFIG_BYTES = 4 * 1024 * 1024  # gpt-oss's config.json is 2 KB

# Upper bounds, far above gpt-oss-120b's (36 layers, hidden 2880, 128 experts, vocabulary 201088), so that a
# config cannot make us build gigantic per-layer tables or tensor lists before its tensors are checked.
LIMITS = {
    "num_hidden_layers": 1024,
    "hidden_size": 65536,
    "intermediate_size": 262144,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "num_local_experts": 4096,
    "num_experts_per_tok": 4096,
    "vocab_size": 1 << 24,
    "sliding_window": 1 << 24,
    "max_position_embeddings": 1 << 24,
    "original_max_position_embeddings": 1 << 24,
}
MAX_TOKEN_ID = (1 << 31) - 1


def alternating_layer_types(layers: int) -> tuple[str, ...]:
    """gpt-oss's layer pattern: sliding-window attention on even layers, full attention on odd ones (the reference
    model's rule, and what a config without `layer_types` means)."""
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(layers))


# config.json's `quantization_config` in the published checkpoints: MXFP4 experts, the rest as it is.
MXFP4_QUANTIZATION = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


@dataclass(frozen=True)
class RopeConfig:
    """YaRN rotary embedding parameters (or plain RoPE when `kind == "default"`)."""

    theta: float = 150000.0
    kind: str = "yarn"
    factor: float = 32.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = False


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rope: RopeConfig
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    eos_token_id: tuple[int, ...] = (200002,)
    pad_token_id: int | None = 199999

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        raw = read_json(path, MAX_CONFIG_BYTES, ConfigError, "no config.json here; is this a gpt-oss model directory?")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        return _Reader(raw, source).config()

    def to_hf_dict(self) -> dict[str, Any]:
        """The config in the hub's own spelling, as gpt-oss-20b's config.json writes it."""
        rope: dict[str, Any] = {"rope_type": self.rope.kind}
        if self.rope.kind == "yarn":
            rope.update(
                factor=self.rope.factor,
                original_max_position_embeddings=self.rope.original_max_position_embeddings,
                beta_fast=self.rope.beta_fast,
                beta_slow=self.rope.beta_slow,
                truncate=self.rope.truncate,
            )
        eos = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "experts_per_token": self.num_experts_per_tok,
            "num_experts_per_tok": self.num_experts_per_tok,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.rope.original_max_position_embeddings,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_local_experts,
            "output_router_logits": False,
            "quantization_config": MXFP4_QUANTIZATION,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": rope,
            "rope_theta": self.rope.theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }


_MISSING = object()


class _Reader:
    """Reads and checks one raw config dict, naming `source` and the field in every error."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw = raw
        self.source = source

    def fail(self, field: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: field '{field}' {problem}")

    def get(self, *names: str, default: Any = _MISSING) -> tuple[str, Any]:
        for name in names:
            if name in self.raw and self.raw[name] is not None:
                return name, self.raw[name]
        if default is _MISSING:
            raise self.fail(names[0], "is missing")
        return names[0], default

    def positive_int(self, *names: str, default: Any = _MISSING) -> int:
        name, value = self.get(*names, default=default)
        limit = LIMITS.get(name, LIMITS.get(names[0], MAX_TOKEN_ID))
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(name, f"must be a positive integer, not {_show(value)}")
        if value > limit:
            raise self.fail(name, f"({_show(value)}) is beyond any gpt-oss model's (at most {limit})")
        return value

    def positive_float(self, *names: str, default: Any = _MISSING) -> float:
        name, value = self.get(*names, default=default)
        number = _finite(value)
        if number is None or not number > 0:
            raise self.fail(name, f"must be a positive finite number, not {_show(value)}")
        return number

    def boolean(self, name: str, default: bool) -> bool:
        _, value = self.get(name, default=default)
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, not {_show(value)}")
        return value

    def config(self) -> ModelConfig:
        _, model_type = self.get("model_type", default=None)
        if model_type != "gpt_oss":
            found = "is missing" if model_type is None else f"is {_show(model_type)}"
            raise self.fail("model_type", f"{found}; this is not a gpt-oss checkpoint (expected 'gpt_oss')")

        hidden = self.positive_int("hidden_size")
        layers = self.positive_int("num_hidden_layers")
        heads = self.positive_int("num_attention_heads")
        kv_heads = self.positive_int("num_key_value_heads")
        head_dim = self.positive_int("head_dim", default=hidden // heads if hidden % heads == 0 else 0)
        intermediate = self.positive_int("intermediate_size")
        experts = self.positive_int("num_local_experts", "num_experts")
        top_k = self.positive_int("num_experts_per_tok", "experts_per_token")
        vocab = self.positive_int("vocab_size")
        window = self.positive_int("sliding_window", default=128)

        if heads % kv_heads:
            raise self.fail("num_key_value_heads", f"({kv_heads}) must divide num_attention_heads ({heads})")
        if head_dim % 2:
            raise self.fail("head_dim", f"must be even for rotary embeddings, not {head_dim}")
        if top_k > experts:
            raise self.fail("num_experts_per_tok", f"({top_k}) exceeds num_local_experts ({experts})")
        for name, size in (("hidden_size", hidden), ("intermediate_size", intermediate)):
            if size % MXFP4_BLOCK:
                raise self.fail(name, f"({size}) must be a multiple of {MXFP4_BLOCK}, the MXFP4 block size")

        _, pad = self.get("pad_token_id", default=None)
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < vocab):
            raise self.fail("pad_token_id", f"({_show(pad)}) must be a token id below vocab_size ({vocab})")

        _, attention_bias = self.get("attention_bias", default=True)
        if attention_bias is not True:
            raise self.fail("attention_bias", "must be true: gpt-oss attention projections have biases")

        quant = self.raw.get("quantization_config")
        if quant is not None:
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            if method != "mxfp4":
                raise self.fail("quantization_config", f"has quant_method {_show(method)}; only 'mxfp4' is supported")

        return ModelConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=intermediate,
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            sliding_window=window,
            layer_types=self.layer_types(layers),
            rope=self.rope(),
            rms_norm_eps=self.positive_float("rms_norm_eps", default=1e-5),
            swiglu_limit=self.positive_float("swiglu_limit", default=7.0),
            swiglu_alpha=self.positive_float("swiglu_alpha", default=1.702),
            max_position_embeddings=self.positive_int("max_position_embeddings", default=131072),
            tie_word_embeddings=self.boolean("tie_word_embeddings", False),
            eos_token_id=self.token_ids("eos_token_id", default=(200002,)),
            pad_token_id=pad,
        )

    def layer_types(self, layers: int) -> tuple[str, ...]:
        name, value = self.get("layer_types", default=None)
        if value is None:
            return alternating_layer_types(layers)
        if not isinstance(value, list) or len(value) != layers:
            raise self.fail(name, f"must list one type for each of the {layers} layers")
        unknown = [v for v in value if v not in (SLIDING, FULL)]
        if unknown:
            raise self.fail(name, f"has unknown layer type {_show(unknown[0])} (expected '{SLIDING}' or '{FULL}')")
        return tuple(value)

    def rope(self) -> RopeConfig:
        params = self.raw.get("rope_parameters")
        field = "rope_parameters"
        if params is None:
            params = self.raw.get("rope_scaling")
            field = "rope_scaling"
        if params is not None and not isinstance(params, dict):
            raise self.fail(field, f"must be an object of rotary embedding parameters, not {_show(params)}")
        params = dict(params or {})
        theta_source = params if "rope_theta" in params else self.raw
        theta = theta_source.get("rope_theta", 150000.0)
        number = _finite(theta)
        if number is None or not number > 1:
            raise self.fail("rope_theta", f"must be a finite number above 1, not {_show(theta)}")
        kind = params.get("rope_type", params.get("type", "default" if not params else None))
        if kind == "default":
            return RopeConfig(theta=number, kind="default", factor=1.0)
        if kind != "yarn":
            raise self.fail(f"{field}.rope_type", f"is {_show(kind)}; gpt-oss uses 'yarn' (or 'default')")
        sub = _Reader(params, self.source)
        try:
            return RopeConfig(
                theta=number,
                kind="yarn",
                factor=sub.positive_float("factor"),
                original_max_position_embeddings=sub.positive_int("original_max_position_embeddings"),
                beta_fast=sub.positive_float("beta_fast", default=32.0),
                beta_slow=sub.positive_float("beta_slow", default=1.0),
                # transformers treats a missing `truncate` as true; gpt-oss's own config says false.
                truncate=sub.boolean("truncate", True),
            )
        except ConfigError as e:
            raise ConfigError(str(e).replace("field '", f"field '{field}.", 1)) from None

    def token_ids(self, field: str, default: tuple[int, ...]) -> tuple[int, ...]:
        value = self.raw.get(field)
        if value is None:
            return default
        values = value if isinstance(value, list) else [value]
        if not 0 < len(values) <= 1024 or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TOKEN_ID for v in values
        ):
            raise self.fail(field, f"must be a token id or a list of them, not {_show(value)}")
        return tuple(values)


def _finite(value: Any) -> float | None:
    """A JSON number as a finite float, or None (bools, strings, NaN, infinities, integers beyond float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _show(value: Any) -> str:
    """A value from the file for a one-line message: its repr, cut short."""
    text = repr(value) if not isinstance(value, list | dict) or len(value) < 20 else f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."
