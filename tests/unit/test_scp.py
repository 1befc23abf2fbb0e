"""The SCP over real associations (pynetdicom SCU on loopback), daemon in-process."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import MRImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from appliance.daemon import Daemon
from appliance.dicom.assemble import assemble_series
from appliance.dicom import scu  # noqa: F401  (sends files as their bytes: crafted input goes out as is)
from appliance.dicom.scu import echo, send_folder
from appliance.dicom.spool import ASSEMBLED, REJECTED
from appliance.synth.series import axial_geometry
from tests.helpers import ramp_volume, write_series


@pytest.fixture
def daemon(cfg):
    cfg.routes = []  # ingest only: nothing is routed on to a pipeline or destination
    d = Daemon(cfg)
    d.start()
    yield d
    d.stop(drain_timeout_s=5)


def _wait_state(d: Daemon, series_uid: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = d.spool.series(series_uid)
        if row and row.state in (ASSEMBLED, REJECTED):
            return row
        time.sleep(0.05)
    raise AssertionError(f"series {series_uid} not assembled or rejected in {timeout} s: {row}")


def _series(tmp_path: Path, name: str, n: int = 6) -> tuple[np.ndarray, list[Path]]:
    hu = ramp_volume((n, 16, 16))
    return hu, write_series(tmp_path / name, hu, axial_geometry(hu.shape, 1.0, 2.0), seed_text=name)


def _send_one(port: int, path: Path, aet: str = "TESTSCU") -> int:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    ae = AE(ae_title=aet)
    ae.add_requested_context(ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def test_echo_and_a_series_is_stored_and_assembled(tmp_path, daemon):
    assert echo("127.0.0.1", daemon.scp.port) == 0
    hu, paths = _series(tmp_path, "good")
    report = send_folder(tmp_path / "good", "127.0.0.1", daemon.scp.port)
    assert report.ok and report.sent == len(paths)
    uid = pydicom.dcmread(paths[0]).SeriesInstanceUID
    row = _wait_state(daemon, uid)
    assert row.state == ASSEMBLED and row.instance_count == len(paths)
    (vol,) = assemble_series(daemon.spool.instance_paths(uid), daemon.cfg.assembly).volumes
    np.testing.assert_array_equal(vol.voxels, hu[::-1])


def _assert_still_serving(tmp_path: Path, daemon: Daemon, name: str = "after") -> None:
    assert echo("127.0.0.1", daemon.scp.port) == 0
    _, paths = _series(tmp_path, name, n=3)
    assert send_folder(tmp_path / name, "127.0.0.1", daemon.scp.port).sent == 3


def test_truncated_file_gets_C000_and_nothing_is_stored(tmp_path, daemon):
    _, paths = _series(tmp_path, "t", n=1)
    paths[0].write_bytes(paths[0].read_bytes()[:-100])
    assert _send_one(daemon.scp.port, paths[0]) == 0xC000
    assert not any((daemon.spool.root / "series").iterdir())
    assert daemon.spool.refused()[0]["reason"] == "truncated"
    _assert_still_serving(tmp_path, daemon)


def test_sop_class_not_matching_context_gets_A900(tmp_path, daemon):
    _, paths = _series(tmp_path, "m", n=1)
    ds = pydicom.dcmread(paths[0])
    ds.SOPClassUID = MRImageStorage  # the file meta (and so the context) still says CT
    ds.save_as(paths[0], enforce_file_format=False)
    assert _send_one(daemon.scp.port, paths[0]) == 0xA900
    assert daemon.spool.refused()[0]["reason"] == "sop_class_mismatch"
    _assert_still_serving(tmp_path, daemon)


def test_pixel_data_of_wrong_length_gets_A900(tmp_path, daemon):
    _, paths = _series(tmp_path, "p", n=1)
    ds = pydicom.dcmread(paths[0])
    ds.PixelData = ds.PixelData[:-2 * 16]
    ds.save_as(paths[0], enforce_file_format=True)
    assert _send_one(daemon.scp.port, paths[0]) == 0xA900
    assert daemon.spool.refused()[0]["reason"] == "pixel_data_length"
    _assert_still_serving(tmp_path, daemon)


def test_missing_position_and_non_uniform_spacing_are_rejected_with_reasons(tmp_path, daemon):
    _, a = _series(tmp_path, "nopos")
    ds = pydicom.dcmread(a[2]); del ds.ImagePositionPatient; ds.save_as(a[2], enforce_file_format=True)
    _, b = _series(tmp_path, "spacing")
    ds = pydicom.dcmread(b[3]); ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) - 0.7
    ds.save_as(b[3], enforce_file_format=True)
    for name, paths, reason in (("nopos", a, "missing_position"), ("spacing", b, "non_uniform_spacing")):
        assert send_folder(tmp_path / name, "127.0.0.1", daemon.scp.port).sent == len(paths)
        row = _wait_state(daemon, pydicom.dcmread(paths[0]).SeriesInstanceUID)
        assert (row.state, row.reason) == (REJECTED, reason)
    _assert_still_serving(tmp_path, daemon)


@pytest.fixture
def strict_cfg(cfg):
    cfg.routes = []
    cfg.peers.allowed_calling_ae_titles = ["CONSOLE"]
    return cfg


def _association_reject(port: int, aet: str) -> tuple[int, int]:
    """(result, diagnostic) of the A-ASSOCIATE-RJ the peer receives; fails on an abort."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port)
    assert assoc.is_rejected and not assoc.is_aborted
    return assoc.acceptor.primitive.result, assoc.acceptor.primitive.diagnostic


def test_calling_ae_not_allowed_is_refused_at_association(tmp_path, strict_cfg):
    d = Daemon(strict_cfg)
    d.start()
    try:
        assert _association_reject(d.scp.port, "INTRUDER") == (0x01, 0x03)  # calling AE not recognised
        _, paths = _series(tmp_path, "ae", n=2)
        report = send_folder(tmp_path / "ae", "127.0.0.1", d.scp.port, calling_ae="INTRUDER")
        assert report.sent == 0 and "association refused" in report.failed[0][1]
        assert send_folder(tmp_path / "ae", "127.0.0.1", d.scp.port, calling_ae="CONSOLE").sent == 2
    finally:
        d.stop(5)


def test_source_address_not_allowed_is_refused(tmp_path, cfg):
    cfg.routes = []
    cfg.peers.allowed_source_networks = ["192.0.2.0/24"]  # not loopback
    d = Daemon(cfg)
    d.start()
    try:
        assert _association_reject(d.scp.port, "ANY")[0] == 0x01
        _, paths = _series(tmp_path, "ip", n=1)
        assert send_folder(tmp_path / "ip", "127.0.0.1", d.scp.port).sent == 0
    finally:
        d.stop(5)


def test_full_disk_gets_A700_and_leaves_nothing_partial(tmp_path, cfg):
    cfg.routes = []
    cfg.limits.free_space_reserve_bytes = 1 << 62  # more than any disk has free
    d = Daemon(cfg)
    d.start()
    try:
        _, paths = _series(tmp_path, "full", n=2)
        report = send_folder(tmp_path / "full", "127.0.0.1", d.scp.port)
        assert report.sent == 0 and all("0xA700" in why for _, why in report.failed)
        assert not any((d.spool.root / "series").iterdir()) and not any(d.spool.incoming.iterdir())
        assert echo("127.0.0.1", d.scp.port) == 0
    finally:
        d.stop(5)


def test_the_receiver_is_a_process_of_its_own_and_its_loss_makes_the_daemon_unhealthy(tmp_path, cfg):
    cfg.routes = []
    d = Daemon(cfg)
    d.start()
    try:
        assert d.healthy() and d.scp.pid not in (None, os.getpid())
        _, paths = _series(tmp_path, "rx", n=3)
        assert send_folder(tmp_path / "rx", "127.0.0.1", d.scp.port).sent == 3
        assert _wait_state(d, str(pydicom.dcmread(paths[0]).SeriesInstanceUID)).instance_count == 3
        os.kill(d.scp.pid, signal.SIGKILL)  # the watchdog then restarts the whole unit
        deadline = time.monotonic() + 10
        while d.healthy() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not d.healthy()
    finally:
        d.stop(5)


def test_a_port_already_taken_fails_the_start_with_the_reason(cfg):
    cfg.routes = []
    with socket.socket() as taken:
        taken.bind((cfg.node.bind_address, cfg.node.port))
        taken.listen()
        d = Daemon(cfg)
        try:
            with pytest.raises(RuntimeError, match="could not listen.*(in use|Errno 98)"):
                d.start()
        finally:
            d.stop(5)


def test_a_received_file_on_a_full_disk_drops_its_bytes_instead_of_raising(tmp_path):
    """pynetdicom writes the dataset in its reactor thread: ENOSPC there must become a flag the
    C-STORE handler answers 0xA700 for, not an exception that kills the association."""
    from appliance.dicom.scp import ReceivedFile

    rf = ReceivedFile(tmp_path)
    rf.write(b"\0" * 132)
    rf.file.flush()
    assert not rf.out_of_space and Path(rf.name).stat().st_size == 132
    rf._f.close()
    rf._f = open("/dev/full", "wb")  # every write: ENOSPC
    rf.write(b"x" * 100_000)
    rf.file.flush()
    assert rf.out_of_space
    rf.write(b"more")  # dropped, no error
    rf.close()
