from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pydicom
import pytest

from appliance.config import LimitsConfig
from appliance.dicom import spool as spool_mod
from appliance.dicom.spool import COMPLETE, RECEIVING, OutOfSpace, Spool
from appliance.dicom.validate import InstanceRefused, read_header
from appliance.synth.series import axial_geometry
from tests.helpers import ramp_volume, write_series


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    hu = ramp_volume((4, 8, 8))
    return write_series(tmp_path / "src", hu, axial_geometry(hu.shape, 1.0, 2.0))


def _header(path: Path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return read_header(path, ds.SOPClassUID, ds.SOPInstanceUID, [])


def _spool(tmp_path: Path, **limits) -> Spool:
    return Spool(tmp_path / "spool", LimitsConfig(free_space_reserve_bytes=0, **limits)).open()


def _files(sp: Spool) -> list[Path]:
    return sorted(p for p in (sp.root / "series").rglob("*") if p.is_file())


def test_store_is_on_disk_and_indexed(tmp_path, series):
    sp = _spool(tmp_path)
    out = sp.store(series[0], _header(series[0]), "CONSOLE", "127.0.0.1")
    assert out.kind == "stored" and out.path.read_bytes() == series[0].read_bytes()
    row = sp.series(_header(series[0]).series_uid)
    assert row.instance_count == 1 and row.state == RECEIVING and row.calling_ae == "CONSOLE"
    assert list(sp.incoming.iterdir()) == []


def test_same_bytes_twice_is_idempotent(tmp_path, series):
    sp = _spool(tmp_path)
    first = sp.store(series[0], _header(series[0]))
    again = sp.store(series[0], _header(series[0]))
    assert again.kind == "duplicate" and again.path == first.path
    assert len(_files(sp)) == 1


def test_same_uid_other_bytes_keeps_both_versions_and_uses_newest(tmp_path, series):
    sp = _spool(tmp_path)
    sp.store(series[0], _header(series[0]))
    ds = pydicom.dcmread(series[0])
    ds.WindowCenter = "50"  # a corrected re-send: same UID, different bytes
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)
    out = sp.store(changed, _header(changed))
    assert out.kind == "new_version" and out.version == 2
    assert len(_files(sp)) == 2
    (newest,) = sp.instance_paths(_header(series[0]).series_uid)
    assert newest.read_bytes() == changed.read_bytes()


def test_reserve_larger_than_free_space_refuses_with_A700_and_leaves_nothing(tmp_path, series):
    sp = Spool(tmp_path / "spool", LimitsConfig(free_space_reserve_bytes=1 << 62)).open()
    with pytest.raises(OutOfSpace) as err:
        sp.store(series[0], _header(series[0]))
    assert err.value.status == 0xA700
    assert _files(sp) == [] and list(sp.incoming.iterdir()) == []
    assert sp.series(_header(series[0]).series_uid) is None


def test_disk_full_while_writing_leaves_nothing_partial(tmp_path, series, monkeypatch):
    sp = _spool(tmp_path)

    def fsync_enospc(fd):  # delayed allocation: ext4 reports a full disk at fsync
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_mod.os, "fsync", fsync_enospc)
    with pytest.raises(OutOfSpace) as err:
        sp.store(series[0], _header(series[0]))
    monkeypatch.undo()
    assert err.value.status == 0xA700
    assert _files(sp) == [] and list(sp.incoming.iterdir()) == []
    assert sp.series(_header(series[0]).series_uid) is None


def test_crash_between_rename_and_commit_is_recovered_at_open(tmp_path, series):
    sp = _spool(tmp_path)
    sp.store(series[0], _header(series[0]))
    sp.close()
    # Simulate a process killed after the rename and before the index commit.
    h = _header(series[1])
    target = tmp_path / "spool" / "series" / h.series_uid / f"{h.sop_instance_uid}.dcm"
    shutil.copyfile(series[1], target)
    (tmp_path / "spool" / "incoming" / "dead.part").write_bytes(b"half")
    sp = _spool(tmp_path)
    assert sp.series(h.series_uid).instance_count == 2
    assert list(sp.incoming.iterdir()) == []
    assert sp.store(series[1], h).kind == "duplicate"  # the sender's re-send is idempotent


def test_series_limit_refuses_new_instances_but_accepts_resends(tmp_path, series):
    sp = _spool(tmp_path, max_instances_per_series=2)
    for p in series[:2]:
        sp.store(p, _header(p))
    with pytest.raises(InstanceRefused) as err:
        sp.store(series[2], _header(series[2]))
    assert err.value.reason == "series_limit" and err.value.status == 0xA700
    assert sp.store(series[0], _header(series[0])).kind == "duplicate"


def test_too_large_instance_refused(tmp_path, series):
    sp = _spool(tmp_path, max_bytes_per_instance=1024)
    with pytest.raises(InstanceRefused) as err:
        sp.store(series[0], _header(series[0]))
    assert err.value.reason == "too_large"


def test_new_instance_reopens_a_completed_series(tmp_path, series):
    sp = _spool(tmp_path)
    sp.store(series[0], _header(series[0]))
    uid = _header(series[0]).series_uid
    row = sp.series(uid)
    assert sp.set_series_state(uid, COMPLETE, generation=row.generation)
    out = sp.store(series[1], _header(series[1]))
    assert out.reopened
    row2 = sp.series(uid)
    assert row2.state == RECEIVING and row2.generation == row.generation + 1
    # A completion decided on the old generation no longer applies.
    assert not sp.set_series_state(uid, COMPLETE, generation=row.generation)


def test_refused_instance_is_kept_in_quarantine_with_reason(tmp_path, series):
    sp = _spool(tmp_path)
    kept = sp.record_refused(series[0], "pixel_data_length", "short", "CONSOLE", "127.0.0.1")
    assert kept is not None and kept.read_bytes() == series[0].read_bytes()
    assert "pixel_data_length" in kept.with_suffix(".json").read_text()
    assert sp.refused()[0]["reason"] == "pixel_data_length"


def test_release_deletes_sources_and_a_crash_half_way_does_not_bring_them_back(tmp_path, series):
    sp = _spool(tmp_path)
    for p in series:
        sp.store(p, _header(p))
    uid = _header(series[0]).series_uid
    leftover = sp.instance_paths(uid)[0].read_bytes()
    assert sp.release(uid, generation=0) == len(series)
    assert _files(sp) == [] and sp.series(uid).state == "released"
    # A crash during the deletions would leave files behind: the next start deletes them.
    (sp.series_dir / uid).mkdir()
    (sp.series_dir / uid / f"{_header(series[0]).sop_instance_uid}.dcm").write_bytes(leftover)
    sp.close()
    sp = _spool(tmp_path)
    assert _files(sp) == [] and sp.series(uid).state == "released" and sp.series(uid).instance_count == 0


def test_release_does_nothing_when_instances_arrived_since(tmp_path, series):
    sp = _spool(tmp_path)
    sp.store(series[0], _header(series[0]))
    uid = _header(series[0]).series_uid
    assert sp.release(uid, generation=1) == 0 and len(_files(sp)) == 1


def test_a_name_on_disk_the_index_does_not_list_is_never_overwritten(tmp_path, series):
    # E.g. a released series' file that the release (in the daemon's process) has not deleted
    # yet while the receiver's process stores a re-send: the new instance takes another name.
    sp = _spool(tmp_path)
    h = _header(series[0])
    taken = sp.series_dir / h.series_uid / f"{h.sop_instance_uid}.dcm"
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"left by someone else")
    out = sp.store(series[0], h)
    assert out.kind == "stored" and out.path != taken
    assert out.path.read_bytes() == series[0].read_bytes() and taken.read_bytes() == b"left by someone else"
    assert sp.instance_paths(h.series_uid) == [out.path]
    assert sp.store(series[0], h).kind == "duplicate"


def test_a_release_cut_off_before_its_commit_is_finished_at_open(tmp_path, series):
    sp = _spool(tmp_path)
    for p in series:
        sp.store(p, _header(p))
    uid = _header(series[0]).series_uid
    for f in sp.instance_paths(uid):  # `release` deletes the files, then the process dies
        f.unlink()
    sp.close()
    sp = _spool(tmp_path)
    row = sp.series(uid)
    assert row.state == "released" and row.instance_count == 0
    assert sp.store(series[0], _header(series[0])).kind == "stored"  # a re-send is new data


def test_an_indexed_file_that_is_gone_is_forgotten_so_its_resend_is_stored(tmp_path, series):
    sp = _spool(tmp_path)
    for p in series:
        sp.store(p, _header(p))
    uid = _header(series[0]).series_uid
    sp.instance_paths(uid)[1].unlink()
    sp.close()
    sp = _spool(tmp_path)
    assert sp.series(uid).state == RECEIVING and sp.series(uid).instance_count == len(series) - 1
    assert sp.store(series[1], _header(series[1])).kind == "stored"
    assert sp.series(uid).instance_count == len(series)


def test_a_file_hashed_and_fsynced_by_the_receiver_is_linked_in_without_a_second_read(tmp_path, series):
    sp = _spool(tmp_path)
    received = sp.incoming / "recv-1.dcm"  # as pynetdicom leaves it for the C-STORE handler
    shutil.copyfile(series[0], received)
    sha = spool_mod.hash_and_fsync(received)
    out = sp.store(received, _header(series[0]), move=True, sha256=sha)
    assert out.kind == "stored" and out.path.read_bytes() == series[0].read_bytes()
    assert not received.exists()  # linked in, the receiver's name gone: no copy
    assert sp.db.execute("SELECT sha256 FROM instances").fetchone()[0] == sha
