"""kill -9 while a series streams through and while its derived series is being exported, with
dcmtk peers on both sides: nothing acknowledged is lost, and no derived instance the console
confirmed is sent to it again (beyond, at most, the one whose confirmation was in flight when the
process died: its response arrived, its mark had not been committed yet)."""

from __future__ import annotations

import subprocess
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


@pytest.mark.parametrize("when", ["while_receiving", "while_exporting"])
def test_kill9_mid_stream_loses_nothing_and_resends_nothing_confirmed(tmp_path, setup, when):
    daemon, peer = setup
    study = write_synthetic_ct(tmp_path / "study", shape_zyx=(N, 256, 256), seed=5)
    peer.start()
    daemon.start()
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
    sender.wait(timeout=60)
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
