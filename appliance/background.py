"""One shape for the daemon's background threads (completion, pipeline worker, exporter)."""

from __future__ import annotations

import threading

from appliance.logging import get_logger

log = get_logger(__name__)


class BackgroundLoop:
    """A named daemon thread calling `tick()` when woken by `notify()` or every ``interval_s``.

    `tick` returns True when more work may be waiting (the loop goes on at once) and False when
    it is idle. An exception in `tick` is logged and the loop goes on: one bad item must not stop
    the thread.
    """

    thread_name = "background"

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Let the current tick finish (up to ``timeout_s``), then end the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def notify(self) -> None:
        self._wake.set()

    def wait_s(self) -> float:
        """How long an idle loop sleeps before the next tick (unless notified)."""
        return self.interval_s

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                more = self.tick()
            except Exception:
                log.exception("background.tick_failed", thread=self.thread_name)
                more = False
            if not more:
                self._wake.wait(self.wait_s())
                self._wake.clear()
