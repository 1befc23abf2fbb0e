"""A study in from dcmtk's storescu, the derived series out to dcmtk's storescp, events on ZeroMQ."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from appliance.config import ApplianceConfig
from appliance.dicom.assemble import assemble_series
from appliance.events_tail import Subscription
from appliance.synth.study import write_synthetic_ct
from tests.helpers import free_port
from tests.integration.peers import daemon_with_console, require_dcmtk, storescu

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _dcmtk_installed():
    require_dcmtk()


@pytest.fixture
def setup(cfg: ApplianceConfig, tmp_path: Path):
    cfg.export.retry_initial_s = 0.5
    cfg.export.retry_max_s = 1.0
    cfg.events.endpoint = f"tcp://127.0.0.1:{free_port()}"
    with daemon_with_console(cfg, tmp_path) as pair:
        yield pair


def test_study_in_derived_series_out_with_every_event_in_order(tmp_path, setup):
    daemon, peer = setup
    daemon.cfg.events.health_interval_s = 0.2
    study = write_synthetic_ct(tmp_path / "study", shape_zyx=(24, 128, 128), dose_fraction=0.25, seed=5,
                               z_start_mm=180)
    peer.start()
    daemon.start()
    sub = Subscription(daemon.cfg.events.endpoint)
    try:
        # PUB drops to slow joiners: a health event shows the subscription is live.
        assert sub.wait_for("health", 20), "no health event: subscription not live"
        assert storescu(daemon.cfg.node.port, study.paths).returncode == 0
        files = peer.wait_for(24)
        assert sub.wait_for("export.done", 20)
    finally:
        sub.close()

    # What the peer stored: a proper derived series of the same study.
    received = [pydicom.dcmread(p) for p in files]
    assert {ds.StudyInstanceUID for ds in received} == {study.study_uid}
    (derived_uid,) = {ds.SeriesInstanceUID for ds in received}
    assert derived_uid != study.series_uid
    assert all(list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] for ds in received)
    source_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study.paths}
    referenced = {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in received}
    assert referenced == source_uids
    assert all(ds.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series_uid for ds in received)
    (vol,) = assemble_series(files, daemon.cfg.assembly).volumes
    assert np.max(np.abs(vol.voxels - study.hu[::-1])) <= 0.5  # HU round-trip
    n = study.hu.shape[0]
    np.testing.assert_allclose(vol.geometry.slice_position(0), study.geometry.slice_position(n - 1), atol=1e-3)
    np.testing.assert_allclose(vol.geometry.axes, [[0, 0, 1], [0, 1, 0], [1, 0, 0]], atol=1e-6)
    assert peer.requests == 24  # each instance once

    # Every topic of the study, in order, with the documented schema (decode validated each).
    topics = [e.topic for e in sub.events if e.topic != "health" and e.series_uid == study.series_uid]
    # Streamed (passthrough streams): the job starts on the first slab, before the series is
    # complete; one stage.done per slab; the last slab follows completion.
    assert topics[:3] == ["job.queued", "job.started", "stage.done"] and topics[-2:] == ["job.done", "export.done"]
    assert topics.count("series.received") == 1 and "stream.fallback" not in topics
    assert topics.index("series.received") < topics.index("job.done")
    assert set(topics) == {"series.received", "job.queued", "job.started", "stage.done", "job.done", "export.done"}
    slabs = [e for e in sub.events if e.topic == "stage.done" and e.series_uid == study.series_uid]
    assert len(slabs) >= 2 and sum(e.slices for e in slabs) == 24 and [e.slab for e in slabs] == list(range(len(slabs)))
    done = next(e for e in sub.events if e.topic == "export.done")
    assert done.derived_series_uid == derived_uid and done.instances == 24 and done.end_to_end_s > 0

    # Sources are released once the destination has the whole series.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and daemon.query("SELECT state FROM series")[0][0] != "released":
        time.sleep(0.1)
    assert daemon.query("SELECT state FROM series") == [("released",)]
    assert not (daemon.cfg.storage.root / "series" / study.series_uid).exists()
    assert daemon.terminate() == 0


def test_destination_down_then_back_with_a_restart_between_sends_each_instance_once(tmp_path, setup):
    daemon, peer = setup
    study = write_synthetic_ct(tmp_path / "study", shape_zyx=(12, 64, 64), seed=9)
    daemon.start()
    assert storescu(daemon.cfg.node.port, study.paths).returncode == 0

    def outbox(sql: str):
        import sqlite3

        db = sqlite3.connect(f"file:{daemon.cfg.storage.root / 'outbox.sqlite'}?mode=ro", uri=True)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()

    deadline = time.monotonic() + 30  # the destination is down: retries pile up
    while time.monotonic() < deadline:
        if (daemon.cfg.storage.root / "outbox.sqlite").exists():
            rows = outbox("SELECT attempts, state FROM outbox")
            if rows and rows[0][0] >= 2:
                break
        time.sleep(0.1)
    assert rows and rows[0][0] >= 2 and rows[0][1] == "pending", rows

    assert daemon.terminate() == 0  # the appliance restarts meanwhile
    daemon.start()
    peer.start()  # the destination comes back
    files = peer.wait_for(12)
    assert len(files) == 12 and peer.requests == 12  # delivered, nothing twice
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and outbox("SELECT state FROM outbox") != [("sent",)]:
        time.sleep(0.1)
    assert outbox("SELECT state FROM outbox") == [("sent",)]
    retries = [e for e in daemon.logs() if e.get("event") == "export.retry"]
    assert len(retries) >= 2
