"""The `python` built-in tool: the model's code runs in a stateful IPython kernel (ipykernel, driven through
jupyter_client) confined by `sandbox.py`, one kernel per conversation, started on the first call and kept, so
variables survive between calls as the tool's description promises.

We start the kernel process ourselves (not through KernelManager) because only we know how to stop a sandboxed
one: its pid is bwrap's, and a kernel that ignores an interrupt is ended by killing the sandbox. The kernel is spoken
to over ZeroMQ IPC sockets in a private runtime folder bound into the sandbox (its network namespace cannot reach
our loopback ports).

A call's output (streams, the last expression, display data, the traceback) comes back to the model truncated to
head and tail with a note of what was cut, and to the user in full (up to a cap, so an endless print cannot fill
memory); images are saved as PNG files in the working folder and named in both.
"""

from __future__ import annotations

import base64
import contextlib
import os
import queue
import re
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ..cancel import CancelToken
from . import PYTHON, ToolOutput, ToolSettings
from .sandbox import ConfinedProcess, Limits, Sandbox

MODEL_CHARS = 16_000  # what the model reads of one call's output, head and tail
DISPLAY_CHARS = 4_000_000  # what the user is shown in full, up to this
START_TIMEOUT_S = 60.0
INTERRUPT_GRACE_S = 5.0  # after an interrupt, how long the kernel has to come back before it is restarted
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def truncate(text: str, limit: int = MODEL_CHARS) -> str:
    """Head and tail of `text` with a line saying how much was cut between them."""
    if len(text) <= limit:
        return text
    keep = limit // 2
    cut = len(text) - 2 * keep
    return f"{text[:keep]}\n\n[... {cut} characters cut from the middle of the output ...]\n\n{text[-keep:]}"


class PythonTool:
    """`python`: a sandboxed, stateful Python per conversation, working in `work_dir`."""

    name = PYTHON

    def __init__(self, settings: ToolSettings, work_dir: Path, *, sandbox: Sandbox | None = None):
        self.settings = settings
        self.work_dir = Path(work_dir)
        self.sandbox = sandbox or Sandbox(Limits(memory_mb=settings.python_memory_mb))
        self._process: ConfinedProcess | None = None
        self._client = None
        self._runtime: Path | None = None
        self._log = None
        self._images = 0
        self.start_seconds: float | None = None  # the last kernel start's time, for the closing note and tests

    def unavailable(self) -> str | None:
        if getattr(sys, "frozen", False):  # sys.executable is the app itself: there is no Python to start a kernel
            return "the python tool needs a Python installation; the app bundle has none yet (pip install mlx-oss)"
        why = self.sandbox.unavailable()
        if why:
            return why
        try:
            import ipykernel  # noqa: F401
            import jupyter_client  # noqa: F401
        except ImportError:
            return "the python tool needs jupyter_client and ipykernel: pip install 'mlx-oss[tools]'"
        return None

    # -- the kernel -------------------------------------------------------------------------------------------------

    def _start(self) -> None:
        from jupyter_client import BlockingKernelClient
        from jupyter_client.connect import write_connection_file

        began = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._runtime = Path(tempfile.mkdtemp(prefix="mlx-oss-kernel-"))
        connection, _ = write_connection_file(
            str(self._runtime / "kernel.json"), transport="ipc", ip=str(self._runtime / "zmq")
        )
        self._log = open(self._runtime / "kernel.log", "wb")  # noqa: SIM115 (open while the kernel runs)
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", connection, "--HistoryManager.enabled=False"]
        self._process = self.sandbox.start(argv, self.work_dir, self._runtime, self._log)
        client = BlockingKernelClient(connection_file=connection)
        client.load_connection_file()
        client.start_channels()
        self._client = client
        deadline = began + START_TIMEOUT_S
        while True:  # wait_for_ready, but giving up at once when the sandbox dies
            if not self._process.alive():
                raise OSError(f"the sandboxed Python kernel exited at start: {self._log_tail()}")
            try:
                client.wait_for_ready(timeout=1)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise OSError(f"the sandboxed Python kernel did not start in {START_TIMEOUT_S:.0f} s") from None
        self.start_seconds = time.monotonic() - began

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = (self._runtime / "kernel.log").read_text(errors="replace").strip().splitlines()
            return " / ".join(lines[-3:]) or "no message"
        return "no message"

    def _stop(self, graceful: bool = True) -> None:
        """Ends the kernel: asked to shut down when it still listens, killed with its sandbox either way."""
        if self._client is not None:
            if graceful:
                with contextlib.suppress(Exception):
                    self._client.shutdown()
            with contextlib.suppress(Exception):
                self._client.stop_channels()
            self._client = None
        if self._process is not None:
            if graceful and self._process.alive():
                with contextlib.suppress(Exception):
                    self._process.popen.wait(2)
            self._process.kill()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)
            self._runtime = None

    def close(self) -> None:
        self._stop()

    def _interrupt(self) -> None:
        client = self._client
        with contextlib.suppress(Exception):
            client.control_channel.send(client.session.msg("interrupt_request", content={}))

    # -- a call -----------------------------------------------------------------------------------------------------

    def run(self, recipient: str, content: str, cancel: CancelToken) -> ToolOutput:
        why = self.unavailable()
        if why:
            return ToolOutput(text=f"The python tool is unavailable: {why}", error=True)
        lost = self._process is not None and not self._process.alive()
        if self._process is None or lost:
            self._stop(graceful=False)
            try:
                self._start()
            except Exception as error:  # noqa: BLE001 (the model reads what went wrong)
                self._stop(graceful=False)
                return ToolOutput(text=f"The Python kernel could not start: {error}", error=True)
        output = self._execute(content, cancel)
        if lost:  # state the model counts on is gone: say so
            note = "[the previous Python process had ended; this call ran in a fresh one]\n"
            output = replace(output, text=note + output.text, display=note + output.display)
        return output

    def _execute(self, code: str, cancel: CancelToken) -> ToolOutput:
        client = self._client
        with contextlib.suppress(queue.Empty):  # replies of earlier calls
            while True:
                client.get_shell_msg(timeout=0)
        msg_id = client.execute(code, store_history=True, allow_stdin=False)
        parts: list[str] = []
        size = 0
        files: list[Path] = []
        error = False
        note = ""
        deadline = time.monotonic() + self.settings.python_timeout_s
        interrupted_at = None

        def add(text: str) -> None:
            nonlocal size
            if size < DISPLAY_CHARS:
                text = text[: DISPLAY_CHARS - size]
                parts.append(text)
                size += len(text)

        while True:
            now = time.monotonic()
            if interrupted_at is None and (now > deadline or cancel.cancelled):
                interrupted_at = now
                error = True
                if cancel.cancelled:
                    note = "[the call was cancelled: the kernel was interrupted]"
                else:
                    note = f"[time limit of {self.settings.python_timeout_s:g} s reached: the kernel was interrupted]"
                self._interrupt()
            if interrupted_at is not None and now - interrupted_at > INTERRUPT_GRACE_S:
                note += "\n[the kernel did not stop, so it was restarted: variables and imports are lost]"
                self._stop(graceful=False)
                break
            if not self._process.alive():
                note += "\n[the Python process died (out of memory or killed); the next call starts a fresh one]"
                error = True
                self._stop(graceful=False)
                break
            try:
                message = client.get_iopub_msg(timeout=0.1)
            except queue.Empty:
                continue
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, body = message["msg_type"], message["content"]
            if kind == "status" and body.get("execution_state") == "idle":
                break
            if kind == "stream":
                add(body.get("text", ""))
            elif kind in ("execute_result", "display_data"):
                add(self._rich(body.get("data", {}), files))
            elif kind == "error":
                error = True
                add(strip_ansi("\n".join(body.get("traceback", [])) or f"{body.get('ename')}: {body.get('evalue')}"))
                add("\n")
        if size >= DISPLAY_CHARS:
            note = f"[output beyond {DISPLAY_CHARS} characters was dropped]\n" + note
        full = "".join(parts)
        if note:
            full = f"{full.rstrip()}\n{note.strip()}" if full.strip() else note.strip()
        text = truncate(full) if full else "[no output]"
        return ToolOutput(text=text, display=full, files=tuple(files), error=error)

    def _rich(self, data: dict, files: list[Path]) -> str:
        """A display's text: images saved to the working folder and named, else its plain text."""
        for mime, suffix in (("image/png", "png"), ("image/jpeg", "jpg"), ("image/gif", "gif")):
            if mime in data:
                try:
                    path = self._save(base64.b64decode(data[mime]), suffix)
                except (OSError, ValueError) as error:
                    return f"[an image could not be saved: {error}]\n"
                files.append(path)
                return f"[image saved to {path.name}]\n"
        if "text/plain" in data:
            text = strip_ansi(data["text/plain"])
            return text if text.endswith("\n") else text + "\n"
        return f"[display of type {', '.join(sorted(data))}]\n"

    def _save(self, data: bytes, suffix: str) -> Path:
        """Writes a new file in the working folder. The sandboxed code can plant a symlink there under the name we
        would pick (`output_1.png -> ~/.bashrc`), so the file is created exclusively and never through a link."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        while True:
            self._images += 1
            path = self.work_dir / f"output_{self._images}.{suffix}"
            try:
                fd = os.open(path, flags, 0o644)
            except FileExistsError:
                continue
            with open(fd, "wb") as out:
                out.write(data)
            return path
