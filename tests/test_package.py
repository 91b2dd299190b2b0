"""The package as users meet it: a light import and the benchmark command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HEAVY = ["torch", "transformers", "mlx", "PySide6", "huggingface_hub"]


def test_import_is_light():
    code = (
        "import sys, mlx_oss, mlx_oss.cpu, mlx_oss.converters.synthetic, mlx_oss.converters.layout, mlx_oss.engine\n"
        "import mlx_oss.store, mlx_oss.hub, mlx_oss.models, mlx_oss.chat\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_openblas_threads_are_told_not_to_spin_unless_the_user_says_otherwise():
    """OpenBLAS reads OPENBLAS_THREAD_TIMEOUT as NumPy loads it: `import mlx_oss` sets it first, keeping a user's."""
    code = "import os, mlx_oss, numpy; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    theirs = subprocess.run(
        [sys.executable, "-c", code], env=env | {"OPENBLAS_THREAD_TIMEOUT": "28"}, capture_output=True, text=True
    )
    assert (ours.stdout.strip(), theirs.stdout.strip()) == ("16", "28")


def test_bench_prints_its_figures(tiny_checkpoint, backend):
    cmd = [
        sys.executable,
        "-m",
        "mlx_oss.bench",
        "--model",
        str(tiny_checkpoint),
        "--prompt-tokens",
        "5",
        "--gen-tokens",
        "2",
        "--context",
        "300",
        "--backend",
        backend,
        "--json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["backend"] == backend and result["prompt_tokens"] == 5 and result["gen_tokens"] == 2
    assert result["context_tokens"] == 300
    keys = ["load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "decode_context_tok_s", "peak_rss_bytes"]
    for key in [*keys, "private_bytes", "threads"]:
        assert result[key] > 0, key
    if backend == "numpy":
        from mlx_oss.cpu import kernels

        assert ("numba kernels" if kernels.available() else "plain NumPy") in result["backend_reason"]
    table = subprocess.run(cmd[:-1], capture_output=True, text=True, check=True).stdout
    assert "decode at 300" in table and "tokens/s" in table and "peak RSS" in table


def test_bench_error_is_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mlx_oss.bench", "--model", str(tmp_path / "none")], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert out.stderr == f"python -m mlx_oss.bench: error: {tmp_path / 'none'}: no such model directory\n"
