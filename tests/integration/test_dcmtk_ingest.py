"""Ingest against a peer nobody here wrote: dcmtk's storescu, with the daemon as a real process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pynetdicom import AE

from appliance.config import ApplianceConfig
from appliance.dicom import scu  # noqa: F401  (files go out as their bytes)
from appliance.dicom.assemble import assemble_series
from appliance.synth.study import SyntheticStudy, write_synthetic_ct
from tests.integration.daemon_process import DaemonProcess
from tests.integration.peers import require_dcmtk, storescu

pytestmark = pytest.mark.integration

@pytest.fixture(autouse=True)
def _dcmtk_installed():
    require_dcmtk()


@pytest.fixture
def daemon(cfg: ApplianceConfig, tmp_path: Path):
    cfg.completion.idle_seconds = 2.0
    cfg.routes = []  # ingest only
    d = DaemonProcess(cfg, tmp_path / "daemon")
    yield d
    d.stop()


def _spooled_volume(d: DaemonProcess, study: SyntheticStudy):
    rows = d.query("SELECT path FROM instances WHERE series_uid = ?", study.series_uid)
    (vol,) = assemble_series([d.cfg.storage.root / r[0] for r in rows], d.cfg.assembly).volumes
    return vol


def _assert_volume_is_the_phantom(vol, study: SyntheticStudy) -> None:
    # Slice 0 of the study is the most superior; the volume ascends along the normal (to the head).
    np.testing.assert_array_equal(vol.voxels, study.hu[::-1])
    n = study.hu.shape[0]
    np.testing.assert_allclose(vol.geometry.slice_position(0), study.geometry.slice_position(n - 1), atol=1e-4)
    np.testing.assert_allclose(vol.geometry.slice_position(n - 1), study.geometry.slice_position(0), atol=1e-4)


def test_storescu_sends_100_slices_all_spooled_and_assembled_voxel_for_voxel(tmp_path, daemon):
    study = write_synthetic_ct(tmp_path / "study", shape_zyx=(100, 256, 256), dose_fraction=0.25, seed=7)
    daemon.start()
    res = storescu(daemon.cfg.node.port, study.paths)
    assert res.returncode == 0, res.stdout + res.stderr
    assert daemon.wait_series_state(study.series_uid, ("assembled", "rejected")) == ("assembled", None)
    assert daemon.query("SELECT count(*), count(DISTINCT sop_instance_uid) FROM instances") == [(100, 100)]
    _assert_volume_is_the_phantom(_spooled_volume(daemon, study), study)
    assembled = [e for e in daemon.logs() if e.get("event") == "series.assembled"]
    assert assembled and assembled[0]["volumes"][0]["shape"] == [100, 256, 256]
    assert daemon.terminate() == 0  # SIGTERM drains and exits 0


def test_sigkill_mid_series_then_resend_completes_with_every_instance_once(tmp_path, daemon):
    study = write_synthetic_ct(tmp_path / "study", shape_zyx=(100, 128, 128), dose_fraction=0.25, seed=11)
    daemon.cfg.completion.idle_seconds = 3.0
    daemon.start()
    # A console sends the first 40 images on one association ...
    ae = AE(ae_title="CONSOLE")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", daemon.cfg.node.port)
    assert assoc.is_established
    for path in study.paths[:40]:
        assert assoc.send_c_store(path).Status == 0
    # ... and the appliance dies with the association still open.
    daemon.kill()
    assoc.abort()
    assert daemon.query("SELECT count(*) FROM instances") == [(40,)]
    assert daemon.query("SELECT state FROM series") == [("receiving",)]

    daemon.start()
    # The console re-sends from where it believes it stopped (with some overlap: idempotent).
    res = storescu(daemon.cfg.node.port, study.paths[35:])
    assert res.returncode == 0, res.stdout + res.stderr
    assert daemon.wait_series_state(study.series_uid, ("assembled", "rejected")) == ("assembled", None)
    assert daemon.query("SELECT count(*), count(DISTINCT sop_instance_uid), max(version) FROM instances") == [
        (100, 100, 1)
    ]
    spooled = list((daemon.cfg.storage.root / "series" / study.series_uid).iterdir())
    assert len(spooled) == 100
    assert not any((daemon.cfg.storage.root / "incoming").iterdir())
    _assert_volume_is_the_phantom(_spooled_volume(daemon, study), study)


def test_storescu_from_a_calling_ae_not_allowed_is_rejected_and_daemon_keeps_serving(tmp_path, daemon):
    daemon.cfg.peers.allowed_calling_ae_titles = ["CONSOLE"]
    study = write_synthetic_ct(tmp_path / "study", shape_zyx=(3, 64, 64), seed=3)
    daemon.start()
    res = storescu(daemon.cfg.node.port, study.paths, aet="INTRUDER")
    assert res.returncode != 0
    assert "Association Rejected" in res.stdout + res.stderr
    assert storescu(daemon.cfg.node.port, study.paths, aet="CONSOLE").returncode == 0
    assert daemon.wait_series_state(study.series_uid, ("assembled",))[0] == "assembled"
