"""The tests' run helper (tests/runs.py): a run forked from the server ends as the same command would in a
fresh interpreter, with the same status, output and exit handlers."""

import os
import runpy
import subprocess
import sys
import textwrap

import pytest

from tests import runs
from tests.runs import cuda_visible, run_module

pytestmark = pytest.mark.skipif(
    os.environ.get("SIMPO_TEST_FRESH") == "1" or cuda_visible(), reason="every run starts fresh here"
)

PROGRAM = textwrap.dedent(
    """
    import atexit, os, sys
    atexit.register(lambda: print("exit handler ran", flush=True))
    print("args", sys.argv[1:], "cwd", os.path.basename(os.getcwd()))
    print("to stderr", file=sys.stderr)
    print("preloaded" if "transformers" in sys.modules else "fresh")
    what = sys.argv[1]
    if what == "raise":
        raise ValueError("bad value")
    if what == "exit":
        sys.exit(int(sys.argv[2]))
    if what == "message":
        sys.exit("a message")
    if what == "sleep":
        import time
        time.sleep(60)
    """
)


@pytest.fixture
def program(tmp_path):
    (tmp_path / "prog.py").write_text(PROGRAM)  # `-m prog` finds it in the working directory
    return tmp_path


def fresh(program, *args):
    cmd = [sys.executable, "-m", "prog", *args]
    return subprocess.run(cmd, cwd=program, capture_output=True, text=True, timeout=60)


def without_runpy_frames(stderr: str) -> str:
    """A traceback without the frames of runpy: ``File "<frozen runpy>"`` lines from Python 3.11 on; in 3.10 runpy
    is a file, and each of its frames is a ``File ".../runpy.py"`` line and the source lines under it."""
    out, skipping = [], False
    for line in stderr.splitlines(keepends=True):
        if line.startswith('  File "'):
            skipping = line.startswith((f'  File "{runpy.__file__}"', '  File "<frozen runpy>"'))
        elif not line.startswith("    "):
            skipping = False
        if not skipping:
            out.append(line)
    return "".join(out)


@pytest.mark.parametrize("args", [("ok",), ("exit", "3"), ("exit", "0"), ("message",), ("raise",)])
def test_a_forked_run_ends_as_a_fresh_interpreter_would(program, args):
    forked, alone = run_module("prog", *args, cwd=program), fresh(program, *args)
    assert forked.stdout == alone.stdout.replace("fresh", "preloaded")  # the server had imported the stages
    assert forked.returncode == alone.returncode
    # a traceback the same but for the frames of `python -m` itself (runpy's)
    assert forked.stderr == without_runpy_frames(alone.stderr)
    assert "exit handler ran" in forked.stdout and "to stderr" in forked.stderr
    assert f"args {list(args)} cwd {program.name}" in forked.stdout


def test_a_status_and_an_exception_reach_the_caller(program):
    assert run_module("prog", "exit", "2", cwd=program).returncode == 2
    raised = run_module("prog", "raise", cwd=program)
    assert raised.returncode == 1 and "ValueError: bad value" in raised.stderr and "Traceback" in raised.stderr
    assert run_module("prog", "message", cwd=program).stderr.endswith("a message\n")


def test_a_run_with_its_own_environment_starts_fresh(program):
    res = run_module("prog", "ok", cwd=program, env={"SOME_SETTING": "1"})
    assert res.returncode == 0 and "fresh" in res.stdout


def test_a_run_on_a_cuda_machine_starts_fresh(program, monkeypatch):
    monkeypatch.setattr(runs, "cuda_visible", lambda: True)  # CUDA does not survive a fork once initialised
    assert "fresh" in run_module("prog", "ok", cwd=program).stdout


def test_an_overrunning_run_is_killed_at_its_timeout(program):
    with pytest.raises(subprocess.TimeoutExpired):
        run_module("prog", "sleep", cwd=program, timeout=3)
    assert run_module("prog", "ok", cwd=program).returncode == 0  # the server serves the next run
