"""The appliance on loopback: the daemon as a child process, a receiving peer standing in for the
console, and the ZeroMQ subscription, as ``make demo`` and ``appliance bench`` use them.

The daemon runs from a configuration file written into its work folder (so what ran is on disk,
next to its log); storage, ports, events endpoint and the console destination are pointed at the
work folder and at free loopback ports, everything else is the caller's configuration.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pynetdicom import AE, AllStoragePresentationContexts, evt

from appliance.config import ApplianceConfig, Destination, to_toml
from appliance.dicom.scu import SendError, echo
from appliance.events_tail import Subscription

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReceivingPeer:
    """The console's side: a storage SCP that accepts every instance, writes it under ``out``
    (unless ``keep_files`` is off) and notes, per study, when each C-STORE was answered."""

    def __init__(self, out: Path, port: int, ae_title: str = "CONSOLE", keep_files: bool = True) -> None:
        self.out, self.port, self.ae_title, self.keep_files = Path(out), port, ae_title, keep_files
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.arrivals: list[float] = []
        self.by_study: dict[str, list[float]] = defaultdict(list)
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.maximum_associations = 16
        from appliance.dicom.scu import NODELAY

        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store), *NODELAY])

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        if self.keep_files:
            ds.file_meta = event.file_meta
            ds.save_as(self.out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        now = time.time()  # the response goes out as the handler returns
        with self._lock:
            self.arrivals.append(now)
            self.by_study[str(ds.StudyInstanceUID)].append(now)
        return 0x0000

    def study_arrivals(self, study_uid: str) -> list[float]:
        with self._lock:
            return list(self.by_study.get(study_uid, ()))

    def stop(self) -> None:
        self.server.shutdown()


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str,
               proc: subprocess.Popen | None = None, log: Path | None = None, poll_s: float = 0.05) -> T:
    """``predicate()``'s first truthy value; raises if ``proc`` exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"the daemon exited ({proc.returncode}) while waiting for {what}:\n{tail}")
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}" + (f"; daemon log: {log}" if log else ""))


def start_daemon(cfg: ApplianceConfig, config_path: Path, log_path: Path, calling_ae: str,
                 timeout_s: float = 60.0) -> subprocess.Popen:
    """``appliance run --config config_path`` (``cfg`` written there) as a child process, logging
    to ``log_path``, without the caller's APPLIANCE_* environment; returns once it answers C-ECHO
    on loopback (raises, with the log's tail, if it exits or ``timeout_s`` passes first)."""
    config_path.write_text(to_toml(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    # The readiness probe's refused connections are expected; keep them out of the caller's log.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(config_path)],
                            env=env, stdout=open(log_path, "a"), stderr=subprocess.STDOUT)

    def ready() -> bool:
        try:
            return echo("127.0.0.1", cfg.node.port, calling_ae=calling_ae, timeout_s=2) == 0
        except SendError:
            return False

    wait_until(ready, timeout_s, "the daemon to answer C-ECHO", proc, log_path, poll_s=0.1)
    return proc


class LoopbackDaemon:
    """``appliance run`` as a child process on loopback, with its console destination pointed at
    ``console_port`` and its events at a free port (``events_endpoint``)."""

    def __init__(self, cfg: ApplianceConfig, workdir: Path, console_port: int, calling_ae: str = "LOOPBACK") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg.model_copy(deep=True)
        self.cfg.storage.root = self.workdir / "spool"
        self.cfg.node.bind_address = "127.0.0.1"
        self.cfg.node.port = free_port()
        self.cfg.events.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.cfg.denoise.engine_cache = self.workdir / "engines"
        self.cfg.destinations = {
            name: Destination(ae_title=d.ae_title, host="127.0.0.1", port=console_port,
                              calling_ae_title=d.calling_ae_title)
            for name, d in self.cfg.destinations.items()
        }
        allowed = self.cfg.peers.allowed_calling_ae_titles
        self.calling_ae = calling_ae if not allowed or calling_ae in allowed else allowed[0]
        self.config_path = self.workdir / "appliance.toml"
        self.log_path = self.workdir / "daemon.log"
        self.proc: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return self.cfg.node.port

    @property
    def events_endpoint(self) -> str:
        return self.cfg.events.endpoint

    def start(self, timeout_s: float = 60.0) -> LoopbackDaemon:
        self.proc = start_daemon(self.cfg, self.config_path, self.log_path, self.calling_ae, timeout_s)
        return self

    def subscribe(self, topics: tuple[str, ...] = ()) -> Subscription:
        """A subscription to the daemon's events. PUB drops to slow joiners: give it a moment
        (`settle`) before sending anything whose events matter."""
        return Subscription(self.events_endpoint, topics)

    @staticmethod
    def settle() -> None:
        time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (the daemon drains and exits 0); SIGKILL after ``timeout_s``. Its exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                return -9
        return self.proc.returncode


STAGE_LABELS = {
    "receive": "receive: the appliance's first to last instance",
    "completion_wait": "completion: wait after the last instance",
    "assemble": "assemble: decode, sort, check geometry, HU",
    "queue_wait": "queue wait",
    "derive": "derive: write the derived series",
    "export": "export: C-STORE to the destination",
}


def stage_seconds(events: list, series_uid: str) -> dict[str, float]:
    """Seconds per step of one source series, in pipeline order, from the daemon's events:
    receive, completion_wait, assemble (batch only: a streamed series is assembled slab by slab
    while it arrives), queue_wait, ``stage:<name>`` per pipeline stage (summed over the slabs),
    derive (summed), export (the slowest destination, first instance out to the last confirmed). Steps whose events were not seen (PUB drops to slow
    joiners) are left out. Only the last attempt of a retried job counts."""
    mine = [e for e in events if e.series_uid == series_uid]

    def last(topic: str):
        return next((e for e in reversed(mine) if e.topic == topic), None)

    out: dict[str, float] = {}
    received, queued, started, done = last("series.received"), last("job.queued"), last("job.started"), last("job.done")
    if received:
        out["receive"] = (received.received_last - received.received_first).total_seconds()
        out["completion_wait"] = (received.completed_at - received.received_last).total_seconds()
        if queued and queued.queued_at >= received.completed_at:  # batch: assembled after completion
            out["assemble"] = (queued.queued_at - received.completed_at).total_seconds()
    if queued and started:
        out["queue_wait"] = (started.started_at - queued.queued_at).total_seconds()
    if started:
        for e in mine:  # a streamed series has one stage.done per slab: their sum
            if e.topic == "stage.done" and e.attempt == started.attempt:
                out[f"stage:{e.stage}"] = out.get(f"stage:{e.stage}", 0.0) + e.seconds
    if done and "derive" in done.timings:
        out["derive"] = done.timings["derive"]
    exports = [e.seconds for e in mine if e.topic == "export.done"]
    if exports:
        out["export"] = max(exports)
    return out
