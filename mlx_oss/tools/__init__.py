"""gpt-oss's built-in tools, run on the user's own computer: `python` (a stateful, sandboxed Python) and `browser`
(search, open, find, with citations). Harmony declares them in the system message; the model calls them on the
analysis channel (`to=python`, `to=browser.search`), and the agent loop (`mlx_oss.agent`) runs each call and
hands the result back as the tool's message.

Every tool has the same small contract (`BuiltinTool`), so the loop, the terminal chat, the app and the server
know no tool's insides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..cancel import CancelToken

PYTHON, BROWSER = "python", "browser"
BUILTIN_TOOLS = (PYTHON, BROWSER)


@dataclass(frozen=True)
class Citation:
    """What a browser citation `【cursor†Lx-Ly】` points at: the page's `url` and `title`."""

    cursor: int
    url: str
    title: str = ""


@dataclass(frozen=True)
class ToolOutput:
    """One call's result: `text` is what the model reads (truncated sensibly), `display` what the user sees in full;
    `files` are what the call made that a front end can show (a plot's PNG); `citations` the pages a browser call
    opened, by cursor; `error` says the call failed (a traceback, a time limit, a page that would not load)."""

    text: str
    display: str = ""
    files: tuple[Path, ...] = ()
    citations: tuple[Citation, ...] = ()
    error: bool = False


class BuiltinTool(Protocol):
    """A built-in tool: `name` is its harmony namespace (`python`, `browser`)."""

    name: str

    def unavailable(self) -> str | None:
        """None when the tool can run here; else why not, in words for the user (the model is told the tool is
        unavailable)."""

    def run(self, recipient: str, content: str, cancel: CancelToken) -> ToolOutput:
        """Runs one call: `recipient` is what the model addressed (`python`, `browser.search`), `content` what it
        wrote (code, or JSON arguments). Never raises for a bad call: the error is the output the model reads."""

    def close(self) -> None:
        """Ends the tool's processes (a conversation closed, the program exits)."""


@dataclass
class ToolSettings:
    """What the user chose for the built-in tools (the app's settings, the chat's and server's flags)."""

    enabled: tuple[str, ...] = ()
    work_dir: Path | None = None  # python's working folder (None: one per conversation under the user data dir)
    python_timeout_s: float = 120.0  # the model is told 120 s
    python_memory_mb: int = 2048
    search_backend: str = "duckduckgo"  # needs no key
    search_url: str | None = None  # the backend's address, for a self-hosted one (and tests)
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)  # loopback names the browser may open
