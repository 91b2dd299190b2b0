#!/usr/bin/env bash
# Set up .venv and start the terminal chat. `scripts/run.sh MODEL [chat options]` chats with MODEL (a model
# directory); with no model it writes a tiny synthetic one (random weights: its answers are gibberish).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
if [ $# -gt 0 ]; then
    exec .venv/bin/python -m mlx_oss.chat --model "$1" "${@:2}"
fi
model=models/tiny
if [ ! -e "$model" ]; then
    .venv/bin/python -m mlx_oss.converters synth "$model" --preset tiny >&2
fi
echo "No model given: chatting with $model, a tiny synthetic model with random weights (expect gibberish)." >&2
exec .venv/bin/python -m mlx_oss.chat --model "$model" --max-tokens 200
