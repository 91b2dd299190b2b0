"""What every API's answer is made of on the wire: fresh ids, timestamps, server-sent events, and the shape a
streamed answer takes, so that the server streams every API the same way."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from typing import Protocol

from ..engine import AnswerDelta, ReasoningDelta, ToolCall
from ..generation_queue import Turn
from .fields import ApiError


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
