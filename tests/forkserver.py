"""``python tests/forkserver.py``: import the project's stages once, then fork one child per run asked for.

A run started by the tests (``python -m simpo_exp ...``) spends about five seconds of CPU importing torch,
transformers, datasets and the rest before it does anything, and the suite starts many of them. This
server pays that once per test worker. Each request is one JSON line on stdin:

    {"module": "simpo_exp", "args": [...], "cwd": "...", "stdout": FILE, "stderr": FILE, "env": {NAME: VALUE}}

(and ``"new_session": true`` for a child that leads a session and process group of its own)

The server forks; the child changes to ``cwd``, sets the variables in ``env`` (those that change with
every test, such as ``PYTEST_CURRENT_TEST``; null removes one), points stdin at /dev/null and stdout and
stderr at the two files, and runs ``module`` as ``__main__`` the way ``python -m`` does. It exits with
the status Python would have given (a ``SystemExit`` code, or 1 after printing an uncaught exception).
The server answers ``{"pid": N}`` at once (so the client can kill a child that overruns its timeout) and
``{"returncode": N}`` when the child is gone (negative for a signal, as ``subprocess`` reports it).

The child inherits the server's environment and imported modules, nothing else: tests/runs.py keeps one
server per environment and starts a fresh interpreter for any run with environment variables of its own,
since some are read when a module is imported (``HF_HUB_OFFLINE``, a ``sitecustomize`` on PYTHONPATH).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import shutil
import sys
import tempfile
import threading
import weakref

# What the stages import, the lazily imported parts of transformers included (not the modules run with -m
# themselves: runpy warns when one is already imported). A module that fails to import here fails in the
# child instead, with its own traceback.
PRELOAD = (
    "simpo_exp.train",
    "simpo_exp.evaluate.run",
    "simpo_exp.generate.run",
    "transformers.modeling_utils",
    "transformers.trainer_utils",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.llama.modeling_llama",  # the embedded default's architecture
    "peft",
    "accelerate",
    "deepspeed",  # where installed (the test extras): accelerate's unwrap_model imports it in every run
    "wandb",
    "wandb.sdk.launch.inputs.internal",  # what every wandb.init imports (about 1.5 s of CPU in each run)
)


def exit_code(exc: SystemExit) -> int:
    """The status ``python`` exits with for an uncaught ``SystemExit`` (printing a non-integer code)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def own_wandb_media_folder() -> None:
    """wandb makes a temporary folder for media files (tables) when imported, and ``wandb.init`` has it removed at
    exit: the server's one, which every child would write into, went with the first child to finish a W&B run. The
    child takes a folder of its own, removed when it exits, and leaves the server's to the server. (Through the
    ``TemporaryDirectory``'s own finalizer: a Python without it fails here, by name, not later in a W&B table.)"""
    private = sys.modules.get("wandb.sdk.data_types._private")
    if private is None:
        return
    media = private.MEDIA_TMP  # one object, imported by name by wandb's data types
    if not isinstance(getattr(media, "_finalizer", None), weakref.finalize):
        raise RuntimeError(
            "tests/forkserver.py: wandb's MEDIA_TMP has no finalizer to take over; update own_wandb_media_folder"
        )
    media._finalizer.detach()  # the server removes its folder when it exits
    media.name = tempfile.mkdtemp("wandb-media")
    media._finalizer = weakref.finalize(media, shutil.rmtree, media.name, ignore_errors=True)


def run_child(request: dict) -> None:
    """In the forked child: run the requested module as ``python -m`` would; never returns."""
    code = 1
    try:
        own_wandb_media_folder()
        if request.get("new_session"):  # a process group of its own, as Popen(start_new_session=True) gives
            os.setsid()
        os.chdir(request["cwd"])
        for name, value in request["env"].items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for fd, path, flags in (
            (0, os.devnull, os.O_RDONLY),
            (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        ):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.path[0] = os.getcwd()  # as `python -m` puts the working directory first
        sys.argv = [request["module"], *request["args"]]  # runpy sets argv[0] to the module's file
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exit_code(exc)
    except BaseException as exc:  # printed from the module's own frames on, as `python -m` prints it
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__, "<frozen runpy>"):
            tb = tb.tb_next
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)  # the hook prints the exception's own traceback
    finally:
        try:  # what the interpreter does on its way out: wait for threads, then the exit handlers
            threading._shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    for name in PRELOAD:
        try:  # stdout carries the answers: what an import prints goes to stderr (DeepSpeed logs there)
            with contextlib.redirect_stdout(sys.stderr):
                importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the child re-imports it and reports the error where it is seen
            pass
    answer = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        answer.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_child(request)
        answer.write(json.dumps({"pid": pid}) + "\n")
        answer.flush()
        _, status = os.waitpid(pid, 0)
        answer.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        answer.flush()


if __name__ == "__main__":
    serve()
