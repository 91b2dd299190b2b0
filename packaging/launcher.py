"""The bundled app's one executable: the desktop app, or (with `--serve ...`) the OpenAI-compatible server that
the app starts as a child process, or `--self-check`."""

import sys


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        from mlx_oss.cli import run
        from mlx_oss.serve import PROG
        from mlx_oss.serve import main as serve

        run(lambda: serve(sys.argv[2:]), PROG)
    from mlx_oss.app.__main__ import main as app

    return app(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
