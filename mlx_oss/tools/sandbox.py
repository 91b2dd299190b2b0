"""How the `python` tool's kernel process is confined: model-written code must not read the user's files, reach the
network, or take the machine down.

Linux: bubblewrap (`bwrap`). The kernel runs in new namespaces of every kind (`--unshare-all`: its network is a
private loopback, so neither the internet nor the host's 127.0.0.1 is reachable), as uid 65534 in a user namespace,
with only the Python installation and a few system folders mounted read-only, the working folder the only writable
place besides a private, size-capped /tmp, no home folder, and a clean environment. It dies with its parent and runs
in its own session (no typing into the user's terminal).

The kernel talks to us over ZeroMQ on Unix sockets in a private runtime folder bound into the sandbox: a TCP port on
the host's loopback would be out of reach from the sandbox's own network namespace, and IPC sockets are files.

Limits are resource limits set inside the sandbox before the kernel starts: address space (memory), processes,
file size, no core files. The kernel counts root's processes in no limit (RLIMIT_NPROC never binds uid 0, whatever
the user namespace), so when we run as root a `pids` cgroup holds the process count instead; where neither can bind,
the tool is off and says why.

macOS: `sandbox-exec` with the profile below (written from Apple's SBPL documentation, NOT tested: no Mac here).
Elsewhere the tool is off.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

MAX_PROCESSES = 128  # threads count too: a kernel holds about 10, BLAS a few more
MAX_FILE_BYTES = 1 << 30
TMP_BYTES = 256 << 20
SANDBOX_UID = 65534
_PROBED: dict[tuple, str | None] = {}  # a conversation's tool need not start a sandbox to learn what another did

# Sets the limits inside the sandbox, then becomes the kernel: argv[1:] = memory bytes, processes, file bytes, cmd...
_LAUNCHER = """\
import os, resource, sys
mem, nproc, fsize = (int(a) for a in sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
os.execv(sys.argv[4], sys.argv[4:])
"""

_SYSTEM_READ_ONLY = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
_ETC_READ_ONLY = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/fonts",
    "/etc/alternatives",
    "/etc/mime.types",
)  # never all of /etc: passwd, shadow, keys
_ENV = {
    "LANG": "C.UTF-8",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "MPLCONFIGDIR": "/tmp/matplotlib",
    "IPYTHONDIR": "/tmp/ipython",
    "PYTHONNOUSERSITE": "1",
    "MALLOC_ARENA_MAX": "2",
    "OPENBLAS_NUM_THREADS": "2",
    "OMP_NUM_THREADS": "2",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    "JUPYTER_PLATFORM_DIRS": "1",
}


def python_roots() -> list[Path]:
    """The folders the kernel's Python needs to read: the interpreter's installation and the venv's packages."""
    roots = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), Path(sys.executable).resolve().parent}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        with contextlib.suppress(KeyError):
            roots.add(Path(sysconfig.get_paths()[key]).resolve())
    return sorted(roots, key=lambda p: len(p.parts))


def find_bwrap() -> str | None:
    """bwrap on PATH (so a test, or a user, can hide it)."""
    return shutil.which("bwrap")


TRAINED_DATA_DIR = "/mnt/data"


@dataclass
class Limits:
    memory_mb: int = 2048
    processes: int = MAX_PROCESSES
    file_bytes: int = MAX_FILE_BYTES


class ConfinedProcess:
    """A process started inside the sandbox; `kill` ends it and everything it started (the pid namespace dies with
    its first process, which dies with bwrap)."""

    def __init__(self, popen: subprocess.Popen, cgroup: Path | None):
        self.popen = popen
        self.cgroup = cgroup

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.cgroup is not None:  # a fork bomb's children first, so none outlives its namespace's reaper
            with contextlib.suppress(OSError):
                (self.cgroup / "cgroup.kill").write_text("1")
        with contextlib.suppress(OSError):
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        if self.cgroup is not None:
            _remove_cgroup(self.cgroup)


class Sandbox:
    """Confines a command to a working folder (plus a private runtime folder for its sockets)."""

    def __init__(self, limits: Limits | None = None, bwrap: str | None = None):
        self.limits = limits or Limits()
        self.platform = sys.platform
        self._bwrap = bwrap
        self._why: str | None | bool = False  # False: not probed yet

    # -- can it run here? -------------------------------------------------------------------------------------------

    def unavailable(self) -> str | None:
        """None when the sandbox works here (probed once per bwrap by running Python inside it), else why not."""
        if self._why is False:
            key = (self.platform, self._bwrap or find_bwrap(), os.geteuid())
            if key not in _PROBED:
                _PROBED[key] = self._probe()
            self._why = _PROBED[key]
            if self._why is None and self.platform.startswith("linux"):
                self._bwrap = key[1]
        return self._why

    def _probe(self) -> str | None:
        if self.platform == "darwin":
            if not Path("/usr/bin/sandbox-exec").exists():
                return "macOS's sandbox-exec is missing, so Python code cannot be confined"
            return None
        if not self.platform.startswith("linux"):
            return f"no sandbox for model-written code on {self.platform} (Linux needs bubblewrap, macOS sandbox-exec)"
        bwrap = self._bwrap or find_bwrap()
        if bwrap is None:
            return (
                "bubblewrap (bwrap) is not installed, and model-written Python is never run unconfined: install "
                "it (e.g. `sudo apt-get install bubblewrap`, `sudo dnf install bubblewrap`) to use the python tool"
            )
        self._bwrap = bwrap
        if os.geteuid() == 0 and _pids_cgroup_parent() is None:
            return (
                "running as root, where no process limit binds (RLIMIT_NPROC spares root and no pids cgroup is "
                "writable): run as a normal user to use the python tool"
            )
        scratch = Path(os.environ.get("TMPDIR", "/tmp"))
        try:
            result = subprocess.run(
                self._linux_argv([sys.executable, "-c", "pass"], scratch, None),
                capture_output=True,
                text=True,
                timeout=30,
                env=_ENV,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"bubblewrap could not start a sandbox: {error}"
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["no message"])[-1]
            return f"bubblewrap could not start a sandbox here ({detail}); user namespaces may be disabled"
        return None

    # -- starting a confined process --------------------------------------------------------------------------------

    def start(self, argv: list[str], work_dir: Path, runtime_dir: Path, log) -> ConfinedProcess:
        """Starts `argv` confined; its stdout and stderr go to `log` (a file)."""
        why = self.unavailable()
        if why:
            raise OSError(why)
        if self.platform == "darwin":
            command = self._darwin_argv(argv, work_dir, runtime_dir)
            env = {**_ENV, "PATH": "/usr/bin:/bin"}
            popen = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=work_dir, env=env, start_new_session=True
            )
            return ConfinedProcess(popen, None)
        cgroup = _new_cgroup(self.limits) if os.geteuid() == 0 else None
        if os.geteuid() == 0 and cgroup is None:
            raise OSError("no pids cgroup could be made for the sandbox")

        def enter_cgroup():  # runs in the child before exec: bwrap and all it starts are counted
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        popen = subprocess.Popen(
            self._linux_argv(argv, work_dir, runtime_dir),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=_ENV,
            preexec_fn=enter_cgroup,
        )
        return ConfinedProcess(popen, cgroup)

    def _launch(self, argv: list[str]) -> list[str]:
        limits = self.limits
        return [
            argv[0],
            "-s",
            "-c",
            _LAUNCHER,
            str(limits.memory_mb << 20),
            str(limits.processes),
            str(limits.file_bytes),
            *argv,
        ]

    def _linux_argv(self, argv: list[str], work_dir: Path, runtime_dir: Path | None) -> list[str]:
        work_dir = Path(work_dir).resolve()
        command = [
            self._bwrap or "bwrap",
            "--unshare-all",
            "--unshare-user",
            "--uid",
            str(SANDBOX_UID),
            "--gid",
            str(SANDBOX_UID),
            "--hostname",
            "sandbox",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--clearenv",
        ]
        for name, value in _ENV.items():
            command += ["--setenv", name, value]
        roots = python_roots()
        command += ["--setenv", "PATH", ":".join([*(str(r / "bin") for r in roots), "/usr/bin", "/bin"])]
        # The private /tmp first: bwrap mounts in order, and a Python (a venv, a CI checkout) under /tmp must be
        # bound on top of it, not hidden by it.
        command += ["--proc", "/proc", "--dev", "/dev", "--size", str(TMP_BYTES), "--tmpfs", "/tmp"]
        for path in (*_SYSTEM_READ_ONLY, *_ETC_READ_ONLY):
            if os.path.islink(path):
                command += ["--symlink", os.readlink(path), path]
            elif os.path.exists(path):
                command += ["--ro-bind", path, path]
        for root in roots:
            command += ["--ro-bind", str(root), str(root)]
        if runtime_dir is not None:
            command += ["--bind", str(runtime_dir), str(runtime_dir)]
        command += ["--bind", str(work_dir), str(work_dir)]
        for root in roots:  # a working folder chosen above the venv must not make Python writable
            if root.is_relative_to(work_dir):
                command += ["--ro-bind", str(root), str(root)]
        # gpt-oss was trained to keep files in /mnt/data (harmony's python tool description says so): the working
        # folder is there too, and the code starts in it.
        command += ["--bind", str(work_dir), TRAINED_DATA_DIR, "--chdir", TRAINED_DATA_DIR, "--"]
        return command + self._launch(argv)

    def _darwin_argv(self, argv: list[str], work_dir: Path, runtime_dir: Path) -> list[str]:
        return [
            "/usr/bin/sandbox-exec",
            "-p",
            darwin_profile(Path(work_dir).resolve(), runtime_dir.resolve()),
            *self._launch(argv),
        ]


def darwin_profile(work_dir: Path, runtime_dir: Path) -> str:
    """A sandbox-exec profile: read the system and Python, write the working and runtime folders, no network but
    the kernel's Unix sockets. Untested (written without a Mac); RLIMIT_AS does not bind on macOS."""
    reads = " ".join(
        f'(subpath "{p}")'
        for p in [
            *python_roots(),
            Path("/usr"),
            Path("/System"),
            Path("/Library/Frameworks"),
            Path("/private/var/db/dyld"),
        ]
    )
    writable = (
        f'(subpath "{work_dir}") (subpath "{runtime_dir}") (subpath "/private/tmp") (subpath "/private/var/folders")'
    )
    return f"""(version 1)
(deny default)
(allow process-fork)
(allow process-exec)
(allow signal (target same-sandbox))
(allow sysctl-read)
(allow mach-lookup (global-name "com.apple.system.logger"))
(allow file-read-metadata)
(allow file-read* {reads} {writable} (literal "/dev/null") (literal "/dev/urandom") (literal "/dev/random"))
(allow file-write* {writable} (literal "/dev/null"))
(allow network-bind network-inbound network-outbound (local unix-socket (subpath "{runtime_dir}")))
(allow network-outbound (remote unix-socket (subpath "{runtime_dir}")))
(deny network* (remote ip))
"""


# -- pids cgroups (only when running as root, where RLIMIT_NPROC does not bind) --------------------------------------


def _own_cgroup(controller: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(",") or (controllers == "" and controller == ""):
                return path
    return None


def _pids_cgroup_parent() -> Path | None:
    """A cgroup folder under which we may make a child with `pids.max`: v1's pids hierarchy or v2's unified tree,
    below the cgroup we are in (never moving anything out of it)."""
    candidates = []
    v1 = _own_cgroup("pids")
    if v1 is not None:
        candidates.append(Path("/sys/fs/cgroup/pids") / v1.lstrip("/"))
    v2 = _own_cgroup("")
    if v2 is not None:
        candidates.append(
            Path("/sys/fs/cgroup/unified" if Path("/sys/fs/cgroup/unified").is_dir() else "/sys/fs/cgroup")
            / v2.lstrip("/")
        )
    for parent in candidates:
        probe = parent / f"mlx-oss-probe-{os.getpid()}"
        try:
            probe.mkdir()
        except OSError:
            continue
        try:
            if (probe / "pids.max").exists():
                return parent
        finally:
            with contextlib.suppress(OSError):
                probe.rmdir()
    return None


def _new_cgroup(limits: Limits) -> Path | None:
    parent = _pids_cgroup_parent()
    if parent is None:
        return None
    for n in range(1000):
        group = parent / f"mlx-oss-python-{os.getpid()}-{n}"
        try:
            group.mkdir()
        except FileExistsError:
            continue
        except OSError:
            return None
        try:
            (group / "pids.max").write_text(str(limits.processes))
        except OSError:
            _remove_cgroup(group)
            return None
        return group
    return None


def _remove_cgroup(group: Path) -> None:
    """Kills what is left in the group (v1 has no cgroup.kill) and removes it."""
    import signal
    import time

    for _ in range(50):
        try:
            pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        group.rmdir()
