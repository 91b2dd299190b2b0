"""Log-probabilities on the wire: what a request asks for, and each answer token's entry as OpenAI's APIs show it
(`{"token", "logprob", "bytes", "top_logprobs": [...]}`: chat's `logprobs.content`, a Responses output text's
`logprobs`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

from ..harmony import token_bytes
from ..sampling import MAX_TOP_LOGPROBS, TokenLogprob
from . import fields as f
from .fields import ApiError

# What OpenAI shows for a token the distribution rules out (JSON has no -Infinity): a grammar masks tokens out.
IMPOSSIBLE = -9999.0


def top_count(value: Any, param: str) -> int:
    """`top_logprobs`: how many alternatives each token shows, 0 to 20."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'{param}' must be an integer from 0 to {MAX_TOP_LOGPROBS}, not {f.shown(value)}", param)
    return value


def chat_request(body: dict) -> int | None:
    """Chat's `logprobs: true` with an optional `top_logprobs`: the alternatives per token, or None for none."""
    wanted = f.boolean(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None and not wanted:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top_count(top, "top_logprobs") if top is not None else 0) if wanted else None


@functools.lru_cache(maxsize=65536)
def _entry(token: int) -> tuple[str, tuple[int, ...]]:
    data = token_bytes()[token]
    return data.decode("utf-8", errors="replace"), tuple(data)


def entry(token: int, logprob: float) -> dict:
    """One token as the APIs show it: its text (a piece of a character shows as U+FFFD), bytes and logprob."""
    text, data = _entry(token)
    return {"token": text, "logprob": logprob if math.isfinite(logprob) else IMPOSSIBLE, "bytes": list(data)}


def content(scores: Iterable[TokenLogprob]) -> list[dict]:
    """The entries of `scores`, each with its `top_logprobs`."""
    return [
        {**entry(s.token, s.logprob), "top_logprobs": [entry(token, logprob) for token, logprob in s.top]}
        for s in scores
    ]
