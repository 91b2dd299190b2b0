"""The HTTP server (Starlette): `/v1/models`, `/v1/chat/completions`, `/v1/responses`. Routes only wire the
layers: `intake` checks a request before it costs anything, an `api` module parses its JSON into our types, the
conversation is rendered here off the event loop, the `generation_queue` runs it, and the `api` module formats
the turn, whole or streamed.

One engine serves one generation at a time, in request order; at most `max_waiting` more requests wait, the rest
are told the server is busy (429). A client that goes away mid-answer cancels its generation at the next token.
The engine keeps its KV cache between requests, so the next request of the same conversation prefills only what
is new. Every failure is answered in OpenAI's error shape: client errors (4xx) and clients that leave are not
logged, a server error (500) is one line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import grammar
from .api.chat_completions import ChatChunks, completion, parse_chat
from .api.conversation import ParsedRequest, same_model
from .api.fields import ApiError, context_exceeded, items_limit
from .api.responses import ResponseEvents, parse_responses, response
from .api.wire import StreamFormat, new_id, now
from .engine import Engine
from .errors import MlxOssError
from .generation_queue import GenerationQueue, Job, QueueFull, Turn, pieces
from .grammar import GrammarError
from .harmony import render_prompt
from .intake import Guard, parse_body, read_body
from .render_limits import check_render_cost
from .stops import StopFilter

log = logging.getLogger("mlx_oss.server")
# Requests parsed and rendered at once: the work is CPU-bound, and a large body's parsed objects take up to a
# few hundred MB (a million values), so more at once only adds memory.
PARSE_AT_ONCE = 2

Parsed = TypeVar("Parsed", bound=ParsedRequest)
Parser = Callable[[Any, str, int], Parsed]  # (body's JSON, served model id, most items) -> request


class Server:
    """The app for one engine. Without `api_key`, only requests addressed to this computer (localhost, a loopback
    address) or to one of `allowed_hosts` are answered."""

    def __init__(
        self,
        engine: Engine,
        model_id: str,
        api_key: str | None = None,
        max_waiting: int = 8,
        allowed_hosts: tuple[str, ...] = (),
    ):
        self.engine, self.model_id, self.api_key = engine, model_id, api_key
        self.allowed_hosts = frozenset(name.lower() for name in allowed_hosts)
        self.generations = GenerationQueue(engine, max_waiting)
        self._parsing = asyncio.Semaphore(PARSE_AT_ONCE)

    def app(self) -> Starlette:
        routes = [
            Route("/v1/models", _answering(self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", _answering(self.model), methods=["GET"]),
            Route("/v1/chat/completions", _answering(self.chat_completions), methods=["POST"]),
            Route("/v1/responses", _answering(self.responses), methods=["POST"]),
            Route("/health", lambda request: JSONResponse({"status": "ok"}), methods=["GET"]),
        ]
        return Starlette(
            routes=routes,
            middleware=[Middleware(Guard, api_key=self.api_key, allowed_hosts=self.allowed_hosts)],
            exception_handlers={404: _not_found, 405: _not_allowed},
        )

    # -- endpoints -------------------------------------------------------------------------------------------

    async def models(self, request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: HttpRequest) -> Response:
        if not same_model(request.path_params["model"], self.model_id):
            raise ApiError(
                404, f"The model '{request.path_params['model']}' does not exist", "model", "model_not_found"
            )
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": 0, "owned_by": "mlx-oss"}

    async def chat_completions(self, request: HttpRequest) -> Response:
        parsed, job = await self._start(request, parse_chat)
        completion_id, created = new_id("chatcmpl-"), now()
        if parsed.stream:
            chunks = ChatChunks(completion_id, created, self.model_id, parsed.include_usage)
            return self._streaming(job, parsed, chunks, "POST /v1/chat/completions (streaming)")
        turn = await self._collect(job, request, parsed.stop)
        return JSONResponse(completion(completion_id, created, self.model_id, turn), headers=warning_headers(parsed))

    async def responses(self, request: HttpRequest) -> Response:
        parsed, job = await self._start(request, parse_responses)
        response_id = new_id("resp_")
        if parsed.stream:
            events = ResponseEvents(response_id, self.model_id, parsed.echo)
            return self._streaming(job, parsed, events, "POST /v1/responses (streaming)")
        turn = await self._collect(job, request, parsed.stop)
        return JSONResponse(response(response_id, self.model_id, turn, parsed.echo), headers=warning_headers(parsed))

    # -- from request to generation and back ------------------------------------------------------------------

    async def _start(self, request: HttpRequest, parse: Parser[Parsed]) -> tuple[Parsed, Job]:
        """The parsed request and its generation's job."""
        body = await read_body(request)
        async with self._parsing:
            parsed, prompt = await asyncio.to_thread(self._prepare, body, parse)
        try:
            return parsed, self.generations.submit(prompt, parsed.sampling, parsed.constraints)
        except QueueFull:
            raise ApiError(
                429, "the server is busy with other requests; try again shortly", code="server_busy"
            ) from None

    def _prepare(self, body: bytes, parse: Parser[Parsed]) -> tuple[Parsed, list[int]]:
        """The request and its prompt tokens, on a worker thread: large bodies take a while to parse and render,
        and meanwhile the event loop answers everyone else."""
        try:
            parsed = parse(parse_body(body), self.model_id, items_limit(self.engine.context_length))
            check_render_cost(parsed.conversation, self.engine.context_length)
            grammar.check(parsed.constraints)
            prompt = render_prompt(parsed.conversation)
        except GrammarError as e:
            raise ApiError(400, str(e), e.param, "invalid_grammar") from None
        except RecursionError:  # a value nested almost as deep as the parser allows, re-encoded one level deeper
            raise ApiError(400, "the request is nested too deeply") from None
        except BaseException as e:  # the tokenizer's Rust panics arrive as PanicException, a BaseException
            if type(e).__name__ != "PanicException":
                raise
            log.error("the tokenizer failed on a request: %s", str(e).splitlines()[0] if str(e) else "panic")
            raise ApiError(400, "the tokenizer could not read this conversation") from None
        if len(prompt) >= self.engine.context_length:
            raise context_exceeded(self.engine.context_length, f"{len(prompt)} tokens long")
        return parsed, prompt

    @staticmethod
    async def _collect(job: Job, request: HttpRequest, stops: list[str]) -> Turn:
        """The whole turn; if the client leaves before it is done, the generation is cancelled."""
        turn = Turn()

        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.2)
            job.cancel.cancel()

        watcher = asyncio.create_task(watch())
        try:
            async for _ in pieces(job, StopFilter(stops), turn):
                pass
        finally:
            watcher.cancel()
        return turn

    @staticmethod
    def _streaming(job: Job, parsed: ParsedRequest, format: StreamFormat, where: str) -> StreamingResponse:
        """The turn as server-sent events in `format`, as it is generated."""
        stops = parsed.stop

        async def stream() -> AsyncIterator[str]:
            turn = Turn()
            try:
                for text in format.start():
                    yield text
                async for piece in pieces(job, StopFilter(stops), turn):
                    for text in format.piece(piece, turn):
                        yield text
                for text in format.end(turn):
                    yield text
            except Exception as e:  # noqa: BLE001 - the stream has begun: the error goes in it, in the API's shape
                yield format.error(_as_api_error(e, where))
            finally:
                job.cancel.cancel()  # the client left, or we are done: either way nothing more to generate

        return StreamingResponse(stream(), media_type="text/event-stream", headers=warning_headers(parsed))


WARNING_HEADER = "x-mlx-oss-warning"


def warning_headers(parsed: ParsedRequest) -> dict[str, str]:
    """What the request asked for that this server left out (a hosted tool it does not run, say), in one header
    that clients may show; printable ASCII only, as a header must be."""
    if not parsed.warnings:
        return {}
    text = "; ".join(parsed.warnings)
    return {WARNING_HEADER: "".join(c if " " <= c <= "~" else "?" for c in text)[:2000]}


# -- errors ---------------------------------------------------------------------------------------------------


def _answering(endpoint):
    """`endpoint`, answering every error in OpenAI's shape itself: Starlette's handler for unexpected errors
    answers too, but then re-raises them for the server to log with a traceback."""

    @functools.wraps(endpoint)
    async def answer(request: HttpRequest) -> Response:
        try:
            return await endpoint(request)
        except ClientDisconnect:  # the client left while sending its request: nobody to answer
            return Response(status_code=400)
        except Exception as e:  # noqa: BLE001
            error = _as_api_error(e, f"{request.method} {request.url.path}")
            return JSONResponse(error.body(), status_code=error.status)

    return answer


def _as_api_error(error: Exception, where: str) -> ApiError:
    """The answer to `error`; one that is not the client's doing (a 500) is logged as one line naming `where`."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, MlxOssError | ValueError):
        return ApiError(400, str(error))
    log.error("%s failed: %s: %s", where, type(error).__name__, error)
    return ApiError(500, f"the generation failed: {type(error).__name__}: {error}", code="server_error")


async def _not_found(request: HttpRequest, exc) -> Response:
    return JSONResponse(ApiError(404, f"no route {request.url.path}").body(), status_code=404)


async def _not_allowed(request: HttpRequest, exc) -> Response:
    return JSONResponse(ApiError(405, f"{request.method} is not allowed on {request.url.path}").body(), status_code=405)
