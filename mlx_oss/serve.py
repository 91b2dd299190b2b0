"""`python -m mlx_oss.serve`: an OpenAI-compatible server for editors, agents and scripts, offline.

    python -m mlx_oss.serve --model openai/gpt-oss-20b [--backend auto|mlx|numpy] [--port 8080]

then point any OpenAI client at http://127.0.0.1:8080/v1 (any API key, unless --api-key is set).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from .cli import run
from .errors import MlxOssError
from .loading import BACKENDS

PROG = "python -m mlx_oss.serve"
DEFAULT_PORT = 8080
KEY_ENV = "MLX_OSS_API_KEY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a hub name in the model store (openai/gpt-oss-20b) or a directory")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this computer only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--api-key", default=os.environ.get(KEY_ENV), help=f"required on every request (or {KEY_ENV})")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow listening on an address other computers can reach (needs --api-key)",
    )
    p.add_argument("--context", type=int, default=16384, help="tokens of context per conversation (default 16384)")
    p.add_argument("--max-waiting", type=int, default=8, help="requests that may wait their turn (default 8)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not is_loopback(args.host):
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
    server = Server(Engine(model, context_length=args.context), model_id, args.api_key, args.max_waiting)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"serving {model_id} ({model.backend} backend) at http://{host}:{args.port}/v1"
        + (" (API key required)" if args.api_key else ""),
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(server.app(), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), PROG)
