"""The daemon as a real process (``python -m appliance run``), for tests that kill it."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from appliance.config import ApplianceConfig
from appliance.loopback import start_daemon


class DaemonProcess:
    def __init__(self, cfg: ApplianceConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "appliance.toml"
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"daemon-{self.runs}.log"

    def start(self, timeout_s: float = 30.0) -> DaemonProcess:
        self.runs += 1
        allowed = self.cfg.peers.allowed_calling_ae_titles
        self.proc = start_daemon(self.cfg, self.config_path, self.log_path,  # as the test has set it up
                                 allowed[0] if allowed else "READY_PROBE", timeout_s)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def logs(self) -> list[dict]:
        """Every JSON log line of every run so far."""
        out = []
        for run in range(1, self.runs + 1):
            for line in (self.workdir / f"daemon-{run}.log").read_text().splitlines():
                if line.startswith("{"):
                    out.append(json.loads(line))
        return out

    def query(self, sql: str, *args: object) -> list[tuple]:
        """Read the spool's index without taking part in its writes."""
        db = sqlite3.connect(f"file:{self.cfg.storage.root / 'index.sqlite'}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def wait_series_state(self, series_uid: str, states: tuple[str, ...], timeout_s: float = 60.0) -> tuple:
        deadline = time.monotonic() + timeout_s
        rows: list[tuple] = []
        while time.monotonic() < deadline:
            if (self.cfg.storage.root / "index.sqlite").exists():
                rows = self.query("SELECT state, reason FROM series WHERE series_uid = ?", series_uid)
                if rows and rows[0][0] in states:
                    return rows[0]
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon died:\n{self.log_path.read_text()}")
            time.sleep(0.1)
        raise AssertionError(f"series {series_uid} not in {states} after {timeout_s} s: {rows}")
