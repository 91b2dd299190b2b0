#!/usr/bin/env bash
# Build the double-click app with PyInstaller: dist/mlx-oss/ (Linux: run dist/mlx-oss/mlx-oss, or install the
# .desktop file) or dist/mlx-oss.app (macOS). The build venv holds only what the app runs: no torch, no transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
started=$(date +%s)
venv=build/venv
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
extras="app,serve,fast"  # fast: the NumPy backend's compiled kernels (numba; its marker limits it to x86-64)
[ "$(uname -s)" = Darwin ] && extras="$extras,mlx"
"${pip[@]}" "pyinstaller>=6.6" ".[$extras]"
rm -rf dist/mlx-oss dist/mlx-oss.app
"$venv/bin/pyinstaller" --noconfirm --log-level WARN --distpath dist --workpath build/pyinstaller packaging/mlx-oss.spec
if [ "$(uname -s)" = Darwin ]; then
    bundle=dist/mlx-oss.app
    executable=$bundle/Contents/MacOS/mlx-oss
else
    bundle=dist/mlx-oss
    executable=$bundle/mlx-oss
    cp packaging/mlx-oss.desktop "$bundle/"
    cp app/icon.png "$bundle/mlx-oss.png"
    tar -C dist -czf dist/mlx-oss-linux-$(uname -m).tar.gz mlx-oss
fi
echo "built $bundle in $(( $(date +%s) - started )) s: $(du -sh "$bundle" | cut -f1) ($executable)"
