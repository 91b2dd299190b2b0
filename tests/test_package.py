"""The package as users meet it: a light import, the benchmark command, the wheel `pip install mlx-oss` gets (built
from a clean copy and installed into a fresh venv), and the self-check that app bundles run."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import need_backend

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
        "5,9",
        "--gen-tokens",
        "2",
        "--context",
        "300,40",
        "--backend",
        backend,
        "--json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["backend"] == backend and result["gen_tokens"] == 2
    assert [p["prompt_tokens"] for p in result["prefill"]] == [5, 9]
    assert [d["context_tokens"] for d in result["decode"]] == [5, 300, 40]
    for figure in [*result["prefill"], *result["decode"]]:
        assert figure["tok_s"] > 0, figure
    for key in ["load_s", "peak_rss_bytes", "private_bytes", "threads"]:
        assert result[key] > 0, key
    assert result["cpu"] and result["peer"] == []
    if backend == "numpy":
        from mlx_oss.cpu import kernels

        assert ("numba kernels" if kernels.available() else "plain NumPy") in result["backend_reason"]
    table = subprocess.run(cmd[:-1], capture_output=True, text=True, check=True).stdout
    assert "prefill 9" in table and "decode at 300" in table and "decode at 40" in table and "peak RSS" in table


FAKE_LLAMA_BENCH = """#!/usr/bin/env python3
import json, os, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
if "-o" in args:
    assert args["-t"] and args["-m"].endswith("model.gguf"), args
    prompts = [int(p) for p in args["-p"].split(",")]
    depths = [int(d) for d in args.get("-d", "0").split(",")]
    if 99 in depths:
        sys.exit("error: cannot reach depth 99")
    runs = __file__ + ".runs"  # prefill runs so far: each is 10 tokens/s faster than the last
    run = open(runs).read().count("x") if args["-n"] == "0" and os.path.exists(runs) else 0
    if args["-n"] == "0":
        open(runs, "a").write("x")
    tests = [dict(n_prompt=p, n_gen=0, n_depth=0, avg_ts=100.0 + 10 * run, stddev_ts=1.0) for p in prompts if p]
    tests += [dict(n_prompt=0, n_gen=int(args["-n"]), n_depth=d, avg_ts=2.0 + d, stddev_ts=0.5) for d in depths
              if int(args["-n"])]
    print(json.dumps(tests))
"""


def model_beside_fake_peer(checkpoint, folder):
    """The model linked into `folder` with a GGUF beside it, and the stand-in llama-bench there."""
    model = folder / "model"
    model.symlink_to(checkpoint, target_is_directory=True)
    (folder / "model.gguf").write_bytes(b"GGUF")
    peer = folder / "llama-bench"
    peer.write_text(FAKE_LLAMA_BENCH)
    peer.chmod(0o755)
    return model, peer


def test_bench_prints_the_peers_figures_beside_its_own(tiny_checkpoint, tmp_path):
    """`--peer` runs the llama-bench it is given (here a stand-in that answers in llama-bench's JSON) with the same
    prompt lengths and contexts, and puts each figure beside ours with the ratio."""
    model, peer = model_beside_fake_peer(tiny_checkpoint, tmp_path)
    cmd = [sys.executable, "-m", "mlx_oss.bench", "--model", str(model), "--prompt-tokens", "5", "--gen-tokens", "1"]
    out = subprocess.run(
        [*cmd, "--context", "30,5000", "--peer", str(peer)], capture_output=True, text=True, check=True
    )
    prefill, short, long, longest = [line for line in out.stdout.splitlines() if line.startswith(("prefill", "decode"))]
    assert "llama.cpp 100.00 ± 1.00 tokens/s" in prefill
    assert "llama.cpp 2.00 ± 0.50 tokens/s" in short and "llama.cpp 32.00 ± 0.50 tokens/s" in long
    assert "decode at 5000" in longest and "llama.cpp" not in longest  # past PEER_DEPTH_LIMIT unless asked
    asked = subprocess.run(
        [*cmd, "--context", "5000", "--peer-context", "5000", "--peer", str(peer)], capture_output=True, text=True
    )
    assert "llama.cpp 5002.00 ± 0.50 tokens/s" in asked.stdout, asked.stderr
    # A peer that fails leaves our figures printed, then says why in one line.
    failed = subprocess.run([*cmd, "--peer-context", "99", "--peer", str(peer)], capture_output=True, text=True)
    assert failed.returncode == 1 and "prefill 5" in failed.stdout and "peak RSS" in failed.stdout
    assert failed.stderr.count("\n") == 1 and "cannot reach depth 99" in failed.stderr
    missing = subprocess.run([*cmd, "--peer", str(tmp_path / "none")], capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "no llama-bench there" in missing.stderr


def test_bench_rounds_take_turns_with_the_peer_and_print_medians_and_ranges(tiny_checkpoint, tmp_path):
    """`--rounds 3` measures ours three times and runs the peer after each round (here one that gets faster each
    run): every figure is the median, with the range and each round's figure in the JSON."""
    model, peer = model_beside_fake_peer(tiny_checkpoint, tmp_path)
    cmd = [sys.executable, "-m", "mlx_oss.bench", "--model", str(model), "--prompt-tokens", "5,7", "--gen-tokens", "2"]
    cmd += ["--context", "30", "--rounds", "3", "--peer", str(peer)]
    result = json.loads(subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=True).stdout)
    assert result["rounds"] == 3
    for figure in [*result["prefill"], *result["decode"]]:
        assert len(figure["rounds"]) == 3 and all(t > 0 for t in figure["rounds"]), figure
        assert figure["tok_s"] == sorted(figure["rounds"])[1], figure
    prefill = [f for f in result["peer"] if f["prompt_tokens"] == 5]
    assert [(f["tok_s"], f["rounds"]) for f in prefill] == [(110.0, [100.0, 110.0, 120.0])]  # a run after each round
    (tmp_path / "llama-bench.runs").unlink()  # the table's peer starts from 100 tokens/s again
    table = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(line for line in table.splitlines() if line.startswith("prefill 5 "))
    assert "llama.cpp 110.00 ± 1.00 tokens/s (100.00-120.00)" in line, line
    assert "medians of 3 rounds" in table and "% of short (" in table
    bad = subprocess.run([*cmd, "--rounds", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--rounds must be at least 1" in bad.stderr


def test_bench_error_is_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mlx_oss.bench", "--model", str(tmp_path / "none")], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert out.stderr == f"python -m mlx_oss.bench: error: {tmp_path / 'none'}: no such model directory\n"


@pytest.mark.parametrize(
    ("absent", "says", "never"),
    [
        (
            "mlx_oss.mlx_backend",
            "this mlx-oss installation is incomplete: its module mlx_oss.mlx_backend does not load (",
            "not installed",
        ),
        ("mlx", "the MLX backend needs MLX, which is not installed (", "incomplete"),
    ],
)
def test_a_missing_backend_module_is_not_reported_as_missing_mlx(tiny_checkpoint, monkeypatch, absent, says, never):
    """A wheel without our MLX backend once said "MLX is not installed" (on a Mac where it was): installing MLX
    would not have helped, reinstalling mlx-oss would."""
    import mlx_oss

    for name in [n for n in sys.modules if n == "mlx_oss.mlx_backend" or n.startswith("mlx_oss.mlx_backend.")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh, so its own `import mlx` runs again
    monkeypatch.setitem(sys.modules, absent, None)  # importing it raises ModuleNotFoundError naming it
    with pytest.raises(mlx_oss.MlxOssError) as raised:
        mlx_oss.load(tiny_checkpoint, backend="mlx")
    message = str(raised.value)
    assert message.startswith(says) and never not in message, message
    assert message.endswith(", or choose --backend numpy") and "\n" not in message


SELF_CHECK_AS_ON_APPLE_SILICON = """
import sys
import mlx_oss.backend
mlx_oss.backend.is_apple_silicon = lambda: True  # as on the Macs the macOS bundle is for
if sys.argv[1:] == ["without-backend"]:
    sys.modules["mlx_oss.mlx_backend"] = None  # as in the wheel that left it out
from mlx_oss.app.self_check import self_check
sys.exit(self_check())
"""


def test_the_self_check_runs_mlx_where_the_app_would():
    """The macOS bundle's `--self-check` must prove MLX runs, not the NumPy backend the Linux bundle is for."""
    need_backend("mlx")
    pytest.importorskip("PySide6", reason="the app needs Qt")
    import mlx.core as mx

    def self_check(*args):
        out = subprocess.run(
            [sys.executable, "-c", SELF_CHECK_AS_ON_APPLE_SILICON, *args], capture_output=True, text=True, timeout=300
        )
        assert out.stdout.count("\n") == 1, out.stdout + out.stderr
        return out.returncode, out.stdout

    code, line = self_check()
    if mx.default_device() == mx.gpu:
        assert code == 0 and f"5 tokens generated on mlx ({mx.default_device()})," in line, line
    else:  # mlx[cpu] on Linux: MLX runs, but the check wants the GPU a Mac has
        assert code == 1 and "5 tokens generated on mlx (Device(cpu, 0)) (FAILED: not on the GPU)," in line, line
    code, line = self_check("without-backend")
    assert code == 1 and line.startswith("mlx-oss self-check: FAILED: this mlx-oss installation is incomplete: ")


# The wheel as `pip install mlx-oss` and the app bundle get it. An editable install finds any folder under the
# checkout, so it hides a package the wheel leaves out; these tests build the wheel from a clean copy of the
# working tree's files and install it, not editable, into a fresh venv.

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = PYPROJECT["package-dir"]


def source_packages() -> dict[str, Path]:
    """Every package the source tree holds, by import name: each folder with an `__init__.py` under a mapped folder."""
    found = {}
    for name, folder in PACKAGE_DIR.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            parts = init.parent.relative_to(ROOT / folder).parts
            found[".".join((name, *parts))] = init.parent
    return found


def test_every_source_folder_is_a_package_under_the_one_namespace():
    """Setuptools' discovery skips a folder without `__init__.py`, and a top-level package folder outside the
    package-dir mapping would not be installed: both would vanish from the wheel without a word."""
    mapped = {ROOT / folder for folder in PACKAGE_DIR.values()}
    top_level = {init.parent for init in ROOT.glob("*/__init__.py")}
    assert top_level == mapped
    packages = set(source_packages().values())
    for root in mapped:
        for source in root.rglob("*.py"):
            assert source.parent in packages, f"{source.parent} holds modules but no __init__.py"


def git_files() -> list[Path]:
    """The working tree's files as a commit would take them: tracked and not ignored, as they are now."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no clean export to build from")
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    return [Path(name) for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


@dataclass
class Installed:
    wheel: Path
    python: Path
    site_packages: Path
    work: Path

    def run(self, code: str, *args: str) -> str:
        """Run `code` in the fresh venv, from outside the checkout (so no `mlx_oss/` folder of it is on the path)."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        out = subprocess.run(
            [str(self.python), "-c", code, *args], cwd=self.work, env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        return out.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    source, wheels, venv = work / "source", work / "wheels", work / "venv"
    for name in git_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    offline = ["--no-deps", "--no-index", "--quiet"]
    subprocess.run([*pip, "wheel", *offline, "--no-build-isolation", "-w", wheels, source], check=True, cwd=work)
    (wheel,) = wheels.glob("mlx_oss-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", python, "install", *offline, wheel], check=True, cwd=work)
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The dependencies come from this venv, appended after the fresh one's own packages. A plain path line runs
    # none of that folder's .pth files, so this venv's editable finder (which maps mlx_oss to the checkout) stays off.
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "mlx_oss_test_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    return Installed(wheel, python, Path(site), work)


def test_the_wheel_holds_every_module_and_the_package_data_and_nothing_else(installed):
    expected = set()
    for name, folder in source_packages().items():
        target = name.replace(".", "/")
        patterns = ["*.py", *PYPROJECT.get("package-data", {}).get(name, [])]
        expected |= {f"{target}/{f.name}" for pattern in patterns for f in folder.glob(pattern)}
    assert "mlx_oss/app/icon.png" in expected and "mlx_oss/mlx_backend/model.py" in expected
    with zipfile.ZipFile(installed.wheel) as wheel:
        shipped = {n for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    # (missing, extra): an extra would be, say, tests/ or scripts/ installed as a top-level package
    assert (sorted(expected - shipped), sorted(shipped - expected)) == ([], [])


IMPORT_ALL = """
import importlib, json, sys
files, missing = {}, {}
for name in sys.argv[1:]:
    try:
        files[name] = importlib.import_module(name).__file__
    except ModuleNotFoundError as e:
        missing[name] = e.name
print(json.dumps({"files": files, "missing": missing}))
"""


def test_every_package_imports_from_the_installed_wheel(installed):
    names = sorted(source_packages())
    result = json.loads(installed.run(IMPORT_ALL, *names))
    missing = result["missing"]
    if importlib.util.find_spec("mlx") is None:  # MLX does not install here (an Intel Mac): only it may be absent
        missing = {name: module for name, module in missing.items() if module != "mlx"}
    assert missing == {}
    for name, file in result["files"].items():
        assert Path(file).is_relative_to(installed.site_packages), f"{name} imported from {file}, not the wheel"


LOAD_BOTH = """
import json, sys
import numpy as np
import mlx_oss
out = {}
for backend in ("numpy", "mlx"):
    model = mlx_oss.load(sys.argv[1], backend=backend)
    logits = model.logits([200006, 1428, 200008])
    out[backend] = {
        "backend": model.backend,
        "shape": list(logits.shape),
        "finite": bool(np.isfinite(logits).all()),
        "file": sys.modules[type(model).__module__].__file__,
    }
print(json.dumps(out))
"""


def test_the_installed_wheel_runs_both_backends(installed, tiny_checkpoint):
    need_backend("mlx")
    result = json.loads(installed.run(LOAD_BOTH, str(tiny_checkpoint)))
    vocab = json.loads((tiny_checkpoint / "config.json").read_text())["vocab_size"]
    for backend, ran in result.items():
        assert ran["backend"] == backend and ran["shape"] == [3, vocab] and ran["finite"], ran
        assert Path(ran["file"]).is_relative_to(installed.site_packages), ran["file"]
