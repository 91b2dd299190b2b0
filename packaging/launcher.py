"""The bundled app's one executable: the desktop app; with `--serve ...` the OpenAI-compatible server that the app
starts as a child process; with `-m MODULE` a bundled module run as `python -m` would (how the NumPy backend
compiles its kernels in a child process, `kernels.warm_up`); or `--self-check`."""

import runpy
import sys


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "-m":
        module, sys.argv = sys.argv[2], sys.argv[2:]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        from mlx_oss.cli import run
        from mlx_oss.serve import PROG
        from mlx_oss.serve import main as serve

        run(lambda: serve(sys.argv[2:]), PROG)
    from mlx_oss.app.__main__ import main as app

    return app(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
