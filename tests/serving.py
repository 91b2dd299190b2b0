"""The real server app under uvicorn on 127.0.0.1, in the test's own process, and the real agents' binaries that
scripts/test.sh installs: what every test that drives the server over HTTP shares."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from mlx_oss.server import Server

NODE_BIN = Path(__file__).resolve().parents[1] / ".venv" / "node" / "node_modules" / ".bin"
# Where an agent's connections beyond loopback (telemetry, updates, plugin sync) go: a closed local port, so they
# fail at once instead of waiting on a network this machine does not have.
CLOSED_PORT_PROXY = "http://127.0.0.1:9"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc=None, timeout: float = 90) -> None:
    """Until `url/health` answers; `proc`, a server's subprocess, must not exit meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("the server did not come up")


@contextlib.contextmanager
def serving(server: Server, seen: list[dict] | None = None) -> Iterator[str]:
    """`server`'s app under uvicorn on 127.0.0.1, in this process; yields its URL. With `seen`, each POST's path
    and JSON body are recorded there, as the server received them."""
    app = server.app()
    port = free_port()
    runner = uvicorn.Server(
        uvicorn.Config(app if seen is None else recording(app, seen), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url)
        yield url
    finally:
        runner.should_exit = True
        thread.join(timeout=30)


def recording(app, seen: list[dict]):
    """`app`, recording each POST's path and JSON body in `seen`."""

    async def recorded(scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            chunks = []

            async def replay():
                message = await receive()
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    seen.append({"path": scope["path"], "body": json.loads(b"".join(chunks) or b"null")})
                return message

            return await app(scope, replay, send)
        return await app(scope, receive, send)

    return recorded


def agent_binary(name: str, package: str) -> Path:
    """The npm-installed agent `name` (scripts/test.sh installs `package` pinned in .venv/node); the test skips
    only where npm itself is missing, and fails where npm is here but the install is not."""
    if shutil.which("npm") is None:
        pytest.skip(f"npm is not installed: this test runs {package} (scripts/test.sh installs it with npm)")
    binary = NODE_BIN / name
    assert binary.exists(), (
        f"npm is here but {binary} is missing: scripts/test.sh installs {package} there (did npm install fail?)"
    )
    return binary


def run_agent(command: list[str], work: Path, home: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """An agent's run in `work` with its own `home`, offline but for loopback, and `env` besides; at most three
    minutes."""
    offline = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "TMPDIR": str(home.parent),
        "NO_COLOR": "1",
        **{name: CLOSED_PORT_PROXY for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")},
        "NO_PROXY": "127.0.0.1,localhost",
    }
    return subprocess.run(
        command, cwd=work, env={**offline, **env}, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180
    )
