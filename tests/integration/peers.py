"""The independent DICOM peers of the integration tests (dcmtk), and the usual set-up: the daemon
as a process with dcmtk's storescp standing in for the console."""

from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig, Destination
from tests.helpers import free_port
from tests.integration.daemon_process import DaemonProcess

# pynetdicom installs console scripts of the same names: dcmtk's are called by full path.
STORESCU = Path("/usr/bin/storescu")
STORESCP = Path("/usr/bin/storescp")


def require_dcmtk() -> None:
    if not (STORESCU.exists() and STORESCP.exists()):
        pytest.fail("dcmtk is not installed (make test installs it): /usr/bin/storescu or storescp missing")


def storescu(port: int, files: list[Path], aet: str = "CONSOLE") -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(STORESCU), "-aet", aet, "-aec", "APPLIANCE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=300,
    )


class StoreSCP:
    """dcmtk's storescp as the destination; counts the C-STORE requests it receives."""

    def __init__(self, out: Path, port: int, extra: list[str] = ()) -> None:
        self.out, self.port, self.extra = out, port, list(extra)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = out.parent / f"storescp-{port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        self.proc = subprocess.Popen(
            [str(STORESCP), "-v", "-aet", "CONSOLE", "-od", str(self.out), *self.extra, str(self.port)],
            stdout=open(self.log, "a"), stderr=subprocess.STDOUT,
        )
        time.sleep(0.3)
        assert self.proc.poll() is None, self.log.read_text()
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    @property
    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    @property
    def requests(self) -> int:
        return self.log.read_text().count("Received Store Request") if self.log.exists() else 0

    def wait_for(self, n: int, timeout_s: float = 90.0) -> list[Path]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.files) >= n:
                time.sleep(0.5)  # let a late duplicate show itself
                return self.files
            time.sleep(0.1)
        raise AssertionError(f"storescp has {len(self.files)} of {n} files after {timeout_s} s")


@contextmanager
def daemon_with_console(cfg: ApplianceConfig, tmp_path: Path, idle_seconds: float = 1.5):
    """The daemon (not yet started) whose default destination is a storescp (not yet started)."""
    dest_port = free_port()
    cfg.destinations = {"console": Destination(ae_title="CONSOLE", host="127.0.0.1", port=dest_port)}
    cfg.completion.idle_seconds = idle_seconds
    daemon = DaemonProcess(cfg, tmp_path / "daemon")
    peer = StoreSCP(tmp_path / "received", dest_port)
    try:
        yield daemon, peer
    finally:
        daemon.stop()
        peer.stop()
