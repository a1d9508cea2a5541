"""``python -m MODULE ARGS`` for the tests, offline, started from a process that has imported the stages.

``run_module`` returns what ``subprocess.run(..., capture_output=True, text=True)`` would. A run with the
standard test environment (this process's, W&B offline without a key, the HF hub offline) is forked from a
server of tests/forkserver.py that has already imported torch, transformers, datasets and the stages, which
saves about five CPU seconds a run. A run given environment variables of its own starts a fresh
interpreter, unless all of them are read when the run starts rather than when a module is imported
(``AT_RUN_TIME``: the forked child gets them as it gets ``PER_RUN``'s); so does every run on a machine with a
CUDA device (``cuda_visible``) and every run when ``SIMPO_TEST_FRESH=1`` (to rule the server out when a test fails).
``start_module`` forks a run the same way and returns at once, for a test that signals it (``Started``, with
``subprocess.Popen``'s ``pid``, ``poll``, ``send_signal``, ``wait`` and ``communicate``). Tests that time or launch
several processes use ``subprocess`` directly.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_servers: dict[tuple, Server] = {}
PER_TEST = ("PYTEST_CURRENT_TEST",)  # changes with every test; the child gets the current one
# Set in this process by libraries that tests use in it (sklearn's import, torch inductor's first compile,
# accelerate's or DeepSpeed's import): each would start another server (about 9 s of imports and 600 MB held to
# the end), so they travel with each run, as PER_TEST does, rather than make a new environment.
SET_BY_LIBRARIES = (
    "KMP_DUPLICATE_LIB_OK",
    "KMP_INIT_AT_FORK",
    "TORCHINDUCTOR_CACHE_DIR",
    "PYTORCH_NVML_BASED_CUDA_CHECK",
)
PER_RUN = (*PER_TEST, *SET_BY_LIBRARIES)
# Read when a run starts (wandb.init, the hub's token look-up, accelerate's process state, matplotlib's backend at
# its first import, which the server does not make), not when the server imports the stages: a run given only these
# is forked with them set, as PER_RUN's are. A variable read at import (HF_HUB_OFFLINE, PYTHONPATH) still starts a
# fresh interpreter.
AT_RUN_TIME = ("WANDB_API_KEY", "WANDB_BASE_URL", "HF_TOKEN", "RANK", "WORLD_SIZE", "MPLBACKEND")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a fake endpoint or a launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(extra: dict | None = None) -> dict:
    """This process's environment with W&B offline (no API key) and the HF hub offline, ``extra`` laid over it."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    env.pop("WANDB_API_KEY", None)
    # the W&B service a test started in this process (an in-process Tracker): a run starts its own, as a user's does
    env.pop("WANDB_SERVICE", None)
    return {**env, **(extra or {})}


def run_module(
    module: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python -m module args`` in ``cwd`` under ``run_env(env)``, its output captured as text."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    full = run_env(env)
    if set(env or ()) - set(AT_RUN_TIME) or not forked_here():
        return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)
    server = _server(run_env())
    with tempfile.TemporaryDirectory(prefix="forked-run-") as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        pid = _fork(server, cmd, cwd, tmp, {k: full.get(k) for k in (*PER_RUN, *(env or ()))})
        try:
            code = server.answer(timeout)["returncode"]
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            server.answer(60)
            raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text()) from None
        return subprocess.CompletedProcess(cmd, code, out.read_text(), err.read_text())


class Started:
    """A run forked by ``start_module``, not yet waited for: what the signal tests used of ``subprocess.Popen``
    (stdout and stderr are read from their files once the run has ended)."""

    def __init__(self, server: Server, pid: int, tmp: tempfile.TemporaryDirectory, cmd: list[str]):
        self.server, self.pid, self.tmp, self.args = server, pid, tmp, cmd
        self.returncode: int | None = None
        self.stderr = _Deferred(Path(tmp.name, "stderr"))

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = self.server.answer(0)["returncode"]
            except subprocess.TimeoutExpired:
                return None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.server.answer(600 if timeout is None else timeout)["returncode"]
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return Path(self.tmp.name, "stdout").read_text(), Path(self.tmp.name, "stderr").read_text()


class _Deferred:
    """``Popen.stderr`` as the tests read it (``.read()``), from the run's file."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> str:
        return self.path.read_text()


def start_module(module: str, *args: str, cwd: Path, new_session: bool = False) -> Started | subprocess.Popen:
    """``python -m module args`` in ``cwd`` under ``run_env()``, started and not waited for (a test signals it):
    forked from the server as ``run_module``'s runs are, or a fresh ``subprocess.Popen`` where those start fresh.
    ``new_session``: the run leads a process group of its own (``os.killpg(run.pid, ...)`` reaches it and its
    children alone). The server runs one at a time: wait for it before the next run."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    full = run_env()
    if not forked_here():
        return subprocess.Popen(
            cmd, cwd=cwd, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=new_session,
        )  # fmt: skip
    server = _server(full)
    tmp = tempfile.TemporaryDirectory(prefix="forked-run-")
    pid = _fork(server, cmd, cwd, tmp.name, {k: full.get(k) for k in PER_RUN}, new_session=new_session)
    server.started = Started(server, pid, tmp, cmd)
    return server.started


def forked_here() -> bool:
    """Whether runs are forked from a server here: not under ``SIMPO_TEST_FRESH=1``, nor where CUDA is visible."""
    return os.environ.get("SIMPO_TEST_FRESH") != "1" and not cuda_visible()


def _fork(server: Server, cmd: list[str], cwd: Path, folder: str, env: dict, new_session: bool = False) -> int:
    """Have ``server`` run ``cmd`` (``python -m module args``) in ``cwd``, its output to ``folder``'s ``stdout``
    and ``stderr`` files, ``env``'s variables set (None: removed); the child's pid."""
    out, err = Path(folder, "stdout"), Path(folder, "stderr")
    request = {"module": cmd[2], "args": cmd[3:], "cwd": str(cwd), "stdout": str(out), "stderr": str(err), "env": env}
    return server.ask({**request, "new_session": True} if new_session else request)


class Server:
    """One tests/forkserver.py process, started with ``env``."""

    def __init__(self, env: dict):
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "forkserver.py")],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        self.pending = b""
        self.started: Started | None = None  # the last run start_module forked

    def ask(self, request: dict) -> int:
        """Send a run; the pid of the child that runs it. A started run a failed test left running is ended first
        (the server runs one child at a time, and its exit status comes before the next pid)."""
        if self.started is not None and self.started.returncode is None:
            self.started.send_signal(signal.SIGKILL)
            self.started.wait(60)
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        return self.answer(120)["pid"]  # the first request waits for the server's imports

    def answer(self, timeout: float) -> dict:
        """The server's next line; ``TimeoutExpired`` after ``timeout`` seconds without one."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                raise subprocess.TimeoutExpired(self.process.args, timeout)
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the test fork server (tests/forkserver.py) exited: {self.process.wait()}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def stop(self) -> None:
        self.process.stdin.close()  # the server's loop ends with its input
        self.process.wait(timeout=60)


def cuda_visible() -> bool:
    """Whether this machine has a CUDA device. Runs there start fresh: CUDA cannot be used in a process forked
    from one that initialised it, and importing the stages may (``torch.cuda.is_available`` does)."""
    import torch

    return torch.cuda.is_available()


def _server(env: dict) -> Server:
    key = tuple(sorted((k, v) for k, v in env.items() if k not in PER_RUN))
    if key not in _servers or _servers[key].process.poll() is not None:
        _servers[key] = Server(env)
    return _servers[key]


@atexit.register
def _stop_servers() -> None:
    for server in _servers.values():
        server.stop()
