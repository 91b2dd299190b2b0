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
# tests/test_codex.py drives the real Codex CLI (pinned) against the server; it skips only where npm is missing.
# A failed install leaves it missing, and that test fails saying so; the rest still run.
codex_version=0.171.0
if command -v npm >/dev/null &&
    ! grep -qs "\"version\": \"$codex_version\"" .venv/node/node_modules/@openai/codex/package.json; then
    npm install --prefix .venv/node --no-save --no-audit --no-fund --loglevel=error "@openai/codex@$codex_version" \
        >/dev/null || echo "scripts/test.sh: npm could not install @openai/codex@$codex_version" >&2
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
