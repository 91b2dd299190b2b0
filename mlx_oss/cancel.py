"""`CancelToken`: how a front end stops long work (a generation, a download) from another thread."""

from __future__ import annotations

import threading


class CancelToken:
    """Set from any thread; the work checks it between steps and stops at the next one."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking at once when cancelled; returns whether it was."""
        return self._event.wait(seconds)
