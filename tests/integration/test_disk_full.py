"""A really full disk (a small tmpfs as the spool, no free-space reserve, several senders at once):
every instance is answered 0x0000 or 0xA700 (out of resources: senders retry), never a permanent
failure; nothing partial is left; C-ECHO is still answered; when space returns, instances are
stored again. CI runs as root, so the tmpfs is real there."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from appliance.daemon import Daemon
from appliance.dicom.scu import echo
from appliance.synth.study import write_synthetic_ct

pytestmark = pytest.mark.integration

OK, OUT_OF_RESOURCES = 0x0000, 0xA700


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _send(port: int, paths: list[Path], statuses: list[tuple[str, int]], aet: str) -> None:
    ae = AE(ae_title=aet)
    ds0 = pydicom.dcmread(paths[0], stop_before_pixels=True)
    ae.add_requested_context(ds0.SOPClassUID, ds0.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="APPLIANCE")
    assert assoc.is_established
    try:
        for path in paths:
            status = assoc.send_c_store(path)
            statuses.append((pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID,
                             int(status.Status) if "Status" in status else -1))
    finally:
        if assoc.is_established:
            assoc.release()


def test_a_full_disk_answers_A700_everywhere_and_recovers(tmp_path, cfg, small_disk):
    cfg.routes = []  # ingest only
    cfg.storage.root = small_disk / "spool"
    cfg.limits.free_space_reserve_bytes = 0  # the disk itself runs out, not the reserve
    filler = small_disk / "filler"
    d = Daemon(cfg)
    d.start()
    try:
        st = os.statvfs(small_disk)
        free = st.f_bavail * st.f_frsize
        with open(filler, "wb") as f:  # leave room for about 8 instances of 512 KiB
            f.write(b"\0" * max(0, free - 8 * 530_000))
        studies = [write_synthetic_ct(tmp_path / f"s{i}", shape_zyx=(8, 512, 512), seed=i) for i in range(4)]
        statuses: list[tuple[str, int]] = []
        senders = [threading.Thread(target=_send, args=(d.scp.port, s.paths, statuses, f"SENDER{i}"))
                   for i, s in enumerate(studies)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(timeout=120)
        codes = [code for _, code in statuses]
        assert len(codes) == 32 and set(codes) <= {OK, OUT_OF_RESOURCES}, sorted(set(codes))
        assert codes.count(OUT_OF_RESOURCES) > 0, "the disk never filled: the test did not test"
        acknowledged = {uid for uid, code in statuses if code == OK}
        stored = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                  for p in (cfg.storage.root / "series").rglob("*.dcm")}
        assert acknowledged <= stored  # nothing acknowledged is lost
        assert stored <= acknowledged  # nothing refused was kept as a series member
        assert not [p for p in (cfg.storage.root / "incoming").iterdir()]  # nothing partial
        assert echo("127.0.0.1", d.scp.port) == 0

        filler.unlink()  # space returns
        again: list[tuple[str, int]] = []
        _send(d.scp.port, studies[0].paths, again, "SENDER0")
        assert [code for _, code in again] == [OK] * 8
    finally:
        d.stop(5)
