"""The tests' run helper (tests/runs.py): a run forked from the server ends as the same command would in a
fresh interpreter, with the same status, output and exit handlers."""

import os
import runpy
import subprocess
import sys
import textwrap

import pytest

from tests import runs
from tests.runs import cuda_visible, run_module, start_module

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


def test_a_run_given_only_variables_read_at_run_time_is_forked_with_them(program):
    """RANK, a W&B key and the like are read when the run starts: the server forks the run with them set, and the
    next run, without them, does not inherit them."""
    (program / "show.py").write_text("import os, sys\nprint(os.environ.get('RANK'), 'transformers' in sys.modules)\n")
    assert run_module("show", cwd=program, env={"RANK": "1"}).stdout == "1 True\n"
    assert run_module("show", cwd=program).stdout == "None True\n"
    assert run_module("show", cwd=program, env={"RANK": "1", "SOME_SETTING": "1"}).stdout == "1 False\n"


def test_a_run_on_a_cuda_machine_starts_fresh(program, monkeypatch):
    monkeypatch.setattr(runs, "cuda_visible", lambda: True)  # CUDA does not survive a fork once initialised
    assert "fresh" in run_module("prog", "ok", cwd=program).stdout


def test_a_started_run_is_signalled_and_one_left_running_does_not_hold_up_the_next(program):
    """start_module: the forked run's pid takes a signal (its status as Popen reports it), ``new_session`` makes it
    lead its own process group, and a run a failed test left running is killed before the next one is forked."""
    import signal
    import time

    started = start_module("prog", "sleep", cwd=program, new_session=True)
    deadline = time.monotonic() + 30  # the child makes its session as it starts, after the pid came back
    while os.getpgid(started.pid) != started.pid:
        assert started.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    started.send_signal(signal.SIGTERM)
    assert started.wait(60) == -signal.SIGTERM
    left = start_module("prog", "sleep", cwd=program)
    assert os.getpgid(left.pid) != left.pid
    assert run_module("prog", "ok", cwd=program).returncode == 0 and left.returncode == -signal.SIGKILL
    done = start_module("prog", "exit", "3", cwd=program)
    assert done.wait(60) == 3 and "exit handler ran" in done.communicate()[0] and done.stderr.read() == "to stderr\n"


def test_an_overrunning_run_is_killed_at_its_timeout(program):
    with pytest.raises(subprocess.TimeoutExpired):
        run_module("prog", "sleep", cwd=program, timeout=3)
    assert run_module("prog", "ok", cwd=program).returncode == 0  # the server serves the next run
