#!/usr/bin/env bash
# Set up .venv and run mlx-oss. With no model given it writes a tiny synthetic one to try.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
model=${1:-models/tiny}
if [ ! -e "$model" ]; then
    .venv/bin/python -m mlx_oss.converters synth "$model" --preset tiny
fi
exec .venv/bin/python -m mlx_oss.bench --model "$model" "${@:2}"
