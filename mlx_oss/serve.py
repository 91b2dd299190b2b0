"""`python -m mlx_oss.serve`: an OpenAI-compatible server for editors, agents and scripts, offline.

    python -m mlx_oss.serve --model openai/gpt-oss-20b [--backend auto|mlx|numpy] [--port 8080]

then point any OpenAI client at http://127.0.0.1:8080/v1 (any API key, unless --api-key is set).

Without --api-key, only requests addressed to this computer (Host localhost, 127.x.y.z or [::1]) are answered,
so that no web page can reach the server under a name of its own (DNS rebinding); --allow-host adds a name.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .cli import non_negative_int, port, positive_int, run
from .errors import MlxOssError
from .hosts import host_name, is_loopback_name
from .loading import BACKENDS

PROG = "python -m mlx_oss.serve"
DEFAULT_PORT = 8080
KEY_ENV = "MLX_OSS_API_KEY"


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
        type=positive_int,
        default=16384,
        help="tokens of context per conversation (default 16384; at most the model's own)",
    )
    p.add_argument(
        "--max-waiting",
        type=non_negative_int,
        default=8,
        help="requests that may wait their turn while one runs (default 8; 0: only the running one)",
    )
    return p


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

    path = resolve_model(args.model, args.backend)
    print(f"loading {path} ...", file=sys.stderr, flush=True)
    model = load(path, backend=args.backend)
    encoding()  # read the vocabulary before the first request
    model_id = args.model if not Path(args.model).expanduser().is_dir() else Path(args.model).resolve().name
    engine = Engine(model, context_length=args.context)
    server = Server(engine, model_id, args.api_key, args.max_waiting, tuple(args.allow_host))
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"serving {model_id} ({model.backend} backend) at http://{host}:{args.port}/v1"
        + (" (API key required)" if args.api_key else ""),
        file=sys.stderr,
        flush=True,
    )
    logging.basicConfig(format="%(levelname)s:    %(message)s")  # the server's own one-line errors, as uvicorn's
    uvicorn.run(server.app(), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), PROG)
