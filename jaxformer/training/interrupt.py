"""Ctrl-C during training: finish the step under way, save it, say how to resume.

``stop_on_sigint()`` installs a handler for the training loop: a first Ctrl-C asks the loop to stop
after the step under way (``fit`` then saves it and raises ``TrainingInterrupted``); a second one
interrupts at once.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path


class TrainingInterrupted(KeyboardInterrupt):
    """``fit`` stopped by Ctrl-C (SIGINT). ``saved_step``: the step a rerun resumes from (``step``
    itself when it was saved on the way out), None if no checkpoint exists yet."""

    def __init__(self, workdir: Path, step: int, saved_step: int | None):
        self.workdir, self.step, self.saved_step = workdir, step, saved_step
        if saved_step == step:
            text = f"interrupted at step {step}, saved; run the same command to resume"
        elif saved_step is not None:
            text = (
                f"interrupted at step {step} in the middle of an update, which cannot be saved; "
                f"run the same command to resume from the checkpoint of step {saved_step}"
            )
        else:
            text = f"interrupted at step {step}, before any checkpoint: nothing was saved"
        super().__init__(f"{text} ({workdir})")


class _StopRequest:
    """The SIGINT handler of a training loop: a first Ctrl-C asks it to stop (and save) after the
    step under way; a second one interrupts at once."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\njaxformer: stopping after this step (Ctrl-C again: at once)", file=sys.stderr)


@contextlib.contextmanager
def stop_on_sigint():
    """A ``_StopRequest`` installed for SIGINT while the loop runs, when Python's own handler is in
    place (the main thread; not where SIGINT is ignored or handled by someone else)."""
    request = _StopRequest()
    own = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    previous = signal.signal(signal.SIGINT, request) if own else None
    try:
        yield request
    finally:
        if own:
            signal.signal(signal.SIGINT, previous)
