"""Stopping cleanly on a scheduler's signal: remember it until the step ends, and agree across processes."""

from __future__ import annotations

import logging
import signal
import threading

import torch

log = logging.getLogger(__name__)


class StopSignal:
    """Remember a SIGTERM/SIGINT (what a scheduler sends before it kills) until the step ends."""

    def __init__(self):
        self.signum = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self, accelerator) -> bool:
        """Whether any process got a signal: all must stop at the same step, or the checkpoint's
        collectives would wait forever for the ones still training."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def exit(self, step: int) -> None:
        """Leave with the conventional status (128 + signal number), after the step's checkpoint."""
        signum = self.signum or signal.SIGTERM  # another process got it first
        log.warning("stopped by signal %s after step %d; re-run the same command to resume", signum, step)
        raise SystemExit(128 + signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
