"""The audit trail (issue 14 item 5) for a full study through the daemon, every message checked
against the PS3.15 audit schema (`tests.audit_schema`); refusals and changes as Security Alerts;
the syslog forwarding in RFC 5424; and no patient name, ID or birth date in the operational logs or
the events."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from appliance.events_tail import Subscription
from appliance.synth.study import write_synthetic_ct
from tests import audit_schema
from tests.helpers import free_port
from tests.integration.peers import daemon_with_console, require_dcmtk, storescu

pytestmark = pytest.mark.integration

PATIENT = {"PatientName": "ZZSECRET^WILHELMINA^Q", "PatientID": "PID-8472-XQ", "PatientBirthDate": "19430219"}


@pytest.fixture(autouse=True)
def _dcmtk_installed():
    require_dcmtk()


def _study_with_patient(tmp_path: Path, n: int = 8):
    study = write_synthetic_ct(tmp_path / "study", shape_zyx=(n, 64, 64), dose_fraction=0.25, seed=9)
    for path in study.paths:
        ds = pydicom.dcmread(path)
        for k, v in PATIENT.items():
            setattr(ds, k, v)
        ds.save_as(path, enforce_file_format=True)
    return study


def _messages(path: Path) -> list:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [audit_schema.check_message(line) for line in lines]


def _event_code(root) -> str:
    return audit_schema.code(root.find("EventIdentification/EventID"))


class _Collector(threading.Thread):
    """A syslog collector on UDP: what arrives."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port, self.got, self.stop = self.sock.getsockname()[1], [], threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.got.append(self.sock.recv(65536))
            except TimeoutError:
                continue


def test_a_full_study_leaves_a_valid_audit_trail_and_no_patient_in_the_logs(tmp_path, cfg):
    cfg.export.retry_initial_s = 0.5
    cfg.events.endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg.events.health_interval_s = 0.2
    collector = _Collector()
    cfg.audit.syslog = f"udp://127.0.0.1:{collector.port}"
    cfg.peers.allowed_calling_ae_titles = ["CONSOLE", "READY_PROBE"]
    study = _study_with_patient(tmp_path)
    with daemon_with_console(cfg, tmp_path) as (daemon, peer):
        peer.start()
        daemon.start()
        sub = Subscription(daemon.cfg.events.endpoint)
        try:
            assert sub.wait_for("health", 20)
            assert storescu(cfg.node.port, study.paths).returncode == 0
            peer.wait_for(len(study.paths))
            assert sub.wait_for("export.done", 30)
            for _ in range(5):  # a stranger's AE title, five times: one alert
                ae = AE(ae_title="INTRUDER")
                ae.add_requested_context(Verification)
                assert ae.associate("127.0.0.1", cfg.node.port).is_rejected
        finally:
            sub.close()
        assert daemon.terminate() == 0
    collector.stop.set()

    trail = cfg.storage.root / "audit" / "audit.log"
    messages = _messages(trail)
    by_code: dict[str, list] = {}
    for m in messages:
        by_code.setdefault(_event_code(m), []).append(m)
    # application start and stop
    starts = [m for m in by_code["110100"] if audit_schema.code(m.find("EventIdentification/EventTypeCode")) == "110120"]
    stops = [m for m in by_code["110100"] if audit_schema.code(m.find("EventIdentification/EventTypeCode")) == "110121"]
    assert len(starts) == 1 and len(stops) == 1
    for m in by_code["110100"]:
        audit_schema.check_application_activity(m)
    # instances received (C, from the sender) and exported (R, to the console)
    transfers = by_code["110104"]
    for m in transfers:
        audit_schema.check_instances_transferred(m)
    received = [m for m in transfers if m.find("EventIdentification").get("EventActionCode") == "C"
                and any(ap.get("UserID") == "CONSOLE" and ap.get("UserIsRequestor") == "true"
                        for ap in m.findall("ActiveParticipant"))]
    assert received, "no Instances Transferred (C) from the sender"
    counts = [int(s.get("NumberOfInstances")) for m in received
              for o in m.findall("ParticipantObjectIdentification") if o.get("ParticipantObjectID") == study.study_uid
              for s in o.findall("ParticipantObjectDescription/SOPClass")]
    assert sum(counts) == len(study.paths)
    exported = [m for m in transfers if m.find("EventIdentification").get("EventActionCode") == "R"]
    assert exported and all(m.find("EventIdentification").get("EventOutcomeIndicator") == "0" for m in exported)
    assert any(ap.get("UserID") == "CONSOLE" for m in exported for ap in m.findall("ActiveParticipant"))
    patients = {o.get("ParticipantObjectID") for m in transfers for o in m.findall("ParticipantObjectIdentification")
                if o.get("ParticipantObjectTypeCodeRole") == "1"}
    assert patients == {PATIENT["PatientID"]}
    # the stranger: one Node Authentication alert at once, the other four folded into one at stop
    alerts = [m for m in by_code.get("110113", []) if "INTRUDER" in ET_tostring(m)]
    assert len(alerts) == 2
    for alert in alerts:
        audit_schema.check_security_alert(alert)
        assert audit_schema.code(alert.find("EventIdentification/EventTypeCode")) == "110126"
    assert "(4 like it since the last alert)" in ET_tostring(alerts[1])
    assert "ZZSECRET" not in trail.read_text()  # patient names only with include_patient_name

    # syslog: the same messages, RFC 5424 framed
    assert len(collector.got) == len(messages)
    for datagram in collector.got:
        head, _, xml = datagram.partition(b"\xef\xbb\xbf")
        fields = head.decode().split(" ")
        assert fields[0] == "<85>1" and fields[3] == "appliance" and fields[5] == "IHE+RFC-3881", head
        audit_schema.check_message(xml.decode("utf-8"))

    # the operational logs and the events: no patient name, ID or birth date
    text = "\n".join(json.dumps(line) for line in daemon.logs())
    text += "\n".join(e.model_dump_json() for e in sub.events)
    assert sub.events
    for value in [PATIENT["PatientID"], PATIENT["PatientBirthDate"], "ZZSECRET", "WILHELMINA"]:
        assert value not in text, value


def ET_tostring(el) -> str:  # noqa: N802
    import xml.etree.ElementTree as ET

    return ET.tostring(el, encoding="unicode")


def test_a_configuration_change_is_a_security_alert_at_the_next_start(tmp_path, cfg):
    cfg.routes = []
    from tests.integration.daemon_process import DaemonProcess

    d = DaemonProcess(cfg, tmp_path / "daemon").start()
    assert d.terminate() == 0
    d.start()  # same configuration: no alert
    assert d.terminate() == 0
    cfg.node.max_associations = 7
    d.start()
    assert d.terminate() == 0
    alerts = [m for m in _messages(cfg.storage.root / "audit" / "audit.log") if _event_code(m) == "110113"]
    assert [audit_schema.code(m.find("EventIdentification/EventTypeCode")) for m in alerts] == ["110129"]
