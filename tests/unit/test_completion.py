from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from appliance.config import CompletionConfig, LimitsConfig
from appliance.dicom.completion import CompletionWatcher
from appliance.dicom.spool import COMPLETE, RECEIVING, Spool
from appliance.dicom.validate import read_header
from appliance.synth.series import axial_geometry
from tests.helpers import ramp_volume, write_series


@pytest.fixture
def paths(tmp_path: Path) -> list[Path]:
    hu = ramp_volume((5, 8, 8))
    return write_series(tmp_path / "src", hu, axial_geometry(hu.shape, 1.0, 2.0))


def _store(sp: Spool, path: Path, now: float, tags=()) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    h = read_header(path, ds.SOPClassUID, ds.SOPInstanceUID, list(tags))
    sp.store(path, h, now=now)
    return h.series_uid


def _watcher(sp: Spool, idle=5.0):
    done = []
    return CompletionWatcher(sp, CompletionConfig(idle_seconds=idle), done.append), done


def test_series_completes_after_idle_time_since_last_instance(tmp_path, paths):
    sp = Spool(tmp_path / "spool", LimitsConfig(free_space_reserve_bytes=0)).open()
    uid = _store(sp, paths[0], now=1000.0)
    _store(sp, paths[1], now=1004.0)
    w, done = _watcher(sp, idle=5.0)
    assert w.poll_once(now=1008.9) == [] and sp.series(uid).state == RECEIVING
    assert [r.series_uid for r in w.poll_once(now=1009.0)] == [uid]
    assert sp.series(uid).state == COMPLETE and len(done) == 1
    assert w.poll_once(now=2000.0) == []  # handed on once


def test_expected_count_completes_without_waiting(tmp_path, paths):
    sp = Spool(tmp_path / "spool", LimitsConfig(free_space_reserve_bytes=0)).open()
    w, done = _watcher(sp, idle=3600)
    for k, p in enumerate(paths):
        uid = _store(sp, p, now=1000.0 + k, tags=["ImagesInAcquisition"])
        completed = w.poll_once(now=1000.0 + k)
        assert bool(completed) == (k == len(paths) - 1)
    assert sp.series(uid).expected_count == len(paths)


def test_completion_survives_a_restart_and_idle_counts_from_it(tmp_path, paths):
    root = tmp_path / "spool"
    sp = Spool(root, LimitsConfig(free_space_reserve_bytes=0)).open()
    uid = _store(sp, paths[0], now=1000.0)
    other = write_series(tmp_path / "b", ramp_volume((2, 8, 8)), axial_geometry((2, 8, 8), 1.0, 1.0),
                         seed_text="other series")
    uid2 = _store(sp, other[0], now=1000.0)
    w, _ = _watcher(sp, idle=5.0)
    w.poll_once(now=1010.0)  # both complete ...
    sp.set_series_state(uid2, RECEIVING)  # ... make one "still receiving" for the restart
    sp.close()

    sp = Spool(root, LimitsConfig(free_space_reserve_bytes=0)).open()
    w, done = _watcher(sp, idle=5.0)
    assert [r.series_uid for r in w.resume_after_restart(now=1020.0)] == [uid]  # complete, not yet handed on
    # Still receiving: its idle time counts from the restart (its sender could not send meanwhile).
    assert w.poll_once(now=1024.0) == []
    assert [r.series_uid for r in w.poll_once(now=1025.0)] == [uid2]
    assert len(done) == 2
