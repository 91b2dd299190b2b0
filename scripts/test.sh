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
# tests/test_codex.py and tests/test_claude_code.py drive the real agents (pinned) against the server; they skip
# only where npm is missing. A failed install leaves them missing, and those tests fail saying so; the rest still
# run. Both go in one command: `npm install --no-save` of one package removes the other.
agents=("@openai/codex@0.171.0" "@anthropic-ai/claude-code@2.1.332")
installed() {  # every pinned agent is in .venv/node at its version
    local spec name
    for spec in "${agents[@]}"; do
        name=${spec%@*}
        grep -qs "\"version\": \"${spec##*@}\"" ".venv/node/node_modules/$name/package.json" || return 1
    done
}
if command -v npm >/dev/null && ! installed; then
    npm install --prefix .venv/node --no-save --no-audit --no-fund --loglevel=error "${agents[@]}" >/dev/null ||
        echo "scripts/test.sh: npm could not install ${agents[*]}" >&2
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
