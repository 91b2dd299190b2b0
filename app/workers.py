"""Slow work off the GUI thread: the model (loading, generating) and tasks (downloads, conversions).

Each worker is a QObject moved to its own QThread; the window talks to it through queued signals and hears back
through signals, so the event loop never waits on a model, a disk or the network. Cancellation is a
`CancelToken` the window sets directly (it is thread-safe); the worker stops at its next step.
"""

from __future__ import annotations

import dataclasses
import gc
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QObject, QThread, Signal, Slot

from mlx_oss.cancel import CancelToken
from mlx_oss.engine import AnswerDelta, Done, Engine, ReasoningDelta, SamplingParams, ToolCall
from mlx_oss.errors import MlxOssError
from mlx_oss.harmony import Conversation, render_prompt
from mlx_oss.tools import BROWSER, BUILTIN_TOOLS, PYTHON, BuiltinTool, ToolSettings

PICTURES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")
KEPT_FILE_BYTES = 8 * 1024 * 1024  # a picture kept with the conversation; larger ones are shown from the folder

ToolFactory = Callable[[str, ToolSettings], BuiltinTool]


def make_tool(name: str, settings: ToolSettings) -> BuiltinTool:
    """The real tool `name`, built with the user's settings (python's working folder is `settings.work_dir`)."""
    if name == PYTHON:
        from mlx_oss.tools.python import PythonTool

        return PythonTool(settings, settings.work_dir)
    if name == BROWSER:
        from mlx_oss.tools.browser import BrowserTool

        return BrowserTool(settings)
    raise ValueError(f"no built-in tool {name!r}")


@dataclass(frozen=True)
class ToolRequest:
    """The built-in tools a turn may use: the conversation's (its own python process and working folder)."""

    conversation: int
    names: tuple[str, ...]
    settings: ToolSettings


def kept_files(paths) -> list[tuple[str, bytes | None]]:
    """A call's files with the bytes of its pictures: the model may overwrite a plot on a later call, and the
    block of this call should still show this one. Read here, on the model's thread, never on the window's."""
    kept = []
    for path in paths:
        path, data = Path(path), None
        if path.suffix.lower() in PICTURES:
            try:
                if path.stat().st_size <= KEPT_FILE_BYTES:
                    data = path.read_bytes()
            except OSError:
                pass
        kept.append((str(path), data))
    return kept


def _message(error: BaseException) -> str:
    if isinstance(error, MlxOssError | OSError | ValueError):
        return str(error)
    return f"unexpected error: {type(error).__name__}: {error}"


class ModelHost(QObject):
    """Owns the loaded model and its engine, on a thread of its own; one request at a time."""

    load_requested = Signal(int, str, str, int)  # request number, model, backend, context length
    generate_requested = Signal(object, object, object, object)  # Conversation, SamplingParams, CancelToken, tools
    close_tools_requested = Signal(int)  # a conversation deleted: its python process ends

    loaded = Signal(int, str)  # request number, a one-line description of what was loaded
    load_failed = Signal(int, str)
    reasoning = Signal(str)
    answer = Signal(str)
    tool_started = Signal(str, str)  # recipient, content (the code, the arguments)
    tool_finished = Signal(object, object)  # agent.ToolFinished, the files it made with kept bytes (kept_files)
    turn_messages = Signal(object)  # the turn's harmony messages (list[Message]): what later turns send again
    context_used = Signal(int)  # tokens the conversation takes after a turn of several steps (their stats add up)
    finished = Signal(object)  # Done
    failed = Signal(str)

    def __init__(self, store=None, tool_factory: ToolFactory | None = None):
        super().__init__()
        self.store = store  # where hub names are looked up (the window's model store)
        self.tool_factory = tool_factory or make_tool
        # Each conversation's tools, built on this thread at its first call (a kernel starts slowly) and kept, so
        # python's variables live on between turns; rebuilt when their settings change.
        self.tools: dict[int, dict[str, tuple[ToolSettings, BuiltinTool]]] = {}
        self.engine: Engine | None = None
        self.thread = QThread()
        self.thread.setObjectName("model")
        self.moveToThread(self.thread)
        self.load_requested.connect(self._load)
        self.generate_requested.connect(self._generate)
        self.close_tools_requested.connect(self._close_tools)
        self.thread.start()

    def stop(self) -> None:
        """End the thread, then the tools' processes (nothing else touches them once the thread is over)."""
        self.thread.quit()
        self.thread.wait()
        for conversation in list(self.tools):
            self._close_tools(conversation)

    @Slot(int)
    def _close_tools(self, conversation: int) -> None:
        for _, tool in self.tools.pop(conversation, {}).values():
            try:
                tool.close()
            except Exception:  # noqa: BLE001 - a tool that fails to close must not stop the others
                traceback.print_exc()

    def _tools_for(self, request: ToolRequest) -> dict[str, BuiltinTool]:
        held = self.tools.setdefault(request.conversation, {})
        settings = dataclasses.replace(request.settings, enabled=())  # switching browser on keeps python's state
        for name in request.names:
            if name in held and held[name][0] != settings:
                old = held.pop(name)[1]
                old.close()
            if name not in held:
                held[name] = (settings, self.tool_factory(name, request.settings))
        return {name: held[name][1] for name in request.names}

    @Slot(int, str, str, int)
    def _load(self, number: int, model: str, backend: str, context_length: int) -> None:
        from mlx_oss.cli import format_count
        from mlx_oss.layouts import parameter_count
        from mlx_oss.loading import load
        from mlx_oss.prompt_cache import PromptCacheSettings
        from mlx_oss.store import resolve_model

        self.engine = None
        # What exists now (Qt, the libraries) and what a load leaves (numba's typing tables, the model) lives as
        # long as the app: frozen out of the collector, a full collection does not walk it. Unfrozen, one walk of
        # a few hundred thousand objects, triggered by a load's allocations, would hold the GIL, and so the
        # window, for a visible moment.
        gc.freeze()
        try:
            path = resolve_model(model, backend, self.store)
            loaded = load(path, backend=backend)
            # the chat's and the server's defaults: recent conversations in memory, long prompts on disk
            self.engine = Engine(loaded, context_length=context_length, prompt_cache=PromptCacheSettings())
        except BaseException as e:  # noqa: BLE001 - every failure becomes a message in the window
            self.load_failed.emit(number, _message(e))
            return
        finally:
            gc.freeze()
        size = format_count(parameter_count(loaded.config))
        self.loaded.emit(number, f"{model} ({size} parameters, {loaded.backend} backend)")

    @Slot(object, object, object, object)
    def _generate(
        self, conversation: Conversation, sampling: SamplingParams, cancel: CancelToken, tools: ToolRequest | None
    ) -> None:
        if self.engine is None:
            self.failed.emit("no model is loaded")
            return
        if tools is not None and tools.names:
            self._run_turn(conversation, sampling, cancel, tools)
            return
        try:
            for event in self.engine.respond(conversation, sampling, cancel):
                if isinstance(event, ReasoningDelta):
                    self.reasoning.emit(event.text)
                elif isinstance(event, AnswerDelta):
                    self.answer.emit(event.text)
                elif isinstance(event, ToolCall):
                    self.answer.emit(f"\n\n*(the model called the tool `{event.recipient}`; this chat has none)*")
                elif isinstance(event, Done):
                    self.finished.emit(event)
        except BaseException as e:  # noqa: BLE001
            self.failed.emit(_message(e))

    def _run_turn(
        self, conversation: Conversation, sampling: SamplingParams, cancel: CancelToken, request: ToolRequest
    ) -> None:
        """A turn in which the model may call its tools (`agent.run_turn`): the calls and their outputs are signals
        too, and the turn's messages, tool results included, go back to be stored for the next turns."""
        from mlx_oss.agent import ToolFinished, ToolStarted, run_turn

        before = len(conversation.messages)
        done = None
        try:
            tools = self._tools_for(request)
            conversation = dataclasses.replace(conversation, builtin_tools=tuple(tools))
            before = len(conversation.messages)
            for event in run_turn(self.engine, conversation, tools, sampling, cancel):
                if isinstance(event, ReasoningDelta):
                    self.reasoning.emit(event.text)
                elif isinstance(event, AnswerDelta):
                    self.answer.emit(event.text)
                elif isinstance(event, ToolStarted):
                    self.tool_started.emit(event.recipient, event.content)
                elif isinstance(event, ToolFinished):
                    self.tool_finished.emit(event, kept_files(event.output.files))
                elif isinstance(event, ToolCall):
                    self.answer.emit(f"\n\n*(the model called `{event.recipient}`, which this chat does not have)*")
                elif isinstance(event, Done):
                    done = event
        except BaseException as e:  # noqa: BLE001
            self.turn_messages.emit(list(conversation.messages[before:]))
            self.failed.emit(_message(e))
            return
        self.turn_messages.emit(list(conversation.messages[before:]))
        # A turn's stats add every step's prompt up; the size of the next prompt says what the conversation uses.
        self.context_used.emit(len(render_prompt(conversation)))
        if done is None:
            self.failed.emit("the turn ended without an answer")
        else:
            self.finished.emit(done)


class ToolCheck(QObject):
    """Asks each built-in tool, on a thread of its own, whether it can run here (finding bubblewrap, probing a
    sandbox takes a moment): `checked` carries {name: None, or why not}."""

    checked = Signal(object)

    def __init__(self, settings: ToolSettings, factory: ToolFactory | None = None):
        super().__init__()
        self.settings, self.factory = settings, factory or make_tool
        self.thread = QThread()
        self.thread.setObjectName("tool check")
        self.moveToThread(self.thread)
        self.thread.started.connect(self._run)

    def start(self) -> None:
        self.thread.start()

    @Slot()
    def _run(self) -> None:
        reasons: dict[str, str | None] = {}
        for name in BUILTIN_TOOLS:
            try:
                tool = self.factory(name, self.settings)
                try:
                    reasons[name] = tool.unavailable()
                finally:
                    tool.close()
            except BaseException as e:  # noqa: BLE001 - a tool that cannot even be built is unavailable
                reasons[name] = _message(e) if not isinstance(e, ImportError) else f"not installed ({e})"
        self.checked.emit(reasons)
        self.thread.quit()


class Task(QObject):
    """One long job (a download, a conversion) on its own thread: `work(report, cancel)` returns a message."""

    progress = Signal(object, object, str)  # done, total (bytes: past a C int), note
    succeeded = Signal(str)
    failed = Signal(str)

    def __init__(self, work: Callable[[Callable[[int, int, str], None], CancelToken], str]):
        super().__init__()
        self.work = work
        self.cancel = CancelToken()
        self.thread = QThread()
        self.thread.setObjectName("task")
        self.moveToThread(self.thread)
        self.thread.started.connect(self._run)

    def start(self) -> None:
        self.thread.start()

    @Slot()
    def _run(self) -> None:
        try:
            self.succeeded.emit(self.work(self.progress.emit, self.cancel))
        except BaseException as e:  # noqa: BLE001
            if not isinstance(e, MlxOssError | OSError):
                traceback.print_exc()
            self.failed.emit(_message(e))
        finally:
            self.thread.quit()
