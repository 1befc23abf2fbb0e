"""``make demo``: the appliance on its built-in default, a synthetic low-dose study in, the
derived series back, the latency of every stage printed.

1. starts ``appliance run`` as a real process on the built-in default configuration; only the
   storage root, the ports and the default ``console`` destination's port are pointed at this
   demo through ``APPLIANCE_*`` environment variables;
2. starts a receiving peer (a pynetdicom storage SCP standing in for the console) and subscribes
   to the ZeroMQ events;
3. makes a synthetic quarter-dose CT study, sends it over DICOM, waits for the derived series;
4. prints per-stage latency, measured from the events' timestamps, and where the output is.
Exits non-zero if anything failed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt

from appliance.dicom.scu import SendError, echo, send_folder
from appliance.events_tail import Subscription
from appliance.synth.study import write_synthetic_ct

SHAPE_ZYX = (64, 512, 512)
DOSE = 0.25
Z_START_MM = 120.0  # heart, diaphragm and liver dome
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReceivingPeer:
    """The console's side: accepts the derived series and notes when each instance arrived."""

    def __init__(self, out: Path, port: int) -> None:
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.arrivals: list[float] = []
        ae = AE(ae_title="CONSOLE")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(self.out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        self.arrivals.append(time.time())
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def _wait(predicate, timeout_s: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({proc.returncode}) while waiting for {what}:\n"
                               f"{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}; daemon log: {log}")


def _table(ev: Subscription, t_send0: float, t_sent: float, t_last_arrival: float) -> list[tuple[str, float]]:
    received, queued = ev.first("series.received"), ev.first("job.queued")
    started, done, exported = ev.first("job.started"), ev.first("job.done"), ev.first("export.done")
    rows = [
        ("receive: C-STORE of every instance", t_sent - t_send0),
        (f"completion: wait after the last instance ({received.why})",
         (received.completed_at - received.received_last).total_seconds()),
        ("assemble: decode, sort, check geometry, HU", (queued.queued_at - received.completed_at).total_seconds()),
        ("queue wait", (started.started_at - queued.queued_at).total_seconds()),
    ]
    rows += [(f"stage {e.stage}", e.seconds) for e in ev.events if e.topic == "stage.done"]
    rows += [
        ("derive: write the derived series", done.timings.get("derive", float("nan"))),
        ("export: C-STORE to the console", exported.seconds),
        ("end to end: first image sent -> last derived image received", t_last_arrival - t_send0),
    ]
    return rows


def main() -> int:
    from appliance.logging import configure

    configure("WARNING", json=False)
    # The readiness probe's refused connections are expected; pynetdicom would log each one.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    work = Path(tempfile.mkdtemp(prefix="appliance-demo-"))
    port, peer_port, events_port = _free_port(), _free_port(), _free_port()
    endpoint = f"tcp://127.0.0.1:{events_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(
        APPLIANCE_STORAGE__ROOT=str(work / "spool"),
        APPLIANCE_NODE__PORT=str(port),
        APPLIANCE_NODE__BIND_ADDRESS="127.0.0.1",
        APPLIANCE_DESTINATIONS__CONSOLE__PORT=str(peer_port),
        APPLIANCE_EVENTS__ENDPOINT=endpoint,
    )
    log = work / "daemon.log"
    print(f"demo workspace: {work}")

    t0 = time.perf_counter()
    write_synthetic_ct(work / "study", shape_zyx=SHAPE_ZYX, dose_fraction=DOSE, seed=1, z_start_mm=Z_START_MM)
    print(f"synthetic CT at {DOSE:g} of full dose: {SHAPE_ZYX[2]}x{SHAPE_ZYX[1]}x{SHAPE_ZYX[0]}, "
          f"made in {time.perf_counter() - t0:.1f} s")

    peer = ReceivingPeer(work / "received", peer_port)
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "run"], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    events = Subscription(endpoint)
    code = 1
    try:
        def ready():
            try:
                return echo("127.0.0.1", port, timeout_s=2) == 0
            except SendError:
                return False

        _wait(ready, 30, "the daemon to answer C-ECHO", proc, log)
        time.sleep(0.5)  # ZeroMQ subscribers join asynchronously; events are notifications
        n = SHAPE_ZYX[0]
        t_send0 = time.time()
        report = send_folder(work / "study", "127.0.0.1", port, calling_ae="DEMO_CONSOLE", called_ae="APPLIANCE")
        t_sent = time.time()
        if not report.ok or report.sent != n:
            raise RuntimeError(f"sending the study failed: {report.failed[:3]}")
        _wait(lambda: len(peer.arrivals) >= n, TIMEOUT_S, "the derived series at the console", proc, log)
        _wait(lambda: events.first("export.done"), 10, "the export.done event", proc, log)
        failed = [e for e in events.events if e.topic in ("job.failed", "series.rejected")]
        if failed:
            raise RuntimeError(f"the appliance reported: {failed[0]}")
        rows = _table(events, t_send0, t_sent, max(peer.arrivals))
        print(f"\n{'stage':<64} {'seconds':>8}")
        for name, secs in rows:
            print(f"{name:<64} {secs:8.3f}")
        print(f"\nderived series {events.first('job.done').derived_series_uid}: {len(peer.arrivals)} instances in "
              f"{work / 'received'}\ndaemon log {log}; events were published on {endpoint}")
        code = 0
    except Exception as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
    finally:
        events.close()
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = -9
        peer.stop()
        if exit_code != 0:
            print(f"the daemon exited with {exit_code} after SIGTERM", file=sys.stderr)
            code = 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
