from __future__ import annotations

import time
from pathlib import Path

import pytest

from appliance.config import Destination, ExportConfig
from appliance.dicom import export
from appliance.dicom.export import GAVE_UP, PENDING, SENT, DeliveryError, Exporter, Outbox


@pytest.fixture
def outbox(tmp_path: Path) -> Outbox:
    return Outbox(tmp_path).open()


FILES = [(f"1.2.{i}", Path(f"/x/{i}.dcm")) for i in range(3)]
DEST = {"pacs": Destination(ae_title="PACS", host="127.0.0.1", port=1)}


def _exporter(outbox, cfg=None, sent=None, gave_up=None):
    return Exporter(outbox, DEST, cfg or ExportConfig(retry_initial_s=2, retry_max_s=10, give_up_after_s=3600),
                    "APPLIANCE", on_sent=(sent if sent is not None else []).append,
                    on_gave_up=(gave_up if gave_up is not None else []).append)


def test_outbox_entries_are_idempotent_and_durable(tmp_path, outbox):
    e = outbox.add(7, ["pacs"], "9.9", FILES)[0]
    assert outbox.add(7, ["pacs"], "9.9", FILES)[0].id == e.id
    outbox.mark_instance_sent(e.id, "1.2.0")
    outbox.close()
    again = Outbox(tmp_path).open()
    assert [uid for uid, _ in again.unsent(e.id)] == ["1.2.1", "1.2.2"]
    assert again.instance_count(e.id) == 3 and again.due()[0].id == e.id


def test_retry_backoff_doubles_up_to_the_cap(outbox):
    ex = _exporter(outbox)
    assert [ex.backoff_s(n) for n in range(1, 6)] == [2, 4, 8, 10, 10]


def test_a_failed_attempt_keeps_confirmed_instances_and_schedules_a_retry(outbox, monkeypatch):
    e = outbox.add(1, ["pacs"], "9.9", FILES)[0]

    def two_then_down(files, dest, calling_ae, timeout_s, on_instance_sent, link=None):
        for uid, _ in files[:2]:
            on_instance_sent(uid)
        raise DeliveryError("peer went away")

    monkeypatch.setattr(export, "store_series", two_then_down)
    assert not _exporter(outbox).attempt(e)
    entry = outbox.get(e.id)
    assert entry.state == PENDING and entry.attempts == 1 and entry.next_attempt_at > time.time() + 1
    assert [uid for uid, _ in outbox.unsent(e.id)] == ["1.2.2"]
    assert outbox.due() == []  # not before its time

    sent_now = []
    monkeypatch.setattr(export, "store_series", lambda files, *a, **k: [a[-1](uid) or sent_now.append(uid) for uid, _ in files])
    delivered = []
    assert _exporter(outbox, sent=delivered).attempt(outbox.get(e.id))
    assert sent_now == ["1.2.2"]  # only what was not confirmed
    assert outbox.get(e.id).state == SENT and delivered[0].id == e.id


def test_export_gives_up_after_the_configured_time(outbox, monkeypatch):
    e = outbox.add(1, ["pacs"], "9.9", FILES)[0]

    def down(*a, **k):
        raise DeliveryError("connection refused")

    monkeypatch.setattr(export, "store_series", down)
    gave_up = []
    ex = _exporter(outbox, cfg=ExportConfig(give_up_after_s=0.001), gave_up=gave_up)
    time.sleep(0.01)
    assert not ex.attempt(e)
    assert outbox.get(e.id).state == GAVE_UP and gave_up[0].last_error == "connection refused"


def test_unreachable_destination_is_a_delivery_error_not_a_crash(tmp_path, outbox):
    from appliance.synth.series import axial_geometry
    from tests.helpers import ramp_volume, write_series

    paths = write_series(tmp_path / "d", ramp_volume((1, 8, 8)), axial_geometry((1, 8, 8), 1.0, 1.0))
    e = outbox.add(1, ["pacs"], "9.9", [("1.2.3", paths[0])])[0]
    assert not _exporter(outbox).attempt(e)  # nothing listens on port 1
    assert "no association" in outbox.get(e.id).last_error


def test_an_entry_with_everything_confirmed_is_delivered_without_an_association(outbox):
    e = outbox.add(1, ["pacs"], "9.9", FILES)[0]
    for uid, _ in FILES:  # the process died after the last confirmation, before marking the entry
        outbox.mark_instance_sent(e.id, uid)
    delivered = []
    assert _exporter(outbox, sent=delivered).attempt(e)
    assert outbox.get(e.id).state == SENT and len(delivered) == 1


def test_each_job_has_its_own_folder_so_one_never_deletes_anothers_files(tmp_path, outbox):
    a, b = outbox.folder_for(1, "9.9"), outbox.folder_for(2, "9.9")  # same derived series, two jobs
    for folder in (a, b):
        folder.mkdir(parents=True)
        (folder / "x.dcm").write_bytes(b"x")
    (entry_a,) = outbox.add(1, ["pacs"], "9.9", [("1", a / "x.dcm")])
    outbox.add(2, ["pacs"], "9.9", [("1", b / "x.dcm")])
    outbox.remove_files(entry_a)
    assert not a.exists() and (b / "x.dcm").exists()


def test_every_destination_is_recorded_in_one_transaction(outbox, monkeypatch):
    entries = outbox.add(3, ["console", "pacs"], "9.9", FILES)
    assert [e.destination for e in entries] == ["console", "pacs"]
    assert all(outbox.instance_count(e.id) == 3 for e in entries)
