"""What a request must pass before the server parses it: its Host (or API key), its content type, its size.

Every check here is cheap and comes before the costly steps, so no client can make the server read, hold or
parse without bound: the body is refused as soon as it is known to be too large (from Content-Length, or while
it streams in), and the JSON is counted (commas and brackets, a fast byte count) before it is parsed, because
Python's parser holds the interpreter lock for the whole parse and builds an object for every value.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from .api import messages
from .api.fields import ApiError
from .hosts import host_name, is_loopback_name
from .json_input import JsonInputError, parse_json

# A 131072-token conversation is about 0.5 MB of English, a few MB of JSON-escaped code or CJK text with tool
# schemas: 16 MB leaves room for any conversation that fits the context.
MAX_BODY_BYTES = 16 * 2**20
# Values in the body (each but the first of a list or object follows a comma): a 131072-token conversation has
# a few hundred thousand at most, counting the commas and brackets of its text. Parsing holds the interpreter
# lock and builds an object per value, so this bounds both the pause and the memory, which the 16 MB a body
# may hold would not: its values could outnumber a million several times.
MAX_JSON_VALUES = 1_000_000
ANTHROPIC_PATHS = "/v1/messages"  # its routes answer errors in Anthropic's shape
KEYLESS_PATHS = frozenset({"/", "/health"})  # liveness checks (Claude Code's HEAD /) that reveal nothing


def error_response(path: str, error: ApiError) -> JSONResponse:
    """`error` in the shape of the API `path` belongs to: Anthropic's for /v1/messages*, else OpenAI's."""
    if path.startswith(ANTHROPIC_PATHS):
        return JSONResponse(messages.error_body(error), status_code=messages.anthropic_status(error))
    return JSONResponse(error.body(), status_code=error.status)


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is larger than {limit // 2**20} MB, more than any conversation that fits the context",
        code="request_too_large",
    )


async def read_body(request: HttpRequest, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request's body, refused (413) once it is known to be over `limit` bytes, before it is all read."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


def parse_body(body: bytes, max_values: int = MAX_JSON_VALUES):
    """The body's JSON (run it off the event loop), or a 400 that says why not."""
    marks = body.count(b",") + body.count(b"[") + body.count(b"{")
    if marks > max_values:
        raise ApiError(
            400,
            f"the request body holds more than {max_values} JSON values (commas and brackets), more than any "
            "conversation that fits the context",
        )
    try:
        return parse_json(body)
    except JsonInputError as e:
        raise ApiError(400, f"the request body is {e}") from None


class Guard:
    """ASGI middleware that refuses, in the API's shape, requests the server must not answer: a POST that is not
    JSON (a web page may send text/plain to 127.0.0.1 unasked; JSON needs the browser's permission first), a
    wrong API key (OpenAI's `Authorization: Bearer` or Anthropic's `x-api-key`), or without a key a Host that is
    not this computer's (DNS rebinding, see `hosts`)."""

    def __init__(self, app, api_key: str | None, allowed_hosts: frozenset[str]):
        self.app, self.api_key, self.allowed_hosts = app, api_key, allowed_hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            error = self.check(scope)
            if error is not None:
                await error_response(scope["path"], error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope) -> ApiError | None:
        headers = dict(scope.get("headers") or [])
        if scope["method"] == "POST" and not headers.get(b"content-type", b"").startswith(b"application/json"):
            return ApiError(415, "send the request body as application/json")
        if self.api_key:
            if scope["path"] in KEYLESS_PATHS:
                return None
            bearer = hmac.compare_digest(headers.get(b"authorization", b""), f"Bearer {self.api_key}".encode())
            keyed = hmac.compare_digest(headers.get(b"x-api-key", b""), self.api_key.encode())
            if not (bearer or keyed):
                return ApiError(
                    401,
                    "Incorrect or missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                    code="invalid_api_key",
                )
            return None
        header = headers.get(b"host", b"").decode("latin-1")
        name = host_name(header)
        if name is None or not (is_loopback_name(name) or name in self.allowed_hosts):
            shown = header if len(header) <= 100 else header[:100] + "..."
            return ApiError(
                403,
                f"requests for host {shown!r} are refused: use localhost or 127.0.0.1, serve with "
                "--allow-host NAME to answer another name, or with --api-key",
            )
        return None
