"""`python -m mlx_oss.models`, the command that lists, downloads, converts and deletes models.

Its code is `mlx_oss.models_cli`; this module only runs it, so the documented command keeps its short name.
"""

import sys

from .cli import run
from .models_cli import PROG, main

if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), PROG)
