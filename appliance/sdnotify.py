"""The systemd notify protocol (sd_notify(3)) and a health-gated watchdog, without libsystemd.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract
socket) and, with ``WatchdogSec=``, ``$WATCHDOG_USEC``. The daemon sends newline-separated
``KEY=VALUE`` assignments as one datagram: ``READY=1`` once it accepts associations,
``WATCHDOG=1`` while it is healthy, ``STOPPING=1`` when it starts draining, ``STATUS=...`` for
``systemctl status``. Outside systemd (tests, a field engineer running ``appliance run`` by hand)
every call is a cheap no-op.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

from appliance.logging import get_logger

log = get_logger(__name__)

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"


def _socket_address(raw: str) -> str | None:
    if raw.startswith("@"):
        return "\0" + raw[1:]  # abstract namespace: leading NUL, no file behind it
    if raw.startswith("/"):
        return raw
    return None  # e.g. systemd >= 253's "vsock:CID:PORT", which this appliance never runs under


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"STATUS=draining"``; several lines allowed) to systemd.

    Returns True when the datagram was sent, False when not under systemd (no ``$NOTIFY_SOCKET``)
    or when sending failed; never raises, since a lost notification must not stop the daemon.
    """
    raw = os.environ.get(ENV_SOCKET, "")
    if not raw:
        return False
    address = _socket_address(raw)
    if address is None:
        log.warning("sdnotify.unsupported_socket", notify_socket=raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        log.warning("sdnotify.send_failed", notify_socket=raw, state=state.split("\n", 1)[0],
                    error=exc.strerror or str(exc))
        return False
    return True


def watchdog_interval_s() -> float | None:
    """The watchdog timeout systemd expects pings within, in seconds; None when there is none.

    From ``$WATCHDOG_USEC`` (microseconds). When ``$WATCHDOG_PID`` is set and names another
    process, the watchdog is that process's business (we were forked from it): None.
    """
    pid = os.environ.get(ENV_WATCHDOG_PID)
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(os.environ.get(ENV_WATCHDOG_USEC, ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


class Watchdog:
    """Pings systemd every half timeout, but only while ``healthy()`` says so.

    A daemon whose worker threads are wedged must stop pinging so that systemd kills it
    (``WatchdogSignal``, SIGABRT by default) and ``Restart=on-failure`` brings it back; a ping thread
    that pinged unconditionally would keep a hung daemon alive forever. ``healthy()`` runs on the
    watchdog thread: keep it quick and non-blocking. If it raises, that counts as unhealthy.
    """

    def __init__(self, healthy: Callable[[], bool]) -> None:
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.interval_s: float | None = None

    def start(self) -> None:
        """Start pinging; a no-op without ``$WATCHDOG_USEC`` or when already started."""
        if self._thread is not None:
            return
        timeout_s = watchdog_interval_s()
        if timeout_s is None:
            return
        self.interval_s = timeout_s / 2  # sd_watchdog_enabled(3): ping at half the timeout
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()
        log.info("watchdog.started", timeout_s=timeout_s)

    def stop(self) -> None:
        """Stop pinging and wait for the thread; a ``healthy()`` call that hangs is not waited out."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5.0)

    def _check(self) -> bool:
        try:
            return bool(self._healthy())
        except Exception:
            log.exception("watchdog.health_check_failed")
            return False

    def _run(self) -> None:
        assert self.interval_s is not None
        was_healthy = True
        while True:
            healthy = self._check()
            if healthy:
                notify("WATCHDOG=1")
            if healthy != was_healthy:
                # Logged on change only: a hung daemon must not flood the journal each interval.
                (log.info if healthy else log.error)(
                    "watchdog.healthy" if healthy else "watchdog.unhealthy_not_pinging")
                was_healthy = healthy
            if self._stop.wait(self.interval_s):
                return
