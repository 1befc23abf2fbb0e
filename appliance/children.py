"""What the daemon's child processes (the receiver, the exporter) share: each dies with the
daemon (kill -9 of the daemon leaves nothing behind) and leaves the decision to stop to it; the
daemon holds each through a `ChildProcess` (spawn, one pipe, one reading thread, stop)."""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import threading

from appliance.logging import get_logger

log = get_logger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the pipe's EOF still ends the child's loop


def child_setup(log_level: str) -> None:
    """First thing in a child: die with the parent, ignore the signals the daemon handles, log as
    the daemon does."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from appliance.logging import configure

    configure(log_level)


class ChildProcess:
    """The daemon's handle on a spawned child that talks over one pipe: ``target(*args, conn)``
    runs in the child; one thread here reads its messages (tuples, the kind first) into
    `_handle` until it says ``("stopped", ...)`` or the pipe closes; `_stop` sends a last message,
    waits, and kills what does not go."""

    def __init__(self, name: str, target, args: tuple) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded process
        self._name = name
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=target, args=(*args, child), name=f"appliance-{name}", daemon=True)
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._stopping = False

    def _handle(self, msg: tuple) -> None:
        raise NotImplementedError

    def _start_reading(self) -> None:
        self._reader = threading.Thread(target=self._read, name=f"{self._name}-events", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                if not self._stopping:
                    log.error(f"{self._name}.lost", exitcode=self._proc.exitcode)
                return
            if msg[0] == "stopped":
                return
            try:
                self._handle(msg)
            except Exception:
                log.exception(f"{self._name}.callback_failed", kind=msg[0], detail=repr(msg[1])[:120])

    def _send(self, msg) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError):
            pass  # stopping or gone: `alive` says so to the watchdog

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc.is_alive() and self._reader is not None and self._reader.is_alive()

    def _stop(self, last_message, timeout_s: float, reader_timeout_s: float) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._proc.pid is not None:  # started
            self._send(last_message)
            self._proc.join(timeout_s)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
            if self._reader is not None:
                self._reader.join(reader_timeout_s)
        self._conn.close()
