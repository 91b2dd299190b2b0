"""`--self-check`: prove an installation (or a bundle) has every module and data file the app needs.

It writes a tiny synthetic model to a temporary folder, opens the main window offscreen on it, renders a harmony
prompt with the bundled vocabulary, generates a few tokens and prints one line. The tokens run on the backend a
downloaded model would run on here (`backend="auto"`): MLX on Apple silicon, which the macOS bundle is for, NumPy with
its compiled kernels elsewhere; a bundle or wheel that lost that backend's modules fails here, not at a user's first
chat. Nothing of the user's (settings, conversations, models) is read or written.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TOKENS = 5


def self_check() -> int:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mlx-oss-self-check-") as work:
        work = Path(work)
        os.environ["MLX_OSS_APP_DIR"] = str(work / "app")
        os.environ["MLX_OSS_MODELS"] = str(work / "store")
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

        from PySide6 import __version__ as qt_version
        from PySide6.QtWidgets import QApplication

        import mlx_oss
        from mlx_oss.converters.synthetic import preset_config, write_synthetic
        from mlx_oss.engine import Engine, SamplingParams
        from mlx_oss.harmony import Conversation, Message, render_prompt

        from .main_window import MainWindow
        from .settings import AppSettings

        model_dir = write_synthetic(work / "tiny", preset_config("tiny"))
        AppSettings(model=str(model_dir)).save()
        app = QApplication.instance() or QApplication(sys.argv[:1])
        window = MainWindow()
        window.show()
        app.processEvents()
        window_ok = window.model_label.text() == str(model_dir)
        window.close()

        prompt = render_prompt(Conversation([Message.user("Self-check")], current_date="2026-01-01"))
        # Loaded off the main thread, as the app does: the compiled kernels then build in a child process,
        # which in a bundle is the bundle's own executable (`-m`, see packaging/launcher.py).
        try:
            with ThreadPoolExecutor(1) as loader:
                model = loader.submit(mlx_oss.load, model_dir, backend="auto").result()
        except mlx_oss.MlxOssError as e:  # e.g. an installation without its backend's modules
            print(f"mlx-oss self-check: FAILED: {e}")
            return 1
        engine = Engine(model)
        *_, done = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=TOKENS))
    backend_ok, ran_on = _backend_runs(model)
    ok = window_ok and backend_ok and len(done.tokens) == TOKENS
    print(
        f"mlx-oss self-check: {'ok' if ok else 'FAILED'}: Qt {qt_version} window "
        f"{'opened' if window_ok else 'did not find the model'}, harmony prompt of {len(prompt)} tokens, "
        f"{len(done.tokens)} tokens generated on {ran_on}, {time.perf_counter() - started:.1f} s"
    )
    return 0 if ok else 1


def _backend_runs(model) -> tuple[bool, str]:
    """Whether the backend ran as this installation ships it, and what ran, for the report line."""
    if model.backend == "mlx":
        import mlx.core as mx

        # `auto` picks MLX on Apple silicon, for its GPU: MLX on the CPU there means Metal did not come along.
        device = mx.default_device()
        ok = device == mx.gpu
        return ok, f"mlx ({device}){'' if ok else ' (FAILED: not on the GPU)'}"
    from mlx_oss.cpu import kernels

    # Kernels that are shipped must run, and build in a child process; a CPU without AVX2, or a build without
    # numba, runs the plain path.
    ok = not kernels.BROKEN and model.uses_kernels == kernels.available()
    ok = ok and (not model.uses_kernels or kernels.compile_in_child().returncode == 0)
    failed = "" if ok else " (FAILED: the shipped kernels do not run, or not in a child process)"
    return ok, f"numpy with {model.kernel_description}{failed}"
