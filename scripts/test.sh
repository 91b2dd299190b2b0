#!/usr/bin/env bash
# Set up .venv with the test tools (torch's CPU build and transformers as the reference) and run
# the linter and the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if [ "$(uname -s)" = Linux ]; then
    # Pin torch first: an unpinned torch would pull a multi-GB CUDA build on Linux.
    "${pip[@]}" torch==2.13.0
fi
"${pip[@]}" -e '.[test]'
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
