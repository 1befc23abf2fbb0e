"""kill -9 while a series streams through and while its derived series is being exported, with a
dcmtk storescp as the console (and dcmtk storescu as the sender, except while receiving: there a
paced sender, see `PacedSender`): nothing acknowledged is lost, and no derived instance the console
confirmed is sent to it again (beyond, at most, the one whose confirmation was in flight when the
process died: its response arrived, its mark had not been committed yet)."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from appliance.config import ApplianceConfig
from appliance.synth.study import write_synthetic_ct
from tests.integration.peers import STORESCU, daemon_with_console, require_dcmtk, storescu

N = 96


pytestmark = pytest.mark.integration


@pytest.fixture
def setup(cfg: ApplianceConfig, tmp_path):
    require_dcmtk()
    cfg.peers.allowed_calling_ae_titles = ["CONSOLE"]
    with daemon_with_console(cfg, tmp_path, idle_seconds=2.0) as pair:
        yield pair


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class PacedSender(threading.Thread):
    """One association that sends the files ``gap_s`` apart: a scanner that reconstructs as it sends.
    dcmtk storescu cannot pace, and on a fast machine it sends the whole series before the first
    slab is through: the kill must come while the series is still arriving."""

    def __init__(self, port: int, paths, gap_s: float) -> None:
        super().__init__(daemon=True)
        self.port, self.paths, self.gap_s = port, list(paths), gap_s

    def run(self) -> None:
        import pydicom
        from pynetdicom import AE
        from pynetdicom.sop_class import CTImageStorage

        ae = AE(ae_title="CONSOLE")
        ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="APPLIANCE")
        for path in self.paths:
            if not assoc.is_established:
                return  # the receiver died: the rest is re-sent after the restart
            assoc.send_c_store(pydicom.dcmread(path))
            time.sleep(self.gap_s)
        if assoc.is_established:
            assoc.release()

    def poll(self):  # as Popen: None while still sending
        return None if self.is_alive() else 0


@pytest.mark.parametrize("when", ["while_receiving", "while_exporting"])
def test_kill9_mid_stream_loses_nothing_and_resends_nothing_confirmed(tmp_path, setup, when):
    daemon, peer = setup
    study = write_synthetic_ct(tmp_path / "study", shape_zyx=(N, 256, 256), seed=5)
    peer.start()
    daemon.start()
    if when == "while_receiving":
        sender = PacedSender(daemon.cfg.node.port, study.paths, gap_s=0.1)  # >= 9.6 s for the series
        sender.start()
    else:
        sender = subprocess.Popen([str(STORESCU), "-aet", "CONSOLE", "-aec", "APPLIANCE", "127.0.0.1",
                                   str(daemon.cfg.node.port), *map(str, study.paths)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if when == "while_receiving":
        # Slabs are already at the console while the sender is still sending.
        _wait(lambda: len(peer.files) >= 16, 120, "the first streamed slabs at the console")
        assert sender.poll() is None, "the sender finished before the first slabs arrived: nothing streamed"
    else:
        sender.wait(timeout=120)
        _wait(lambda: len(peer.files) >= N // 2, 120, "half of the derived series at the console")
    daemon.kill()
    sender.join(60) if isinstance(sender, threading.Thread) else sender.wait(timeout=60)
    before = len(peer.files)
    assert before < N or when == "while_receiving", "export finished before the kill: nothing to prove"

    daemon.start()
    if when == "while_receiving":  # the sender saw no success for the rest: it sends the series again
        assert storescu(daemon.cfg.node.port, study.paths).returncode == 0
    files = peer.wait_for(N, timeout_s=120)
    assert len(files) == N  # every derived instance, each under its own SOP Instance UID
    # Instances the console had confirmed before the kill are not sent again (one in flight at most).
    assert peer.requests <= N + 1, f"{peer.requests} C-STORE requests for {N} instances ({before} before the kill)"
    # Nothing acknowledged was lost: every source instance is in the spool, none twice.
    rows = daemon.query("SELECT count(DISTINCT sop_instance_uid), max(version) FROM instances")
    assert rows == [(N, 1)] or daemon.query("SELECT state FROM series") == [("released",)]
    assert daemon.terminate() == 0
