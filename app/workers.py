"""Slow work off the GUI thread: the model (loading, generating) and tasks (downloads, conversions).

Each worker is a QObject moved to its own QThread; the window talks to it through queued signals and hears back
through signals, so the event loop never waits on a model, a disk or the network. Cancellation is a
`CancelToken` the window sets directly (it is thread-safe); the worker stops at its next step.
"""

from __future__ import annotations

import gc
import traceback
from collections.abc import Callable

from PySide6.QtCore import QObject, QThread, Signal, Slot

from mlx_oss.cancel import CancelToken
from mlx_oss.engine import AnswerDelta, Done, Engine, ReasoningDelta, SamplingParams, ToolCall
from mlx_oss.errors import MlxOssError
from mlx_oss.harmony import Conversation


def _message(error: BaseException) -> str:
    if isinstance(error, MlxOssError | OSError | ValueError):
        return str(error)
    return f"unexpected error: {type(error).__name__}: {error}"


class ModelHost(QObject):
    """Owns the loaded model and its engine, on a thread of its own; one request at a time."""

    load_requested = Signal(int, str, str, int)  # request number, model, backend, context length
    generate_requested = Signal(object, object, object)  # Conversation, SamplingParams, CancelToken

    loaded = Signal(int, str)  # request number, a one-line description of what was loaded
    load_failed = Signal(int, str)
    reasoning = Signal(str)
    answer = Signal(str)
    finished = Signal(object)  # Done
    failed = Signal(str)

    def __init__(self, store=None):
        super().__init__()
        self.store = store  # where hub names are looked up (the window's model store)
        self.engine: Engine | None = None
        self.thread = QThread()
        self.thread.setObjectName("model")
        self.moveToThread(self.thread)
        self.load_requested.connect(self._load)
        self.generate_requested.connect(self._generate)
        self.thread.start()

    def stop(self) -> None:
        self.thread.quit()
        self.thread.wait()

    @Slot(int, str, str, int)
    def _load(self, number: int, model: str, backend: str, context_length: int) -> None:
        from mlx_oss.cli import format_count
        from mlx_oss.layouts import parameter_count
        from mlx_oss.loading import load
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
            self.engine = Engine(loaded, context_length=context_length)
        except BaseException as e:  # noqa: BLE001 - every failure becomes a message in the window
            self.load_failed.emit(number, _message(e))
            return
        finally:
            gc.freeze()
        size = format_count(parameter_count(loaded.config))
        self.loaded.emit(number, f"{model} ({size} parameters, {loaded.backend} backend)")

    @Slot(object, object, object)
    def _generate(self, conversation: Conversation, sampling: SamplingParams, cancel: CancelToken) -> None:
        if self.engine is None:
            self.failed.emit("no model is loaded")
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
