"""The Storage SCP in a process of its own: the receiver.

Why: on the 2-core box the receiving threads (pynetdicom's reader and the association's handler,
one interpreter lock between them) run at the sender's pace only when nothing else in their process
wants that lock. Measured (profiling scripts on the 2-core machine, 300 x 512x512, dcmtk storescu
into the daemon with streaming off): 5.5-6.2 s alone, 5.7-6.4 s while another *process* derives
and writes slabs without pause, but ~13 s when the deriving ran as a thread of the same process (the
streamed end-to-end run of 2026-12-01). So the receiver moves out, whole: it shares only the spool
(its files and its SQLite index, where both processes serialise on the write lock) with the daemon.

What crosses the pipe, child to daemon: ``("stored", outcome, header)`` after each instance is
durable and indexed (the header the SCP parsed, pixel data stripped, pickled: ~0.25 ms each way),
``("released", series_uids)`` when a sending association is released, and once ``("listening",
port)`` or ``("failed", why)`` at start. Daemon to child: ``("stop", drain_s)``. The daemon turns
the messages into what the in-process SCP's callbacks did (stream, completion), in order.

The child dies with the daemon (PR_SET_PDEATHSIG): kill -9 of the daemon stops receiving at once,
and what was acknowledged is in the spool (a store is durable before its success status).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from appliance.children import ChildProcess, child_setup
from appliance.config import ApplianceConfig
from appliance.logging import get_logger

log = get_logger(__name__)

_START_TIMEOUT_S = 120.0  # a cold start imports pydicom and pynetdicom: seconds on a slow box


def _child(cfg_json: str, log_level: str, conn) -> None:
    child_setup(log_level)
    from appliance.dicom.scp import StorageSCP
    from appliance.dicom.spool import Spool

    cfg = ApplianceConfig.model_validate_json(cfg_json)
    spool = Spool(cfg.storage.root, cfg.limits, keep_refused=cfg.storage.keep_rejected).open(recover=False)
    lock = threading.Lock()

    def tell(*msg) -> None:
        with lock:
            conn.send(msg)

    scp = StorageSCP(cfg, spool, on_stored=lambda outcome, header: tell("stored", outcome, header),
                     on_released=lambda series: tell("released", series))
    try:
        scp.start()
    except Exception as exc:  # the port is taken, the address is wrong: the daemon says why
        tell("failed", f"{type(exc).__name__}: {exc}")
        spool.close()
        return
    tell("listening", (scp.port, scp.tls_port))
    drain_s = 0.0
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break  # the daemon is gone: stop now
            if msg[0] == "stop":
                drain_s = float(msg[1])
                break
    finally:
        scp.stop(drain_s)
        spool.close()
        try:
            tell("stopped", None)
        except (OSError, ValueError):
            pass


class ReceiverProcess(ChildProcess):
    """The daemon's handle on the receiver: `StorageSCP`'s interface (start, stop, port, alive),
    with ``on_stored(outcome, header)`` and ``on_released(series_uids)`` called in the daemon, from
    one thread, in the order the child stored."""

    def __init__(self, cfg: ApplianceConfig, on_stored: Callable, on_released: Callable,
                 log_level: str = "INFO") -> None:
        super().__init__("receiver", _child, (cfg.model_dump_json(), log_level))
        self.cfg = cfg
        self.on_stored, self.on_released = on_stored, on_released
        self._port: int | None = None
        self._tls_port: int | None = None

    def start(self) -> None:
        self._proc.start()
        if not self._conn.poll(_START_TIMEOUT_S):
            self._proc.kill()
            raise RuntimeError(f"the receiver process did not start in {_START_TIMEOUT_S:.0f} s")
        try:
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(5)
            raise RuntimeError(f"the receiver process died at start (exit code {self._proc.exitcode})") from None
        if kind != "listening":
            self._proc.join(5)
            raise RuntimeError(f"the receiver could not listen: {value}")
        self._port, self._tls_port = int(value[0]), value[1]
        self._start_reading()
        log.info("receiver.started", pid=self._proc.pid, port=self._port)

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "stored":
            self.on_stored(msg[1], msg[2])
        elif msg[0] == "released":
            self.on_released(msg[1])

    @property
    def port(self) -> int:
        return self._port if self._port is not None else self.cfg.node.port

    @property
    def tls_port(self) -> int | None:
        return self._tls_port if self._tls_port is not None else self.cfg.tls.port

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """No new associations; running ones finish (up to the timeout); every stored instance's
        message is handled before this returns."""
        self._stop(("stop", drain_timeout_s), drain_timeout_s + 10, 10)
