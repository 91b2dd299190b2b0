"""`python -m mlx_oss.serve`: an OpenAI-compatible server for editors, agents and scripts, offline.

    python -m mlx_oss.serve --model openai/gpt-oss-20b [--backend auto|mlx|numpy] [--port 8080]

then point any OpenAI client at http://127.0.0.1:8080/v1 (any API key, unless --api-key is set).

Without --api-key, only requests addressed to this computer (Host localhost, 127.x.y.z or [::1]) are answered,
so that no web page can reach the server under a name of its own (DNS rebinding); --allow-host adds a name.

--tools python,browser runs gpt-oss's built-in tools for the Responses API's hosted ones (code_interpreter,
web_search) on this computer: python in a sandbox, one kernel for the server, working in --work-dir (by default
server-python under the user data folder); a browser for each request, searching through --search-backend. A tool
that cannot run here (no sandbox, say) stops the server from starting, with why: it was asked for by name.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from . import prompt_cache
from .cli import add_kv_bits_argument, context_length, non_negative_int, port, run
from .drafting import add_draft_arguments
from .errors import MlxOssError
from .hosts import host_name, is_loopback_name
from .loading import BACKENDS
from .memory_estimate import context_for_load
from .tools import BROWSER, BUILTIN_TOOLS, PYTHON, BuiltinTool, ToolSettings
from .tools.search import BACKENDS as SEARCH_BACKENDS

PROG = "python -m mlx_oss.serve"
DEFAULT_PORT = 8080
KEY_ENV = "MLX_OSS_API_KEY"


def tool_names(text: str) -> tuple[str, ...]:
    """--tools: built-in tools by name, comma-separated (python,browser), each once."""
    names = tuple(name.strip().lower() for name in text.split(","))
    for name in names:
        if name not in BUILTIN_TOOLS:
            shown = repr(name) if name else "an empty name"
            raise argparse.ArgumentTypeError(f"{shown} is not a built-in tool (they are {', '.join(BUILTIN_TOOLS)})")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names a tool twice")
    return names


def search_url(text: str) -> str:
    """--search-url: an http(s) address."""
    if not text.startswith(("http://", "https://")) or len(text) < 10:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http or https URL")
    return text


def allowed_host(text: str) -> str:
    """A host name for --allow-host: a name or address (an IPv6 one with or without brackets), without port."""
    bare = text.strip()
    name = host_name(bare if ":" not in bare or bare.startswith("[") else f"[{bare}]")
    if name is None or name != bare.lower().removeprefix("[").removesuffix("]") or not name.strip("."):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name (give it without port or scheme)")
    return name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a hub name in the model store (openai/gpt-oss-20b) or a directory")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    add_kv_bits_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this computer only)")
    p.add_argument("--port", type=port, default=DEFAULT_PORT, help=f"1 to 65535 (default {DEFAULT_PORT})")
    p.add_argument("--api-key", default=os.environ.get(KEY_ENV), help=f"required on every request (or {KEY_ENV})")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow listening on an address other computers can reach (needs --api-key)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        type=allowed_host,
        metavar="NAME",
        help="also answer requests addressed to NAME (e.g. a name this computer has on your network); may be "
        "repeated. Without --api-key only localhost and loopback addresses are answered",
    )
    p.add_argument(
        "--context",
        type=context_length,
        default=16384,
        help="tokens of context per conversation (default 16384; at most the model's own; auto: the longest that "
        "fits in this computer's memory)",
    )
    p.add_argument(
        "--max-waiting",
        type=non_negative_int,
        default=8,
        help="requests that may wait their turn while one runs (default 8; 0: only the running one)",
    )
    p.add_argument(
        "--tools",
        type=tool_names,
        default=(),
        metavar="python,browser",
        help="run these built-in tools for the Responses API's hosted code_interpreter (python) and web_search "
        "(browser); without it a request for them gets a warning header and no tool",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="python's working folder, the only one its code may write (default: server-python under the user "
        "data folder)",
    )
    p.add_argument(
        "--search-backend",
        choices=SEARCH_BACKENDS,
        default="duckduckgo",
        help="where the browser searches (default duckduckgo, which needs no key; searxng needs --search-url)",
    )
    p.add_argument("--search-url", type=search_url, metavar="URL", help="the search backend's address (searxng's)")
    prompt_cache.add_flags(p)
    add_draft_arguments(p)
    return p


def default_work_dir() -> Path:
    """Python's working folder when --work-dir is not given: one for the server, under the user data folder."""
    import platformdirs

    return Path(platformdirs.user_data_dir("mlx-oss", appauthor=False)) / "server-python"


def builtin_tools(args: argparse.Namespace) -> dict[str, BuiltinTool | Callable[[], BuiltinTool]]:
    """The tools --tools asks for, each checked to run here (else a one-line error saying why not): python itself,
    one kernel for the server; the browser as a factory, one for each request (see `Server`)."""
    if not args.tools:
        return {}
    if args.search_backend == "searxng" and not args.search_url:
        raise MlxOssError("--search-backend searxng needs --search-url (the SearXNG server's address)")
    work_dir = (args.work_dir or default_work_dir()).expanduser()
    settings = ToolSettings(
        enabled=args.tools, work_dir=work_dir, search_backend=args.search_backend, search_url=args.search_url
    )
    made: dict[str, BuiltinTool] = {}
    try:
        for name in args.tools:
            made[name] = make_tool(name, settings)
            why = made[name].unavailable()
            if why:
                raise MlxOssError(f"--tools {name}: the tool cannot run here: {why}")
    except BaseException:
        close_tools(made)
        raise
    if BROWSER in made:
        made[BROWSER].close()
    return {name: tool if name == PYTHON else functools.partial(type(tool), settings) for name, tool in made.items()}


def close_tools(tools) -> None:
    """Ends the tools the server holds (python's kernel and its sandbox); a factory holds nothing."""
    for tool in tools.values():
        if not callable(tool):
            tool.close()


def make_tool(name: str, settings: ToolSettings) -> BuiltinTool:
    try:
        if name == PYTHON:
            from .tools.python import PythonTool

            settings.work_dir.mkdir(parents=True, exist_ok=True)
            return PythonTool(settings, settings.work_dir)
        from .tools.browser import BrowserTool

        return BrowserTool(settings)
    except ImportError as e:
        raise MlxOssError(
            f"--tools {name} needs its extra ({e.name} is missing): pip install 'mlx-oss[tools]'"
        ) from None
    except OSError as e:
        raise MlxOssError(f"--tools {name}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not is_loopback_name(args.host.lower()):
        if not args.allow_remote:
            raise MlxOssError(
                f"--host {args.host} lets other computers reach the model: add --allow-remote and --api-key"
            )
        if not args.api_key:
            raise MlxOssError(f"--host {args.host} with --allow-remote needs --api-key (or {KEY_ENV})")
    try:
        import uvicorn

        from .server import Server
    except ImportError as e:
        raise MlxOssError(f"the server needs its extra ({e.name} is missing): pip install 'mlx-oss[serve]'") from None
    from .engine import Engine
    from .harmony import encoding
    from .loading import load
    from .store import resolve_model

    tools = builtin_tools(args)  # before the model loads: a tool that cannot run is said at once
    path = resolve_model(args.model, args.backend)
    context = context_for_load(
        path, args.backend, args.context, args.kv_bits, lambda line: print(line, file=sys.stderr)
    )
    print(f"loading {path} ...", file=sys.stderr, flush=True)
    model = load(path, backend=args.backend)
    model.kv_bits = args.kv_bits
    encoding()  # read the vocabulary before the first request
    model_id = args.model if not Path(args.model).expanduser().is_dir() else Path(args.model).resolve().name
    engine = Engine(
        model,
        context_length=context,
        draft_tokens=args.draft,
        prompt_cache=prompt_cache.PromptCacheSettings.from_args(args),
    )
    server = Server(engine, model_id, args.api_key, args.max_waiting, tuple(args.allow_host), tools)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"serving {model_id} ({model.backend} backend) at http://{host}:{args.port}/v1"
        + (" (API key required)" if args.api_key else "")
        + (f"; tools: {', '.join(tools)}" if tools else ""),
        file=sys.stderr,
        flush=True,
    )
    logging.basicConfig(format="%(levelname)s:    %(message)s")  # the server's own one-line errors, as uvicorn's
    try:
        uvicorn.run(server.app(), host=args.host, port=args.port, log_level="warning")
    finally:
        close_tools(tools)  # python's kernel and its sandbox end with the server
    return 0


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), PROG)
