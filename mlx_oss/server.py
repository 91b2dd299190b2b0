"""The OpenAI-compatible HTTP server (Starlette): `/v1/models`, `/v1/chat/completions`, `/v1/responses`.

One engine serves one generation at a time, in request order, on a worker thread; at most `max_waiting` more
requests wait, the rest are told the server is busy (429). A client that goes away mid-answer cancels its
generation at the next token. The engine keeps its KV cache between requests, so the next request of the same
conversation prefills only what is new.

Requests are checked before they cost anything (`intake`), parsed and rendered off the event loop, and every
failure is answered in OpenAI's error shape: client errors (4xx) and clients that leave are not logged, a
server error (500) is one line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .api_fields import items_limit
from .cancel import CancelToken
from .engine import AnswerDelta, Done, Engine, ReasoningDelta, SamplingParams, ToolCall
from .errors import MlxOssError
from .harmony import render_prompt
from .intake import Guard, parse_body, read_body
from .openai_api import (
    FINISH,
    ApiError,
    Request,
    chat_usage,
    new_id,
    now,
    parse_chat,
    parse_responses,
    response_object,
    response_usage,
    same_model,
    tool_call_json,
)
from .render_limits import check_render_cost
from .stops import StopFilter

END = object()
log = logging.getLogger("mlx_oss.server")
# Requests parsed and rendered at once: the work is CPU-bound, and a large body's parsed objects take up to a
# few hundred MB (a million values), so more at once only adds memory (12 concurrent took 280 MB more).
PARSE_AT_ONCE = 2


class Job:
    """One request's generation: events cross from the worker thread to the request's event loop."""

    def __init__(self, prompt: list[int], sampling: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.prompt, self.sampling, self.loop = prompt, sampling, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = CancelToken()

    def push(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class GenerationQueue:
    def __init__(self, engine: Engine, max_waiting: int = 8):
        self.engine, self.max_waiting = engine, max_waiting
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0
        threading.Thread(target=self._work, name="generation", daemon=True).start()

    def submit(self, prompt: list[int], sampling: SamplingParams) -> Job:
        with self._lock:
            if self._queued > self.max_waiting:  # one running plus `max_waiting` waiting
                raise ApiError(429, "the server is busy with other requests; try again shortly", code="server_busy")
            self._queued += 1
        job = Job(prompt, sampling, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if not job.cancel.cancelled:
                    for event in self.engine.generate(job.prompt, job.sampling, job.cancel):
                        job.push(event)
            except Exception as e:  # noqa: BLE001 - the request answers it
                job.push(e)
            finally:
                with self._lock:
                    self._queued -= 1
                job.push(END)


@dataclass
class Turn:
    """What one generation produced, as events arrive (after stop sequences)."""

    reasoning: str = ""
    reasoning_tokens: int = 0  # generated tokens that carried reasoning (one delta each)
    answer: str = ""
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (call id, function name, arguments)
    done: Done | None = None
    stopped_by_sequence: bool = False

    @property
    def finish_reason(self) -> str:
        if self.stopped_by_sequence:
            return "stop"
        return FINISH[self.done.stop_reason] if self.done else "stop"


async def events(job: Job, stops: StopFilter, turn: Turn) -> AsyncIterator[tuple[str, str]]:
    """("reasoning" | "answer" | "call", text) pieces of the turn; `turn` collects them. Errors raise."""
    while (item := await job.events.get()) is not END:
        if isinstance(item, Exception):
            raise item
        if isinstance(item, ReasoningDelta):
            turn.reasoning += item.text
            turn.reasoning_tokens += 1
            yield "reasoning", item.text
        elif isinstance(item, AnswerDelta):
            text = stops.feed(item.text)
            if stops.stopped and not turn.stopped_by_sequence:
                turn.stopped_by_sequence = True
                job.cancel.cancel()
            if text:
                turn.answer += text
                yield "answer", text
        elif isinstance(item, ToolCall):
            turn.calls.append((new_id("call_"), item.function_name, item.arguments))
            yield "call", str(len(turn.calls) - 1)
        elif isinstance(item, Done):
            rest = stops.flush()
            if rest:
                turn.answer += rest
                yield "answer", rest
            turn.done = item


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


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

    # -- plumbing --------------------------------------------------------------------------------------------

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

    async def _start(self, request: HttpRequest, parse) -> tuple[Request, list[int], Job]:
        body = await read_body(request)
        async with self._parsing:
            parsed, prompt = await asyncio.to_thread(self._prepare, body, parse)
        return parsed, prompt, self.generations.submit(prompt, parsed.sampling)

    def _prepare(self, body: bytes, parse) -> tuple[Request, list[int]]:
        """The request and its prompt tokens, on a worker thread: large bodies take a while to parse and render,
        and meanwhile the event loop answers everyone else."""
        try:
            parsed = parse(parse_body(body), self.model_id, items_limit(self.engine.context_length))
            check_render_cost(parsed.conversation, self.engine.context_length)
            prompt = render_prompt(parsed.conversation)
        except RecursionError:  # a value nested almost as deep as the parser allows, re-encoded one level deeper
            raise ApiError(400, "the request is nested too deeply") from None
        except BaseException as e:  # the tokenizer's Rust panics arrive as PanicException, a BaseException
            if type(e).__name__ != "PanicException":
                raise
            log.error("the tokenizer failed on a request: %s", str(e).splitlines()[0] if str(e) else "panic")
            raise ApiError(400, "the tokenizer could not read this conversation") from None
        if len(prompt) >= self.engine.context_length:
            raise ApiError(
                400,
                f"This model's context holds {self.engine.context_length} tokens, but the conversation is "
                f"{len(prompt)} tokens long; shorten it",
                "messages",
                "context_length_exceeded",
            )
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
            async for _ in events(job, StopFilter(stops), turn):
                pass
        finally:
            watcher.cancel()
        return turn

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
        parsed, prompt, job = await self._start(request, parse_chat)
        completion_id, created = new_id("chatcmpl-"), now()
        if parsed.stream:
            return StreamingResponse(
                self._chat_stream(job, parsed, completion_id, created), media_type="text/event-stream"
            )
        turn = await self._collect(job, request, parsed.stop)
        message: dict = {"role": "assistant", "content": turn.answer or (None if turn.calls else "")}
        if turn.reasoning:
            message["reasoning_content"] = turn.reasoning
        if turn.calls:
            message["tool_calls"] = [tool_call_json(i, *call) for i, call in enumerate(turn.calls)]
            for call in message["tool_calls"]:
                del call["index"]
        s = turn.done.stats
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": self.model_id,
                "choices": [{"index": 0, "message": message, "finish_reason": turn.finish_reason, "logprobs": None}],
                "usage": chat_usage(s.prompt_tokens, s.generated_tokens, s.reused_tokens, turn.reasoning_tokens),
            }
        )

    async def _chat_stream(self, job: Job, parsed: Request, completion_id: str, created: int) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            body = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            if usage is not None:
                body["choices"], body["usage"] = [], usage
            return sse(body)

        turn = Turn()
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for kind, text in events(job, StopFilter(parsed.stop), turn):
                if kind == "reasoning":
                    yield chunk({"reasoning_content": text})
                elif kind == "answer":
                    yield chunk({"content": text})
                else:
                    index = int(text)
                    yield chunk({"tool_calls": [tool_call_json(index, *turn.calls[index])]})
            yield chunk({}, turn.finish_reason)
            if parsed.include_usage:
                s = turn.done.stats
                usage = chat_usage(s.prompt_tokens, s.generated_tokens, s.reused_tokens, turn.reasoning_tokens)
                yield chunk({}, usage=usage)
            yield sse("[DONE]")
        except Exception as e:  # noqa: BLE001 - the stream has begun: the error goes in it, in OpenAI's shape
            yield sse(_as_api_error(e, "POST /v1/chat/completions (streaming)").body())
        finally:
            job.cancel.cancel()  # the client left, or we are done: either way nothing more to generate

    async def responses(self, request: HttpRequest) -> Response:
        parsed, prompt, job = await self._start(request, parse_responses)
        response_id = new_id("resp_")
        if parsed.stream:
            return StreamingResponse(self._responses_stream(job, parsed, response_id), media_type="text/event-stream")
        turn = await self._collect(job, request, parsed.stop)
        return JSONResponse(self._response(response_id, turn, parsed))

    def _response(self, response_id: str, turn: Turn | None, parsed: Request, items: list | None = None) -> dict:
        if turn is None or turn.done is None:
            return response_object(response_id, self.model_id, "in_progress", [], None, parsed.extras)
        s = turn.done.stats
        incomplete = "max_output_tokens" if turn.done.stop_reason in ("length", "context_limit") else None
        return response_object(
            response_id,
            self.model_id,
            "incomplete" if incomplete else "completed",
            items if items is not None else output_items(turn),
            response_usage(s.prompt_tokens, s.generated_tokens, s.reused_tokens, turn.reasoning_tokens),
            parsed.extras,
            incomplete,
        )

    async def _responses_stream(self, job: Job, parsed: Request, response_id: str) -> AsyncIterator[str]:
        stream = ResponseEvents()
        turn = Turn()
        try:
            yield stream.event("response.created", response=self._response(response_id, None, parsed))
            async for kind, text in events(job, StopFilter(parsed.stop), turn):
                for event in stream.piece(kind, text, turn):
                    yield event
            for event in stream.close():
                yield event
            yield stream.event("response.completed", response=self._response(response_id, turn, parsed, stream.items))
        except Exception as e:  # noqa: BLE001 - the stream has begun: the error goes in it
            error = _as_api_error(e, "POST /v1/responses (streaming)")
            yield stream.event("error", message=error.message, code=error.code, param=error.param)
        finally:
            job.cancel.cancel()


def output_items(turn: Turn) -> list[dict]:
    items = []
    if turn.reasoning:
        items.append(reasoning_item(new_id("rs_"), turn.reasoning))
    if turn.answer or not (turn.calls or turn.reasoning):
        items.append(message_item(new_id("msg_"), turn.answer, "completed"))
    items += [call_item(new_id("fc_"), *call) for call in turn.calls]
    return items


def reasoning_item(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def message_item(item_id: str, text: str, status: str) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_item(item_id: str, call_id: str, name: str, arguments: str) -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": "completed",
    }


class ResponseEvents:
    """The Responses API's streaming events for one turn: items open and close as the model moves from
    reasoning to answer to tool calls."""

    def __init__(self):
        self.sequence = 0
        self.items: list[dict] = []
        self.open: tuple[str, str, str] | None = None  # (kind, item id, text so far)

    def event(self, kind: str, **fields) -> str:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\n" + sse(body)

    def piece(self, kind: str, text: str, turn: Turn) -> list[str]:
        out = []
        if self.open and self.open[0] != kind:
            out += self.close()
        index = len(self.items)
        if kind == "call":
            call_id, name, arguments = turn.calls[int(text)]
            item = call_item(new_id("fc_"), call_id, name, arguments)
            out.append(self.event("response.output_item.added", output_index=index, item={**item, "arguments": ""}))
            out.append(
                self.event(
                    "response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=arguments
                )
            )
            out.append(
                self.event(
                    "response.function_call_arguments.done", item_id=item["id"], output_index=index, arguments=arguments
                )
            )
            out.append(self.event("response.output_item.done", output_index=index, item=item))
            self.items.append(item)
            return out
        if self.open is None:
            item_id = new_id("rs_" if kind == "reasoning" else "msg_")
            self.open = (kind, item_id, "")
            if kind == "reasoning":
                item = {"type": "reasoning", "id": item_id, "summary": [], "content": []}
                out.append(self.event("response.output_item.added", output_index=index, item=item))
            else:
                out.append(
                    self.event(
                        "response.output_item.added", output_index=index, item=message_item(item_id, "", "in_progress")
                    )
                )
                out.append(
                    self.event(
                        "response.content_part.added",
                        item_id=item_id,
                        output_index=index,
                        content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []},
                    )
                )
        _, item_id, so_far = self.open
        self.open = (kind, item_id, so_far + text)
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        out.append(self.event(name, item_id=item_id, output_index=index, content_index=0, delta=text))
        return out

    def close(self) -> list[str]:
        if self.open is None:
            return []
        kind, item_id, text = self.open
        self.open = None
        index = len(self.items)
        if kind == "reasoning":
            item = reasoning_item(item_id, text)
            out = [
                self.event(
                    "response.reasoning_text.done", item_id=item_id, output_index=index, content_index=0, text=text
                )
            ]
        else:
            item = message_item(item_id, text, "completed")
            part = item["content"][0]
            out = [
                self.event(
                    "response.output_text.done", item_id=item_id, output_index=index, content_index=0, text=text
                ),
                self.event(
                    "response.content_part.done", item_id=item_id, output_index=index, content_index=0, part=part
                ),
            ]
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        self.items.append(item)
        return out


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
