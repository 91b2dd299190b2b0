"""The HTTP server (Starlette): `/v1/models`, `/v1/chat/completions`, `/v1/responses`, and Anthropic's
`/v1/messages` and `/v1/messages/count_tokens`. Routes only wire the
layers: `intake` checks a request before it costs anything, an `api` module parses its JSON into our types, the
conversation is rendered here off the event loop, the `generation_queue` runs it, and the `api` module formats
the turn, whole or streamed.

With built-in tools (`tools`, from `--tools`), a Responses request that asks for code_interpreter or web_search
runs through the agent loop: the server runs the model's python and browser calls itself, between its steps.

One engine serves one generation at a time, in request order; at most `max_waiting` more requests wait, the rest
are told the server is busy (429). A client that goes away mid-answer cancels its generation at the next token.
The engine keeps its KV cache between requests, so the next request of the same conversation prefills only what
is new. Every failure is answered in the API's error shape (Anthropic's on /v1/messages*, else OpenAI's):
client errors (4xx) and clients that leave are not logged, a server error (500) is one line on stderr, never a
traceback. A model whose files changed on disk since it was loaded cannot run again: that is said once in the log,
every later request is answered 503 with the file's name, and /health answers 503 (without it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
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
from .api.messages import MessageEvents, SequenceStops, message, parse_messages
from .api.responses import ResponseEvents, parse_responses, response
from .api.wire import StreamFormat, new_id, now
from .engine import Engine
from .errors import CheckpointChanged, MlxOssError
from .generation_queue import GenerationQueue, Job, QueueFull, Turn, pieces
from .grammar import GrammarError
from .harmony import render_prompt
from .intake import Guard, error_response, parse_body, read_body
from .render_limits import check_render_cost
from .stops import StopFilter
from .tools import BuiltinTool

log = logging.getLogger("mlx_oss.server")
# Requests parsed and rendered at once: the work is CPU-bound, and a large body's parsed objects take up to a
# few hundred MB (a million values), so more at once only adds memory.
PARSE_AT_ONCE = 2
MODEL_CHANGED = "a file of the model changed on disk since it was loaded; restart the server to load it again"

Parsed = TypeVar("Parsed", bound=ParsedRequest)
Parser = Callable[[Any, str, int], Parsed]  # (body's JSON, served model id, most items) -> request


class Server:
    """The app for one engine. Without `api_key`, only requests addressed to this computer (localhost, a loopback
    address) or to one of `allowed_hosts` are answered. `tools` are the built-in tools the server runs for the
    Responses API's hosted ones, by name (`python`, `browser`): a tool given as itself serves every request (python:
    its kernel keeps a variable from one request of a conversation to the next, as its description promises; the
    server is one user's), one given as a factory (a class, a partial) is made for each request and closed after
    it (the browser: its pages are one turn's, so a long-running server does not pile them up)."""

    def __init__(
        self,
        engine: Engine,
        model_id: str,
        api_key: str | None = None,
        max_waiting: int = 8,
        allowed_hosts: tuple[str, ...] = (),
        tools: Mapping[str, BuiltinTool | Callable[[], BuiltinTool]] | None = None,
    ):
        self.engine, self.model_id, self.api_key = engine, model_id, api_key
        self.allowed_hosts = frozenset(name.lower() for name in allowed_hosts)
        self.tools = dict(tools or {})
        self.generations = GenerationQueue(engine, max_waiting)
        self._parsing = asyncio.Semaphore(PARSE_AT_ONCE)
        self.unusable: str | None = None  # why the loaded model cannot run any more (a file of it changed on disk)

    def app(self) -> Starlette:
        routes = [
            Route("/v1/models", self._answering(self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._answering(self.model), methods=["GET"]),
            Route("/v1/chat/completions", self._answering(self.chat_completions), methods=["POST"]),
            Route("/v1/responses", self._answering(self.responses), methods=["POST"]),
            Route("/v1/messages", self._answering(self.messages), methods=["POST"]),
            Route("/v1/messages/count_tokens", self._answering(self.count_tokens), methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/", _alive, methods=["GET"]),  # and HEAD: Claude Code's check that the server is there
        ]
        return Starlette(
            routes=routes,
            middleware=[Middleware(Guard, api_key=self.api_key, allowed_hosts=self.allowed_hosts)],
            exception_handlers={404: _not_found, 405: _not_allowed},
        )

    # -- endpoints -------------------------------------------------------------------------------------------

    async def health(self, request: HttpRequest) -> Response:
        """200 while the model can answer; 503 with the reason once it cannot (a monitor's cue to restart us). The
        reason names no file: /health answers without the API key, so it must not show the server's folders."""
        if self.unusable is not None:
            return JSONResponse({"status": "unavailable", "reason": MODEL_CHANGED}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(self, request: HttpRequest) -> Response:
        listing = {"object": "list", "data": [self._model_card(request)]}
        if _anthropic(request):  # Anthropic's list is paged
            listing |= {"has_more": False, "first_id": self.model_id, "last_id": self.model_id}
        return JSONResponse(listing)

    async def model(self, request: HttpRequest) -> Response:
        if not same_model(request.path_params["model"], self.model_id):
            raise ApiError(
                404, f"The model '{request.path_params['model']}' does not exist", "model", "model_not_found"
            )
        return JSONResponse(self._model_card(request))

    def _model_card(self, request: HttpRequest) -> dict:
        card = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "mlx-oss"}
        if _anthropic(request):  # an Anthropic client (Claude Code's /model) reads these
            card |= {"type": "model", "display_name": self.model_id, "created_at": "1970-01-01T00:00:00Z"}
        return card

    async def chat_completions(self, request: HttpRequest) -> Response:
        parsed, job = await self._start(request, parse_chat)
        completion_id, created = new_id("chatcmpl-"), now()
        if parsed.stream:
            scored = parsed.sampling.logprobs is not None
            chunks = ChatChunks(completion_id, created, self.model_id, parsed.include_usage, scored)
            return self._streaming(job, parsed, chunks, "POST /v1/chat/completions (streaming)")
        turn = await self._collect(job, request, StopFilter(parsed.stop))
        answer = completion(completion_id, created, self.model_id, turn, parsed.sampling.logprobs is not None)
        return JSONResponse(answer, headers=warning_headers(parsed))

    async def responses(self, request: HttpRequest) -> Response:
        parse = functools.partial(parse_responses, runs=frozenset(self.tools))
        parsed, job = await self._start(request, parse)
        response_id = new_id("resp_")
        events = ResponseEvents(response_id, self.model_id, parsed)
        if parsed.stream:
            return self._streaming(job, parsed, events, "POST /v1/responses (streaming)")
        if not job.tools:
            turn = await self._collect(job, request, StopFilter(parsed.stop))
            return JSONResponse(response(response_id, self.model_id, turn, parsed), headers=warning_headers(parsed))
        # the tools' items sit between the model's steps: the stream's items, in the order they came, are the output
        turn = await self._collect(job, request, StopFilter(parsed.stop), events.piece)
        events.close()
        events.close_tool()
        return JSONResponse(
            response(response_id, self.model_id, turn, parsed, events.items), headers=warning_headers(parsed)
        )

    async def messages(self, request: HttpRequest) -> Response:
        parsed, job = await self._start(request, parse_messages)
        message_id, stops = new_id("msg_"), SequenceStops(parsed.stop)
        if parsed.stream:
            events = MessageEvents(message_id, self.model_id, len(job.prompt), parsed.thinking, stops)
            return self._streaming(job, parsed, events, "POST /v1/messages (streaming)", stops)
        turn = await self._collect(job, request, stops)
        answer = message(message_id, self.model_id, turn, parsed.thinking, stops)
        return JSONResponse(answer, headers=warning_headers(parsed))

    async def count_tokens(self, request: HttpRequest) -> Response:
        """The prompt's length as the engine would render it, without generating."""
        body = await read_body(request)
        counting = functools.partial(parse_messages, counting=True)
        async with self._parsing:
            parsed, prompt = await asyncio.to_thread(self._render, body, counting)
        return JSONResponse({"input_tokens": len(prompt)}, headers=warning_headers(parsed))

    # -- from request to generation and back ------------------------------------------------------------------

    async def _start(self, request: HttpRequest, parse: Parser[Parsed]) -> tuple[Parsed, Job]:
        """The parsed request and its generation's job."""
        if self.unusable is not None:  # nothing to wait or parse for: the answer is known
            raise model_unusable(self.unusable)
        body = await read_body(request)
        async with self._parsing:
            parsed, prompt = await asyncio.to_thread(self._prepare, body, parse)
        builtin = getattr(parsed, "builtin", ())  # only the Responses API runs built-in tools
        tools, owned = {}, []
        for name in builtin:
            given = self.tools[name]  # a tool, or (callable) a factory of one for this request
            tools[name] = given() if callable(given) else given
            if callable(given):
                owned.append(tools[name])
        try:
            return parsed, self.generations.submit(
                prompt,
                parsed.sampling,
                parsed.constraints,
                parsed.conversation if tools else None,
                tools,
                getattr(parsed, "max_tool_calls", None),
                tuple(owned),
            )
        except QueueFull:
            raise ApiError(
                429, "the server is busy with other requests; try again shortly", code="server_busy"
            ) from None

    def _prepare(self, body: bytes, parse: Parser[Parsed]) -> tuple[Parsed, list[int]]:
        """The request and its prompt tokens, on a worker thread: large bodies take a while to parse and render,
        and meanwhile the event loop answers everyone else."""
        parsed, prompt = self._render(body, parse)
        if len(prompt) >= self.engine.context_length:
            limit = self.engine.model.config.max_position_embeddings
            raise context_exceeded(self.engine.context_length, f"{len(prompt)} tokens long", limit)
        return parsed, prompt

    def _render(self, body: bytes, parse: Parser[Parsed]) -> tuple[Parsed, list[int]]:
        """The request and its prompt tokens, however long (counting tokens needs no room to generate)."""
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
        return parsed, prompt

    @staticmethod
    async def _collect(
        job: Job, request: HttpRequest, stops: StopFilter, each: Callable[[Any, Turn], Any] | None = None
    ) -> Turn:
        """The whole turn, each piece also handed to `each`; if the client leaves before it is done, the generation
        is cancelled."""
        turn = Turn()

        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.2)
            job.cancel.cancel()

        watcher = asyncio.create_task(watch())
        try:
            async for piece in pieces(job, stops, turn):
                if each is not None:
                    each(piece, turn)
        finally:
            watcher.cancel()
        return turn

    def _streaming(
        self, job: Job, parsed: ParsedRequest, format: StreamFormat, where: str, stops: StopFilter | None = None
    ) -> StreamingResponse:
        """The turn as server-sent events in `format`, as it is generated; `stops` ends the answer (by default
        at the request's stop sequences)."""
        stops = stops or StopFilter(parsed.stop)

        async def stream() -> AsyncIterator[str]:
            turn = Turn()
            try:
                for text in format.start():
                    yield text
                async for piece in pieces(job, stops, turn):
                    for text in format.piece(piece, turn):
                        yield text
                for text in format.end(turn):
                    yield text
            except Exception as e:  # noqa: BLE001 - the stream has begun: the error goes in it, in the API's shape
                yield format.error(self._as_api_error(e, where))
            finally:
                job.cancel.cancel()  # the client left, or we are done: either way nothing more to generate

        return StreamingResponse(stream(), media_type="text/event-stream", headers=warning_headers(parsed))

    # -- errors -------------------------------------------------------------------------------------------------

    def _answering(self, endpoint):
        """`endpoint`, answering every error in its API's shape itself: Starlette's handler for unexpected errors
        answers too, but then re-raises them for the server to log with a traceback."""

        @functools.wraps(endpoint)
        async def answer(request: HttpRequest) -> Response:
            try:
                return await endpoint(request)
            except ClientDisconnect:  # the client left while sending its request: nobody to answer
                return Response(status_code=400)
            except Exception as e:  # noqa: BLE001
                return error_response(request.url.path, self._as_api_error(e, f"{request.method} {request.url.path}"))

        return answer

    def _as_api_error(self, error: Exception, where: str) -> ApiError:
        """`as_api_error`, except that a model file changed on disk makes the model unusable from then on: the
        server's fault, not the request's, said once in the log (every later request would say it again)."""
        if not isinstance(error, CheckpointChanged):
            return as_api_error(error, where)
        if self.unusable is None:
            self.unusable = str(error)
            log.error("the model cannot answer until the server is restarted: %s", error)
        return model_unusable(self.unusable)


WARNING_HEADER = "x-mlx-oss-warning"


def warning_headers(parsed: ParsedRequest) -> dict[str, str]:
    """What the request asked for that this server left out (a hosted tool it does not run, say), in one header
    that clients may show; printable ASCII only, as a header must be."""
    if not parsed.warnings:
        return {}
    text = "; ".join(parsed.warnings)
    return {WARNING_HEADER: "".join(c if " " <= c <= "~" else "?" for c in text)[:2000]}


# -- errors ---------------------------------------------------------------------------------------------------


def as_api_error(error: Exception, where: str) -> ApiError:
    """The answer to `error`; one that is not the client's doing (a 500) is logged as one line naming `where`."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, MlxOssError | ValueError):
        return ApiError(400, str(error))
    log.error("%s failed: %s: %s", where, type(error).__name__, error)
    return ApiError(500, f"the generation failed: {type(error).__name__}: {error}", code="server_error")


def model_unusable(reason: str) -> ApiError:
    """The 503 for every request once the model cannot run (a server error: the client may try another server)."""
    return ApiError(503, reason, code="model_unavailable")


async def _not_found(request: HttpRequest, exc) -> Response:
    return error_response(request.url.path, ApiError(404, f"no route {request.url.path}"))


async def _not_allowed(request: HttpRequest, exc) -> Response:
    return error_response(request.url.path, ApiError(405, f"{request.method} is not allowed on {request.url.path}"))


async def _alive(request: HttpRequest) -> Response:
    return JSONResponse({"status": "ok"})


def _anthropic(request: HttpRequest) -> bool:
    """Whether an Anthropic client asks (its SDKs send `anthropic-version` on every request)."""
    return "anthropic-version" in request.headers
