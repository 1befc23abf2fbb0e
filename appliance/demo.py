"""``make demo``: the appliance on its built-in default, a synthetic low-dose study in, latency out.

Starts ``appliance run`` as a real process (built-in default configuration; only the storage root
and port are pointed at a scratch folder through the environment), makes a synthetic low-dose CT
study, sends it over DICOM and prints the measured latency of each stage. Exits non-zero if any
step fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.dicom.scu import SendError, echo, send_folder
from appliance.synth.study import write_synthetic_ct

SHAPE_ZYX = (64, 512, 512)
DOSE = 0.25
Z_START_MM = 120.0  # heart, diaphragm and liver dome


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}")


def _events(log: Path) -> dict[str, dict]:
    out = {}
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            e = json.loads(line)
            out.setdefault(e.get("event", ""), e)
    return out


def _ts(event: dict) -> float:
    """The epoch seconds of a daemon log event."""
    from datetime import datetime

    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def main() -> int:
    from appliance.logging import configure

    configure("WARNING", json=False)
    work = Path(tempfile.mkdtemp(prefix="appliance-demo-"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(APPLIANCE_STORAGE__ROOT=str(work / "spool"), APPLIANCE_NODE__PORT=str(port),
               APPLIANCE_NODE__BIND_ADDRESS="127.0.0.1")
    log = work / "daemon.log"
    print(f"demo workspace: {work}")

    t0 = time.perf_counter()
    study = write_synthetic_ct(work / "study", shape_zyx=SHAPE_ZYX, dose_fraction=DOSE, seed=1, z_start_mm=Z_START_MM)
    t_synth = time.perf_counter() - t0
    print(f"synthetic low-dose CT: {SHAPE_ZYX[2]}x{SHAPE_ZYX[1]}x{SHAPE_ZYX[0]}, dose {DOSE}, made in {t_synth:.2f} s")

    proc = subprocess.Popen([sys.executable, "-m", "appliance", "run"], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        def ready():
            try:
                return echo("127.0.0.1", port, timeout_s=2) == 0
            except SendError:
                return False

        _wait(ready, 30, "the daemon to answer C-ECHO", proc, log)
        t_send0 = time.time()
        report = send_folder(work / "study", "127.0.0.1", port, calling_ae="DEMO_CONSOLE", called_ae="APPLIANCE")
        t_sent = time.time()
        if not report.ok or report.sent != SHAPE_ZYX[0]:
            raise RuntimeError(f"send failed: {report.failed[:3]}")

        def done():
            db = sqlite3.connect(f"file:{work / 'spool' / 'index.sqlite'}?mode=ro", uri=True)
            try:
                row = db.execute("SELECT state, reason FROM series WHERE series_uid = ?", (study.series_uid,)).fetchone()
            finally:
                db.close()
            return row if row and row[0] in ("assembled", "rejected") else None

        state, reason = _wait(done, 60, "the series to be assembled", proc, log)
        t_done = time.time()
        if state != "assembled":
            raise RuntimeError(f"series rejected: {reason}")
        ev = _events(log)
        complete, assembled = ev["series.complete"], ev["series.assembled"]
        rows = [
            ("receive (C-STORE of all instances)", t_sent - t_send0),
            (f"completion wait ({complete['why']}, idle_seconds default)", _ts(complete) - t_sent),
            ("assemble (decode, sort, check, HU)", assembled["assemble_s"]),
            ("end to end (first C-STORE to assembled volume)", t_done - t_send0),
        ]
        print(f"\n{'stage':<60} {'seconds':>8}")
        for name, secs in rows:
            print(f"{name:<60} {secs:8.3f}")
        print(f"\nvolume {assembled['volumes'][0]['shape']} {assembled['volumes'][0]['units']}; "
              f"spool {work / 'spool'}; daemon log {log}")
        print("export of the enhanced series back to the sender arrives with the pipeline (issue 4).")
    except Exception as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
        if code != 0:
            print(f"daemon exited with {code} after SIGTERM", file=sys.stderr)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
