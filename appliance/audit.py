"""The audit trail: DICOM audit messages (PS3.15 A.5, the IHE ATNA format) for what a hospital's
security office asks about: who sent what to whom, who was turned away, what changed.

Messages (A.5.3):

- **Application Activity** (110100): the appliance started (110120) or stopped (110121);
- **DICOM Instances Transferred** (110104): an association stored instances (action C, one
  message per association with every study in it, source = the sender, destination = the
  appliance), or a derived series reached a destination (action R); refusals among them make the
  outcome a minor failure (4), giving up on a destination a serious one (8);
- **Security Alert** (110113): an association or connection refused (Node Authentication, 110126:
  a calling AE or source address not allowed, a failed TLS handshake, admission limits), a
  configuration that differs from the last start's (Security Configuration, 110129), another
  software version or model (Software Configuration, 110131). Alerts of one kind from one address
  come at most once per ``alert_interval_s``, with the count of the ones folded into it, so a flood
  cannot flood the log.

Each message is one line of XML (no declaration) appended to ``[audit] path`` (default
``<storage.root>/audit/audit.log``; O_APPEND, fsynced; every process of the appliance appends to it)
and, with ``[audit] syslog``, sent as RFC 5424 (MSGID ``IHE+RFC-3881``, facility authpriv) over UDP,
TCP or TLS (octet-counted, RFC 6587/5425) from a thread of its own: a collector that is down never
slows receiving, and the local file stays the record. Patients appear as their Patient ID (the
schema's participant object); their names only with ``include_patient_name``.
"""

from __future__ import annotations

import base64
import collections
import os
import queue
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from appliance.logging import get_logger

log = get_logger(__name__)

# EventID, EventTypeCode, RoleIDCode and ParticipantObjectIDTypeCode values (PS3.16 CID 400-405, DCM)
APPLICATION_ACTIVITY = ("110100", "DCM", "Application Activity")
INSTANCES_TRANSFERRED = ("110104", "DCM", "DICOM Instances Transferred")
SECURITY_ALERT = ("110113", "DCM", "Security Alert")
APPLICATION_START = ("110120", "DCM", "Application Start")
APPLICATION_STOP = ("110121", "DCM", "Application Stop")
NODE_AUTHENTICATION = ("110126", "DCM", "Node Authentication")
SECURITY_CONFIGURATION = ("110129", "DCM", "Security Configuration")
SOFTWARE_CONFIGURATION = ("110131", "DCM", "Software Configuration")
ROLE_APPLICATION = ("110150", "DCM", "Application")
ROLE_DESTINATION = ("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = ("110153", "DCM", "Source Role ID")
STUDY_INSTANCE_UID = ("110180", "DCM", "Study Instance UID")
NODE_ID = ("110182", "DCM", "Node ID")
PATIENT_NUMBER = ("2", "RFC-3881", "Patient Number")

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = "0", "4", "8", "12"
_SYSLOG_PRI = 10 * 8 + 5  # facility authpriv (10), severity notice (5)


@dataclass
class StudyTransfer:
    """What one transfer held of one study."""

    patient_id: str = ""
    patient_name: str = ""
    description: str = ""
    sop_classes: collections.Counter = field(default_factory=collections.Counter)

    @classmethod
    def of(cls, ds) -> StudyTransfer:
        """The study's participant details from one of its instances' headers."""
        return cls(patient_id=str(ds.get("PatientID", "") or ""), patient_name=str(ds.get("PatientName", "") or ""),
                   description=str(ds.get("StudyDescription", "") or ""))

    def add(self, sop_class: str, n: int = 1) -> None:
        self.sop_classes[sop_class] += n


@dataclass(frozen=True)
class Node:
    """A participant: an AE title at a network address."""

    ae_title: str
    address: str | None = None
    requestor: bool = False


def _coded(parent: ET.Element, tag: str, code: tuple[str, str, str]) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": code[1], "originalText": code[2]})


def _token(value: str) -> str:
    """An xsd:token: no leading, trailing or repeated whitespace."""
    return " ".join(str(value).split())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _address_type(address: str) -> str:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
        return "2"  # IP address
    except OSError:
        return "1"  # machine name


class AuditTrail:
    """Builds, appends and forwards audit messages. One per process; thread-safe."""

    def __init__(self, cfg, ae_title: str, default_root: Path) -> None:
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.ae_title = ae_title
        self.host = socket.gethostname()
        self.source_id = cfg.source_id or f"{ae_title}@{self.host}"
        self.path = Path(cfg.path or default_root / "audit" / "audit.log")
        self._lock = threading.Lock()
        # (kind, fold key) -> [when last written, alerts folded since, the last folded one's arguments]
        self._alerts: dict[tuple, list] = {}
        self._syslog: _SyslogSender | None = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            if cfg.syslog:
                self._syslog = _SyslogSender(cfg.syslog, cfg.syslog_ca_bundle, self.host)

    # ---- messages ------------------------------------------------------------------------------
    def application(self, started: bool, outcome: str = SUCCESS, description: str = "") -> None:
        msg = self._message(APPLICATION_ACTIVITY, "E", outcome, description,
                            [APPLICATION_START if started else APPLICATION_STOP])
        self._participant(msg, Node(self.ae_title, self.host), ROLE_APPLICATION, alternative=f"pid={os.getpid()}")
        self._source(msg)
        self._emit(msg)

    def instances_transferred(self, action: str, source: Node, destination: Node,
                              studies: dict[str, StudyTransfer], outcome: str = SUCCESS,
                              description: str = "") -> None:
        msg = self._message(INSTANCES_TRANSFERRED, action, outcome, description)
        self._participant(msg, source, ROLE_SOURCE)
        self._participant(msg, destination, ROLE_DESTINATION)
        self._source(msg)
        patients: dict[str, str] = {}
        for study_uid, study in sorted(studies.items()):
            obj = self._object(msg, study_uid, "2", "3", STUDY_INSTANCE_UID, study.description or study_uid)
            desc = ET.SubElement(obj, "ParticipantObjectDescription")
            for sop_class, n in sorted(study.sop_classes.items()):
                ET.SubElement(desc, "SOPClass", {"UID": sop_class, "NumberOfInstances": str(n)})
            patients.setdefault(study.patient_id, study.patient_name)
        for patient_id, name in sorted(patients.items()):
            shown = name if (self.cfg.include_patient_name and name) else patient_id
            self._object(msg, patient_id or "(none)", "1", "1", PATIENT_NUMBER, shown or "(none)")
        self._emit(msg)

    def security_alert(self, kind: tuple[str, str, str], outcome: str, subject: str, detail: str,
                       peer: Node | None = None, fold_key: str | None = None) -> None:
        """``fold_key``: alerts with the same kind and key within ``alert_interval_s`` are counted
        into the next one instead of written."""
        folded = 0
        if fold_key is not None:
            key, now = (kind[0], fold_key), time.monotonic()
            with self._lock:
                state = self._alerts.get(key)
                if state is not None and now - state[0] < self.cfg.alert_interval_s:
                    state[1] += 1
                    state[2] = (kind, outcome, subject, detail, peer)
                    return
                folded = state[1] if state else 0
                self._alerts[key] = [now, 0, None]
        msg = self._message(SECURITY_ALERT, "E", outcome, detail + (f" ({folded} more like it since the last "
                                                                     "alert)" if folded else ""), [kind])
        self._participant(msg, Node(self.ae_title, self.host), ROLE_APPLICATION)
        if peer is not None:
            self._participant(msg, peer, None)
        self._source(msg)
        obj = self._object(msg, subject, "2", "13", NODE_ID, subject)
        ET.SubElement(obj, "ParticipantObjectDetail", {"type": "Alert Description",
                                                      "value": base64.b64encode(detail.encode()).decode()})
        self._emit(msg)

    # ---- building ------------------------------------------------------------------------------
    def _message(self, event: tuple, action: str, outcome: str, description: str,
                 types: list[tuple] = ()) -> ET.Element:
        msg = ET.Element("AuditMessage")
        ident = ET.SubElement(msg, "EventIdentification", {"EventActionCode": action, "EventDateTime": _now(),
                                                           "EventOutcomeIndicator": outcome})
        _coded(ident, "EventID", event)
        for t in types:
            _coded(ident, "EventTypeCode", t)
        if description:
            ET.SubElement(ident, "EventOutcomeDescription").text = description[:1024]
        return msg

    def _participant(self, msg: ET.Element, node: Node, role: tuple | None, alternative: str | None = None) -> None:
        attrs = {"UserID": node.ae_title or "(unknown)", "UserIsRequestor": "true" if node.requestor else "false"}
        if alternative:
            attrs["AlternativeUserID"] = alternative
        if node.address:
            attrs["NetworkAccessPointID"] = _token(node.address)
            attrs["NetworkAccessPointTypeCode"] = _address_type(node.address)
        el = ET.SubElement(msg, "ActiveParticipant", attrs)
        if role is not None:
            _coded(el, "RoleIDCode", role)

    def _source(self, msg: ET.Element) -> None:
        attrs = {"AuditSourceID": self.source_id}
        if self.cfg.site_id:
            attrs = {"AuditEnterpriseSiteID": self.cfg.site_id, **attrs}
        src = ET.SubElement(msg, "AuditSourceIdentification", attrs)
        ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": "4"})  # application server process

    @staticmethod
    def _object(msg: ET.Element, object_id: str, type_code: str, role: str, id_type: tuple, name: str) -> ET.Element:
        obj = ET.SubElement(msg, "ParticipantObjectIdentification", {
            "ParticipantObjectID": _token(object_id), "ParticipantObjectTypeCode": type_code,
            "ParticipantObjectTypeCodeRole": role})
        _coded(obj, "ParticipantObjectIDTypeCode", id_type)
        ET.SubElement(obj, "ParticipantObjectName").text = _token(name)
        return obj

    def _emit(self, msg: ET.Element) -> None:
        if not self.enabled:
            return
        line = ET.tostring(msg, encoding="unicode").replace("\n", "&#10;") + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line.encode("utf-8"))  # one write: lines from several processes never interleave
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk must not stop the appliance; the journal says so
            log.error("audit.write_failed", path=str(self.path), error=str(exc))
        if self._syslog is not None:
            self._syslog.send(line.rstrip("\n"))

    def close(self) -> None:
        """Write what is still folded (so no refusal goes unrecorded), then stop forwarding."""
        with self._lock:
            pending = [state[2] + (state[1],) for state in self._alerts.values() if state[1] and state[2]]
            self._alerts.clear()
        for kind, outcome, subject, detail, peer, folded in pending:
            self.security_alert(kind, outcome, subject, f"{detail} ({folded} like it since the last alert)", peer)
        if self._syslog is not None:
            self._syslog.close()


class _SyslogSender(threading.Thread):
    """RFC 5424 messages to a collector: ``udp://host:514``, ``tcp://host:601``, ``tls://host:6514``."""

    def __init__(self, url: str, ca_bundle: Path | None, host: str) -> None:
        super().__init__(name="audit-syslog", daemon=True)
        parts = urlsplit(url)
        self.scheme, self.target = parts.scheme, (parts.hostname, parts.port or {"udp": 514, "tcp": 601}.get(
            parts.scheme, 6514))
        self.ca_bundle, self.host = ca_bundle, host
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=10000)
        self._sock = None
        self.dropped = 0
        self.start()

    def send(self, xml: str) -> None:
        try:
            self._queue.put_nowait(xml)
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        self._queue.put(None)
        self.join(5)

    def _frame(self, xml: str) -> bytes:
        ts = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        body = f"<{_SYSLOG_PRI}>1 {ts} {self.host} appliance {os.getpid()} IHE+RFC-3881 - ".encode() + \
            b"\xef\xbb\xbf" + xml.encode("utf-8")
        return body if self.scheme == "udp" else str(len(body)).encode() + b" " + body

    def _connect(self):
        if self.scheme == "udp":
            return socket.socket(socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET, socket.SOCK_DGRAM)
        sock = socket.create_connection(self.target, timeout=10)
        if self.scheme == "tls":
            ctx = ssl.create_default_context(cafile=str(self.ca_bundle) if self.ca_bundle else None)
            sock = ctx.wrap_socket(sock, server_hostname=self.target[0])
        return sock

    def run(self) -> None:
        backoff = 1.0
        while True:
            xml = self._queue.get()
            if xml is None:
                break
            data = self._frame(xml)
            while True:
                try:
                    if self._sock is None:
                        self._sock = self._connect()
                    if self.scheme == "udp":
                        self._sock.sendto(data, self.target)
                    else:
                        self._sock.sendall(data)
                    backoff = 1.0
                    break
                except OSError as exc:
                    log.warning("audit.syslog_failed", target=f"{self.scheme}://{self.target[0]}:{self.target[1]}",
                                error=str(exc), retry_in_s=backoff)
                    if self._sock is not None:
                        self._sock.close()
                        self._sock = None
                    time.sleep(backoff)
                    backoff = min(60.0, backoff * 2)
        if self._sock is not None:
            self._sock.close()


