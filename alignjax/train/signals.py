"""Graceful stop on SIGINT / SIGTERM (Ctrl-C, or a preempted spot TPU VM / maintenance event).

The first signal only sets a flag: the loop finishes the step it is in, saves a checkpoint and
raises `Interrupted` (a SystemExit carrying 128 + signal number, as a shell reports a killed
process). A second signal aborts at once. The previous handlers come back when the block ends,
since tests and the demo call the loop in-process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(SystemExit):
    """Training stopped on a signal after saving; `code` is 130 (SIGINT) or 143 (SIGTERM)."""


class StopOnSignal:
    def __init__(self):
        self.signum = None
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame):
        if self.signum is not None:  # the user insists: no second save
            print(f"\nalignjax: second {signal.Signals(signum).name}: stopped without saving",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\nalignjax: caught {self.name}: finishing the current step, then saving "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        return False

    def stop(self, message: str):
        """Prints the one line that says what was saved, then exits with 128 + signal number."""
        # On a line of its own: the progress bar may have redrawn since the first message.
        print(f"\nalignjax: caught {self.name} {message}", file=sys.stderr, flush=True)
        raise Interrupted(128 + self.signum)
