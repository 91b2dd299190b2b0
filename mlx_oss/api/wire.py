"""What every API's answer is made of on the wire: fresh ids, timestamps, server-sent events, and the shape a
streamed answer takes, so that the server streams every API the same way."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from collections.abc import Iterable
from typing import Protocol

from ..engine import AnswerDelta, ReasoningDelta, ToolCall
from ..generation_queue import Turn
from .fields import ApiError

REASONING_PREFIX = "mlx-oss:v1:"  # our reasoning tokens: the reasoning text, base64'd (see `encrypt_reasoning`)


def encrypt_reasoning(text: str) -> str:
    """The chain of thought as an opaque token a client keeps and sends back (a Responses reasoning item's
    `encrypted_content`, an Anthropic thinking block's `signature`): the text itself, base64'd behind a prefix,
    NOT encrypted. A client that stores nothing on the server, or asks not to be shown the reasoning, sends it
    back with the turn, and so the reasoning that led to a pending tool call reaches the model again, as harmony
    asks; it never leaves the user's own computer."""
    return REASONING_PREFIX + base64.b64encode(text.encode()).decode("ascii")


def decrypt_reasoning(value: str) -> str | None:
    """The reasoning text of our own token; None for anyone else's (OpenAI's and Anthropic's cannot be read)."""
    if not value.startswith(REASONING_PREFIX):
        return None
    try:
        return base64.b64decode(value[len(REASONING_PREFIX) :], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def sse(data: dict | str) -> str:
    """One server-sent event's data line (a dict as JSON, non-ASCII kept as is)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class StreamFormat(Protocol):
    """One streamed answer in an API's events. The server feeds it the turn's pieces as they are generated;
    once the stream has begun an error can only go in it, as the API's last event."""

    def start(self) -> Iterable[str]: ...

    def piece(self, piece: ReasoningDelta | AnswerDelta | ToolCall, turn: Turn) -> Iterable[str]: ...

    def end(self, turn: Turn) -> Iterable[str]: ...

    def error(self, error: ApiError) -> str: ...
