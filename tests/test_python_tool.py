"""The `python` built-in tool on a real ipykernel in a real bubblewrap sandbox: state, output, limits, and escape
attempts that must fail (each asserting what happened instead)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pictures import png

from mlx_oss.cancel import CancelToken
from mlx_oss.tools import ToolSettings
from mlx_oss.tools.sandbox import find_bwrap, python_roots

pytest.importorskip("jupyter_client")
if not sys.platform.startswith("linux"):
    pytest.skip("the sandbox tests measure bubblewrap (Linux)", allow_module_level=True)
if find_bwrap() is None and not os.environ.get("CI"):
    pytest.skip("bubblewrap (bwrap) is not installed: apt-get install bubblewrap", allow_module_level=True)

from mlx_oss.tools.python import MODEL_CHARS, PythonTool  # noqa: E402

SECRET = "the-user's-private-data-7f3a"


def run(tool: PythonTool, code: str, cancel: CancelToken | None = None):
    return tool.run("python", code, cancel or CancelToken())


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A folder of the user's, outside the working folder, holding a secret."""
    folder = tmp_path_factory.mktemp("outside")
    (folder / "secret.txt").write_text(SECRET)
    return folder


@pytest.fixture(scope="module")
def tool(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    os.environ["MLX_OSS_TEST_SECRET"] = SECRET
    tool = PythonTool(ToolSettings(python_timeout_s=10, python_memory_mb=1024), work)
    assert tool.unavailable() is None
    yield tool
    tool.close()
    os.environ.pop("MLX_OSS_TEST_SECRET", None)


def test_state_survives_and_last_expression_shown(tool):
    began = time.monotonic()
    first = run(tool, "x = 41\nimport math")
    print(f"first call (kernel start {tool.start_seconds:.2f} s): {time.monotonic() - began:.2f} s")
    assert first.error is False and first.text == "[no output]"
    began = time.monotonic()
    second = run(tool, "print('hello')\nmath.sqrt(4) + x")
    print(f"a call's round trip: {(time.monotonic() - began) * 1000:.1f} ms")
    assert second.text == "hello\n43.0\n" and second.display == second.text and not second.error


def test_traceback_is_output_with_error(tool):
    out = run(tool, "def f():\n    return 1 / 0\nf()")
    assert out.error is True
    assert "ZeroDivisionError" in out.text and "division by zero" in out.text
    assert "\x1b[" not in out.text  # no ANSI colours


def test_display_data_image_saved_to_folder(tool):
    picture = png(4, 3)
    out = run(tool, f"from IPython.display import Image, display\ndisplay(Image(data={picture!r}))\n'done'")
    assert not out.error
    assert len(out.files) == 1 and out.files[0].parent == tool.work_dir and out.files[0].read_bytes() == picture
    assert f"[image saved to {out.files[0].name}]" in out.text and "'done'" in out.text


def test_long_output_truncated_for_the_model_in_full_for_the_user(tool):
    out = run(tool, "for i in range(20000): print(f'line {i:05d}')")
    assert len(out.display) == 20000 * 11 and out.display.startswith("line 00000") and "line 19999" in out.display
    assert len(out.text) < MODEL_CHARS + 200
    assert (
        out.text.startswith("line 00000") and out.text.rstrip().endswith("line 19999") and "characters cut" in out.text
    )


def test_working_folder_is_shared_and_tmp_is_private(tool):
    out = run(tool, "import os\nopen('made.txt', 'w').write('hi')\nopen('/tmp/scratch', 'w').write('x')\nos.getcwd()")
    assert not out.error, out.text
    assert (tool.work_dir / "made.txt").read_text() == "hi"  # the code starts in the working folder (/mnt/data)
    assert not any(tool.work_dir.rglob("scratch"))


def test_time_limit_interrupts_and_kernel_stays_usable(tool):
    run(tool, "kept = 'still here'")
    began = time.monotonic()
    out = run(tool, "while True:\n    pass")
    assert 9 < time.monotonic() - began < 14
    assert out.error and "KeyboardInterrupt" in out.text and "time limit of 10 s" in out.text
    assert run(tool, "kept").text == "'still here'\n"


def test_cancel_interrupts(tool):
    cancel = CancelToken()
    threading.Timer(1.0, cancel.cancel).start()
    began = time.monotonic()
    out = run(tool, "import time\ntime.sleep(60)", cancel)
    assert time.monotonic() - began < 5
    assert out.error and "cancelled" in out.text


def test_kernel_ignoring_interrupt_is_restarted(tmp_path):
    tool = PythonTool(ToolSettings(python_timeout_s=2), tmp_path)
    try:
        run(tool, "lost = 1")
        out = run(tool, "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass")
        assert out.error and "restarted" in out.text
        after = run(tool, "lost")
        assert after.error and "NameError" in after.text  # a fresh kernel
    finally:
        tool.close()


# -- escape attempts ------------------------------------------------------------------------------------------------


def test_cannot_read_outside_the_working_folder(tool, outside):
    paths = [
        outside / "secret.txt",
        Path.home() / ".ssh" / "id_rsa",
        Path(__file__),
        Path("/etc/shadow"),
        Path("/etc/passwd"),
        Path("/proc/1/environ"),
    ]
    code = (
        f"paths = {[str(p) for p in paths]!r}\nhome = {str(Path.home())!r}\n"
        "for p in paths:\n"
        "    try:\n"
        "        print(p, 'READ', open(p).read()[:40])\n"
        "    except Exception as e:\n"
        "        print(p, type(e).__name__)\n"
        "import os\ntry:\n    print(sorted(os.listdir(home)))\n"
        "except OSError as e:\n    print('home', type(e).__name__)\n"
        "print('env', os.environ.get('MLX_OSS_TEST_SECRET'))"
    )
    out = run(tool, code)
    print(out.text)
    assert SECRET not in out.text
    for p in paths[:-1]:
        assert f"{p} FileNotFoundError" in out.text  # not mounted in the sandbox at all
    # The user's home is not there (CI's is under /tmp, the sandbox's own), or holds only the Python installation
    # mounted read-only (a pyenv under /root): nothing of the user's.
    home = Path.home()
    python_dirs = sorted({r.relative_to(home).parts[0] for r in python_roots() if r.is_relative_to(home)})
    assert "home FileNotFoundError" in out.text or f"\n{python_dirs!r}\n" in out.text
    assert "env None" in out.text  # the environment was cleared
    assert "/proc/1/environ READ" not in out.text or "MLX_OSS" not in out.text  # pid 1 is the sandbox's own


def test_cannot_write_outside_the_working_folder(tool, outside):
    targets = [outside / "planted.txt", Path(sys.prefix) / "planted.txt", Path("/usr/planted.txt")]
    code = (
        f"targets = {[str(p) for p in targets]!r}\n"
        "for p in targets:\n"
        "    try:\n"
        "        open(p, 'w').write('x'); print(p, 'WROTE')\n"
        "    except Exception as e:\n"
        "        print(p, type(e).__name__, e.errno)"
    )
    out = run(tool, code)
    print(out.text)
    assert "WROTE" not in out.text
    assert f"{targets[0]} FileNotFoundError" in out.text
    assert f"{targets[2]} OSError 30" in out.text  # EROFS: the system is read-only
    assert not any(p.exists() for p in targets)


def test_no_network_host_loopback_or_outside(tool):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    code = (
        "import socket\n"
        f"for host, port in [('127.0.0.1', {port}), ('1.1.1.1', 443), ('8.8.8.8', 53)]:\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=3); print(host, 'CONNECTED')\n"
        "    except Exception as e:\n"
        "        print(host, type(e).__name__, getattr(e, 'errno', None))\n"
        "try:\n"
        "    print(socket.getaddrinfo('example.com', 80))\n"
        "except Exception as e:\n"
        "    print('dns', type(e).__name__)\n"
    )
    try:
        out = run(tool, code)
        with pytest.raises(TimeoutError):
            server.accept()  # nothing reached the host's loopback
    finally:
        server.close()
    print(out.text)
    assert "CONNECTED" not in out.text
    assert "127.0.0.1 ConnectionRefusedError" in out.text  # the sandbox's own, empty loopback
    assert "1.1.1.1 OSError 101" in out.text and "8.8.8.8 OSError 101" in out.text  # ENETUNREACH: no route out
    assert "dns gaierror" in out.text


def test_process_count_is_bounded(tool):
    code = (
        "import os, time\npids = []\n"
        "for i in range(1000):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as e:\n"
        "        print('fork refused after', len(pids), e.errno); break\n"
        "    if pid == 0:\n"
        "        time.sleep(30); os._exit(0)\n"
        "    pids.append(pid)\n"
        "for pid in pids:\n"
        "    os.kill(pid, 9); os.waitpid(pid, 0)\n"
    )
    out = run(tool, code)
    print(out.text)
    assert "fork refused after" in out.text
    assert int(out.text.split("fork refused after")[1].split()[0]) < 128
    assert run(tool, "1 + 1").text == "2\n"


def test_fork_bomb_ends_and_host_is_fine(tmp_path):
    tool = PythonTool(ToolSettings(python_timeout_s=5), tmp_path)
    try:
        began = time.monotonic()
        out = run(tool, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
        took = time.monotonic() - began
        print(f"fork bomb call ended after {took:.1f} s: {out.text[-200:]}")
        assert out.error and took < 30
        assert subprocess.run(["true"]).returncode == 0  # the host still starts processes
        assert run(tool, "6 * 7").text == "42\n"  # and the tool goes on (restarted if it had to be)
    finally:
        tool.close()


def test_memory_hog_fails_and_kernel_survives(tool):
    code = "hog = []\nwhile True:\n    hog.append(bytearray(64 << 20))"
    out = run(tool, code)
    assert out.error and "MemoryError" in out.text
    out = run(tool, "n = len(hog) * 64\ndel hog\nn")
    print(f"the hog got {out.text.strip()} MB of a 1024 MB limit")
    assert int(out.text) < 1024
    assert run(tool, "huge = bytearray(8 << 30)").text.count("MemoryError")


def test_unavailable_without_bwrap(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # bwrap hidden
    tool = PythonTool(ToolSettings(), tmp_path / "work")
    why = tool.unavailable()
    assert why and "bubblewrap" in why
    out = run(tool, "print(1)")
    assert out.error and "unavailable" in out.text and "bubblewrap" in out.text
    tool.close()


def test_planted_symlinks_do_not_redirect_saved_images(tool, outside):
    """The code may plant links under the names images are saved as; saving must not write through them."""
    picture = png(4, 3)
    code = (
        f"import os\nfor n in range(1, 40):\n"
        f"    if not os.path.lexists(f'output_{{n}}.png'):\n"
        f"        os.symlink({str(outside)!r} + f'/planted-{{n}}', f'output_{{n}}.png')\n"
        f"from IPython.display import Image, display\ndisplay(Image(data={picture!r}))"
    )
    out = run(tool, code)
    assert not out.error, out.text
    assert not list(outside.glob("planted-*"))
    (saved,) = out.files
    assert not saved.is_symlink() and saved.read_bytes() == picture


def test_a_dead_kernel_is_replaced_and_the_model_told(tmp_path):
    tool = PythonTool(ToolSettings(), tmp_path)
    try:
        run(tool, "gone = 1")
        tool._process.kill()  # as the OOM killer or a crash would
        out = run(tool, "'gone' in globals()")
        assert "fresh one" in out.text and "False" in out.text
    finally:
        tool.close()


def test_python_itself_stays_read_only_under_a_working_folder_above_it(tmp_path):
    """A working folder chosen above the venv (a project folder) gets no write access to the interpreter."""
    from mlx_oss.tools.sandbox import Sandbox

    argv = Sandbox()._linux_argv(["python"], Path(sys.prefix).parent, None)
    work = argv.index(str(Path(sys.prefix).parent.resolve()))
    assert argv[work + 2 : work + 5] == ["--ro-bind", str(Path(sys.prefix).resolve()), str(Path(sys.prefix).resolve())]


def test_the_working_folder_is_also_where_gpt_oss_was_trained_to_keep_files(tool):
    """Harmony's description of the python tool, which gpt-oss was trained on, says files persist in /mnt/data."""
    out = run(tool, "import os\nopen('/mnt/data/kept.txt', 'w').write('kept')\nos.getcwd()")
    assert "'/mnt/data'" in out.text and (tool.work_dir / "kept.txt").read_text() == "kept"
