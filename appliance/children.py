"""What the daemon's child processes (the receiver, the exporter) share: each dies with the
daemon (kill -9 of the daemon leaves nothing behind) and leaves the decision to stop to it."""

from __future__ import annotations

import ctypes
import signal

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
