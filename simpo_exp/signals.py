"""Stopping cleanly on a scheduler's signal: remember it until the step ends, agree across processes,
save, then hand the signal on to the handler that was there before (submitit's requeues the job)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

log = logging.getLogger(__name__)


def requeue_signal() -> int:
    """submitit's warning before a SLURM time limit or a preemption, after which its own handler requeues the job:
    USR2, or the signal its ``SUBMITIT_PREEMPT_SIGNAL`` names (its sbatch asks SLURM for that one, and installs its
    handler on it: not caught here, that handler ran in the middle of a step, requeued the job without a checkpoint
    and left the other tasks in a collective)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
    sig = getattr(signal, f"SIG{name}", signal.SIGUSR2)
    return int(signal.SIGUSR2 if sig in (signal.SIGKILL, signal.SIGSTOP) else sig)  # those two cannot be caught


def stop_signals() -> tuple[int, ...]:
    """SIGTERM/SIGINT (what a scheduler, or a user, sends before it kills) and submitit's ``requeue_signal``."""
    return tuple(dict.fromkeys((signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, requeue_signal())))


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """A DataLoader worker's ``worker_init_fn``: the stop signals are left to the training process. A scheduler
    signals every process of the job (SLURM's step daemon signals the whole step, ``kill -- -PGID`` a process
    group), and a worker that died of the signal made torch raise "DataLoader worker ... is killed by signal" in
    the training process, wherever it was, so that a stop ended without its checkpoint. The training process ends
    its workers as it leaves."""
    for sig in stop_signals():
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (what a scheduler sends first) ends the generate and evaluate stages as Ctrl-C does: their
    ``KeyboardInterrupt`` path writes what is done (finished shards, the judge replies in flight) before leaving.
    Without it SIGTERM's default ends the process at once. A handler someone installed before is left alone."""
    mine = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if mine:
        signal.signal(signal.SIGTERM, _interrupt_for_sigterm)
    try:
        yield
    finally:
        if mine:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


class TerminatedInterrupt(KeyboardInterrupt):
    """SIGTERM taken as Ctrl-C (``sigterm_as_interrupt``): the same way out, and an exit status of 143 (128 +
    SIGTERM) rather than Ctrl-C's 130, which a scheduler's script reads as the user's interrupt."""

    signum = signal.SIGTERM


def _interrupt_for_sigterm(signum, frame):
    raise TerminatedInterrupt()


def interrupt_status(e: KeyboardInterrupt) -> int:
    """The exit status of a command ended by ``e``: 128 + the signal (SIGTERM's 143, Ctrl-C's 130)."""
    return 128 + int(getattr(e, "signum", signal.SIGINT))


class StopRequested(BaseException):
    """A stop signal during a run's set-up, where there is no step to finish and nothing to save yet. A
    ``BaseException``, as ``KeyboardInterrupt`` is: the ``except Exception`` of a reader or a logger it passes
    through must not take it for that code's own failure."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignal:
    """Remember a stop signal until the step ends; the handlers found at start are kept, to be restored
    and called after the checkpoint. While ``at_once`` (a run's set-up: loading, tokenising, the reference
    log-probs), a signal raises ``StopRequested`` where the run is instead: waiting for a first step could
    outlast a scheduler's grace period."""

    def __init__(self, at_once: bool = False):
        self.signum = None
        self.at_once = at_once
        self.requeue = requeue_signal()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in stop_signals():
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # submitit's requeue signal, once come, stays: SLURM's SIGTERM at the limit itself (or again at a
        # preemption's grace time) replaced it while the step or the save went on, and submitit's SIGTERM handler
        # only logs, so the job was never requeued
        if self.signum != self.requeue:
            self.signum = signum
        if self.at_once:
            raise StopRequested(signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self, accelerator) -> int:
        """The signal any process got (its number; 0 when none): all must stop at the same step, or the
        checkpoint's collectives would wait forever for the ones still training; and each learns which
        signal it was, so the main process hands on a USR2 that only another process received."""
        if accelerator.num_processes == 1:
            return self.signum or 0
        import torch  # here, not at the top: the entry point installs the handler before anything heavy loads

        # the requeue signal ranks above the others (a process that got it hands it on, whatever another got)
        first = 1000 if self.signum == self.requeue else 0
        flag = torch.tensor([float((self.signum or 0) + first)], device=accelerator.device)
        return int(accelerator.gather(flag).max().item()) % 1000

    def exit(self, step: int | None, signum: int | None = None, together=None) -> None:
        """After the step's checkpoint (``step`` None: stopped in set-up, before one): restore the handlers found
        at start, call the one that was there for this signal (submitit's checkpoints its submission and requeues
        the job from the main process; under ``+launcher=slurm`` that handler is where the requeue happens), then
        leave with the conventional status (128 + signal number)."""
        signum = signum or self.signum or signal.SIGTERM
        name = signal.Signals(signum).name
        from simpo_exp.rundir import rerun_command

        if step is None:
            log.warning("stopped by %s before a step; nothing to save: %s to go on", name, rerun_command())
        else:
            log.warning("stopped by %s after step %d, checkpoint saved; %s to resume", name, step, rerun_command())
        self.restore()
        previous = self._previous.get(signum)
        code, declined = 128 + signum, None
        # default_int_handler would turn a clean stop into a KeyboardInterrupt traceback
        if callable(previous) and previous is not signal.default_int_handler:
            try:
                previous(signum, None)
            except SystemExit as e:  # submitit's, on the main task, once it has requeued the job
                code = e.code if isinstance(e.code, int) else code
            except Exception as e:
                if not declined_requeue(e):
                    raise
                declined = e  # submitit will not requeue (its time-outs used up): handed on once all have met
        if together is not None:
            # ``together``: a barrier of the run's processes. submitit requeues from the main task alone and leaves
            # the others to return; one of them leaving first could have srun end the job (KillOnBadExit) before
            # the main task's requeue
            together()
        if declined is not None:  # submitit's way of ending the job (its result file); the run is stopped
            raise declined
        raise SystemExit(code)

    def after_finish(self, accelerator) -> None:
        """A stop signal that came during the run's final evaluation or while its model was written (on any
        process): the run is finished, so nothing is saved and no stop record written, but the process leaves with
        128 + the signal's number, so that a sweep running in this process ends at this job rather than starting the
        next. submitit's requeue signal (its warning before a time limit) is not handed on: the job it would requeue
        is done."""
        signum = self.agreed(accelerator)
        if not signum:
            return
        name = signal.Signals(signum).name
        log.warning("%s came as the run finished: the run is complete; nothing more is started", name)
        if signum != self.requeue:
            raise SystemExit(128 + signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(sig, handler)


def declined_requeue(e: BaseException) -> bool:
    """Whether ``e`` is submitit's refusal to requeue a job at its time limit (``UncompletedJobError``: its
    ``max_num_timeout`` requeues used up): the run saved its checkpoint and stop record first, so it is stopped
    and resumable, not crashed. Told by the class's name: submitit is imported only under its launcher."""
    return type(e).__name__ == "UncompletedJobError"
