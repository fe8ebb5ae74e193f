"""SIGTERM / SIGINT: finish the current step, save a checkpoint, exit non-zero with how to resume.

Cluster schedulers send SIGTERM before they kill a job. The handler only sets a flag; the training
loop reads it at each step boundary through `requested()`, which all ranks call together and which
is true on every rank when any rank got the signal (so they all save and stop at the same step).
"""

from __future__ import annotations

import signal

from align.models import distributed
SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Preempted(RuntimeError):
    """Raised after the checkpoint is saved; the entry point exits with `code` (128 + signal number)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.code = EXIT_CODES.get(signum, 1)

    @classmethod
    def after_save(cls, stage: str, flag: SignalFlag, step: int, checkpoint) -> Preempted:
        return cls(flag.signum, f"{stage}: stopped by {flag.name} at step {step}; checkpoint saved in {checkpoint}. "
                                "Re-run the same command to continue from it.")


class TrainingDiverged(RuntimeError):
    """train.max_bad_steps non-finite steps in a row: the run stops (exit 3); the last committed
    checkpoint stays for a resume with other settings."""


class SignalFlag:
    """Use as a context manager around training: installs the handlers, restores the old ones after."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self) -> SignalFlag:
        for sig in SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the handlers alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def requested(self) -> bool:
        """True on every rank when any rank was signalled (a collective when distributed)."""
        mine = int(distributed.all_reduce_scalar(self.signum or 0, "max"))
        if mine and self.signum is None:
            self.signum = mine
        return bool(mine)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
