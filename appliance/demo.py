"""``make demo``: the appliance on its built-in default, a synthetic low-dose study in, the
derived series back, the latency of every stage printed.

1. starts ``appliance run`` as a real process on the built-in default configuration; only the
   storage root, the ports and the default ``console`` destination are pointed at this demo
   (`appliance.loopback`);
2. starts a receiving peer (a pynetdicom storage SCP standing in for the console) and subscribes
   to the ZeroMQ events;
3. makes a synthetic quarter-dose CT study, sends it over DICOM, waits for the derived series;
4. prints per-stage latency, measured from the events' timestamps, and where the output is.
Exits non-zero if anything failed.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from appliance.config import ApplianceConfig
from appliance.dicom.scu import send_folder
from appliance.events_tail import Subscription
from appliance.loopback import STAGE_LABELS, LoopbackDaemon, ReceivingPeer, free_port, stage_seconds, wait_until
from appliance.synth.study import write_synthetic_ct

SHAPE_ZYX = (64, 512, 512)
DOSE = 0.25
Z_START_MM = 120.0  # heart, diaphragm and liver dome
TIMEOUT_S = 150


def _wire_floor(folder: Path, work: Path) -> float | None:
    """Seconds for dcmtk storescu to move ``folder`` one way into dcmtk storescp (None without dcmtk)."""
    if not (Path("/usr/bin/storescu").exists() and Path("/usr/bin/storescp").exists()):
        return None
    from bench.e2e import send
    from bench.ingest import DcmtkStoreSCP

    work.mkdir(parents=True, exist_ok=True)
    with DcmtkStoreSCP(work) as scp:
        t0 = time.perf_counter()
        send("dcmtk-storescu", folder, scp.port, "DEMO")
        return time.perf_counter() - t0


def main() -> int:
    from appliance.logging import configure

    configure("WARNING", json=False)
    work = Path(tempfile.mkdtemp(prefix="appliance-demo-"))
    print(f"demo workspace: {work}")

    t0 = time.perf_counter()
    study = write_synthetic_ct(work / "study", shape_zyx=SHAPE_ZYX, dose_fraction=DOSE, seed=1,
                               z_start_mm=Z_START_MM)
    print(f"synthetic CT at {DOSE:g} of full dose: {SHAPE_ZYX[2]}x{SHAPE_ZYX[1]}x{SHAPE_ZYX[0]}, "
          f"made in {time.perf_counter() - t0:.1f} s")

    peer_port = free_port()
    peer = ReceivingPeer(work / "received", peer_port)
    daemon = LoopbackDaemon(ApplianceConfig(), work / "daemon", console_port=peer_port, calling_ae="DEMO_CONSOLE")
    events: Subscription | None = None
    code = 1
    try:
        daemon.start()
        events = daemon.subscribe()
        daemon.settle()
        n = SHAPE_ZYX[0]
        t_send0 = time.time()
        report = send_folder(work / "study", "127.0.0.1", daemon.port, calling_ae=daemon.calling_ae,
                             called_ae="APPLIANCE")
        t_sent = time.time()
        if not report.ok or report.sent != n:
            raise RuntimeError(f"sending the study failed: {report.failed[:3]}")
        wait_until(lambda: len(peer.arrivals) >= n, TIMEOUT_S, "the derived series at the console",
                   daemon.proc, daemon.log_path)
        wait_until(lambda: events.first("export.done"), 10, "the export.done event", daemon.proc, daemon.log_path)
        failed = [e for e in events.events if e.topic in ("job.failed", "series.rejected")]
        if failed:
            raise RuntimeError(f"the appliance reported: {failed[0]}")
        steps = stage_seconds(events.events, study.series_uid)
        rows = [("send: C-STORE of every instance (sender's clock)", t_sent - t_send0)]
        rows += [(STAGE_LABELS.get(k, f"stage {k.removeprefix('stage:')}"), v) for k, v in steps.items()]
        end_to_end = max(peer.arrivals) - t_send0
        rows.append(("end to end: first image sent -> last derived image received", end_to_end))
        rows.append(("added latency: last image sent -> last derived image received", max(peer.arrivals) - t_sent))
        streamed = sum(1 for e in events.events if e.topic == "stage.done" and e.slab is not None)
        print(f"\n{'stage':<64} {'seconds':>8}")
        for name, secs in rows:
            print(f"{name:<64} {secs:8.3f}")
        print(f"\nstreamed: {streamed} slab(s) processed, the first ones while the series was still arriving"
              if streamed else "\nnot streamed: the series was processed whole after completion")
        wire = _wire_floor(work / "study", work / "wire")
        if wire is not None:
            print(f"the wire's floor (dcmtk storescu -> dcmtk storescp, the same files, one way): {wire:.3f} s; "
                  f"end to end is {end_to_end / wire:.1f}x that")
        else:
            print("the wire's floor: install dcmtk (`make test` does) to see it beside these numbers")
        print(f"\nderived series {events.first('job.done').derived_series_uid}: {len(peer.arrivals)} instances in "
              f"{work / 'received'}\ndaemon log {daemon.log_path}; events were published on {daemon.events_endpoint}")
        code = 0
    except Exception as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
    finally:
        if events is not None:
            events.close()
        exit_code = daemon.stop()
        peer.stop()
        if exit_code != 0:
            print(f"the daemon exited with {exit_code} after SIGTERM", file=sys.stderr)
            code = 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
