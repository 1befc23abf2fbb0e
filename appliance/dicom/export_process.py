"""The exporter in a process of its own.

Why: on the 2-core box one Python process cannot receive, derive and export a streamed series at
the wire's pace - the three share one interpreter lock. Measured with profiling scripts (not the
bench): exporting alone costs ~9-10 ms of CPU per 512x512 instance, deriving and writing ~18 ms,
receiving ~19 ms (half of it pynetdicom's PDU handling), so in one process they queue behind each
other. Taking the exporter out gained little on its own (300 slices, passthrough: 15.8 -> 15.1 s,
one sample each); derive is the larger share still in the daemon's process. The exporter is the part that shares nothing but the outbox, which is SQLite
(WAL: one writer at a time, readers never blocked, safe across processes), so it moves out whole:
the daemon records instances in the outbox and sends "wake" down a pipe; this process sends them
and answers "sent <entry id>" or "gave_up <entry id>", which the daemon turns into events, job
states and the release of the sources, exactly as when the exporter was a thread.

The child dies with the daemon (PR_SET_PDEATHSIG), so kill -9 of the daemon leaves no exporter
behind; what it had confirmed is in the outbox (see `export` for the durability of the marks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from appliance.children import ChildProcess, child_setup
from appliance.config import ApplianceConfig
from appliance.dicom.export import Entry, Exporter, Outbox
from appliance.logging import get_logger

log = get_logger(__name__)

def _child(cfg_json: str, log_level: str, conn) -> None:
    child_setup(log_level)
    cfg = ApplianceConfig.model_validate_json(cfg_json)
    outbox = Outbox(cfg.storage.root).open()
    lock = threading.Lock()

    def tell(kind: str, entry: Entry) -> None:
        with lock:
            conn.send((kind, entry.id))

    exporter = Exporter(outbox, cfg.destinations, cfg.export, cfg.node.ae_title,
                        on_sent=lambda e: tell("sent", e), on_gave_up=lambda e: tell("gave_up", e))
    exporter.start()
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break  # the daemon is gone
            if msg == "stop":
                break
            exporter.notify()
    finally:
        exporter.stop()
        outbox.close()
        try:
            with lock:
                conn.send(("stopped", 0))
        except (OSError, ValueError):
            pass


class ExporterProcess(ChildProcess):
    """The daemon's handle on the exporter process: the `Exporter` thread's interface
    (start, notify, stop, alive) with ``on_sent`` / ``on_gave_up`` called in the daemon with the
    entry as the daemon's own outbox reads it."""

    def __init__(self, cfg: ApplianceConfig, outbox: Outbox, on_sent: Callable[[Entry], None],
                 on_gave_up: Callable[[Entry], None], log_level: str = "INFO") -> None:
        super().__init__("exporter", _child, (cfg.model_dump_json(), log_level))
        self.cfg, self.outbox = cfg, outbox
        self.on_sent, self.on_gave_up = on_sent, on_gave_up

    def start(self) -> None:
        self._proc.start()
        self._start_reading()
        log.info("exporter.started", pid=self._proc.pid)

    def _handle(self, msg: tuple) -> None:
        kind, entry_id = msg
        entry = self.outbox.get(entry_id)
        if entry is not None:
            (self.on_sent if kind == "sent" else self.on_gave_up)(entry)

    def notify(self) -> None:
        self._send("wake")

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop("stop", timeout_s, 5)
