"""A checker for the DICOM audit message schema (PS3.15 A.5.1, RELAX NG compact), written out
element by element, and the per-message requirements of A.5.3 for the messages the appliance
sends. Raises AssertionError naming what is wrong. (No RELAX NG library is a dependency; the
schema is small enough to state here.)"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET

_DATETIME = re.compile(r"^-?\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?$")
_TOKEN = re.compile(r"^\S*( \S+)*$")  # xsd:token: no leading, trailing or double spaces, no tabs/newlines


def _fail(path: str, why: str) -> None:
    raise AssertionError(f"{path}: {why}")


def _attrs(el: ET.Element, path: str, required: set[str], optional: set[str] = frozenset()) -> None:
    missing = required - set(el.attrib)
    extra = set(el.attrib) - required - optional
    if missing:
        _fail(path, f"missing attribute(s) {sorted(missing)}")
    if extra:
        _fail(path, f"attribute(s) the schema does not allow {sorted(extra)}")


def _token(value: str, path: str) -> None:
    if not _TOKEN.match(value) or "\t" in value or "\n" in value:
        _fail(path, f"not an xsd:token: {value!r}")


def _coded(el: ET.Element, path: str) -> None:
    """CodedValueType: csd-code, codeSystemName, originalText, optional displayName; no children."""
    _attrs(el, path, {"csd-code", "codeSystemName", "originalText"}, {"displayName"})
    for k, v in el.attrib.items():
        _token(v, f"{path}@{k}")
    if len(el):
        _fail(path, "a coded value has no child elements")


def _order(el: ET.Element, path: str, spec: list[tuple[str, int, int | None]]) -> dict[str, list[ET.Element]]:
    """Children in the order ``spec`` gives (name, min, max), nothing else."""
    out: dict[str, list[ET.Element]] = {name: [] for name, _, _ in spec}
    i, kids = 0, list(el)
    for name, lo, hi in spec:
        while i < len(kids) and kids[i].tag == name:
            out[name].append(kids[i])
            i += 1
        if len(out[name]) < lo:
            _fail(path, f"needs {lo} {name} (in schema order), has {len(out[name])}")
        if hi is not None and len(out[name]) > hi:
            _fail(path, f"at most {hi} {name}, has {len(out[name])}")
    if i < len(kids):
        _fail(path, f"unexpected or misplaced <{kids[i].tag}>")
    return out


def check_message(xml: str) -> ET.Element:
    """Validate one audit message against the schema; returns its root."""
    root = ET.fromstring(xml)
    if root.tag != "AuditMessage" or root.attrib:
        _fail("/", "the root is <AuditMessage> without attributes")
    parts = _order(root, "AuditMessage", [("EventIdentification", 1, 1), ("ActiveParticipant", 1, None),
                                          ("AuditSourceIdentification", 1, 1),
                                          ("ParticipantObjectIdentification", 0, None)])
    ev = parts["EventIdentification"][0]
    _attrs(ev, "EventIdentification", {"EventDateTime", "EventOutcomeIndicator"}, {"EventActionCode"})
    if ev.get("EventActionCode") not in (None, "C", "R", "U", "D", "E"):
        _fail("EventIdentification@EventActionCode", ev.get("EventActionCode"))
    if not _DATETIME.match(ev.get("EventDateTime")):
        _fail("EventIdentification@EventDateTime", f"not xsd:dateTime: {ev.get('EventDateTime')}")
    if ev.get("EventOutcomeIndicator") not in ("0", "4", "8", "12"):
        _fail("EventIdentification@EventOutcomeIndicator", ev.get("EventOutcomeIndicator"))
    kids = _order(ev, "EventIdentification", [("EventID", 1, 1), ("EventTypeCode", 0, None),
                                              ("EventOutcomeDescription", 0, 1)])
    for k in kids["EventID"] + kids["EventTypeCode"]:
        _coded(k, f"EventIdentification/{k.tag}")
    for k, ap in enumerate(parts["ActiveParticipant"]):
        p = f"ActiveParticipant[{k}]"
        _attrs(ap, p, {"UserID", "UserIsRequestor"}, {"AlternativeUserID", "UserName", "NetworkAccessPointID",
                                                     "NetworkAccessPointTypeCode"})
        if ap.get("UserIsRequestor") not in ("true", "false", "1", "0"):
            _fail(f"{p}@UserIsRequestor", ap.get("UserIsRequestor"))
        if ap.get("NetworkAccessPointTypeCode") not in (None, "1", "2", "3", "4", "5"):
            _fail(f"{p}@NetworkAccessPointTypeCode", ap.get("NetworkAccessPointTypeCode"))
        if "NetworkAccessPointID" in ap.attrib:
            _token(ap.get("NetworkAccessPointID"), f"{p}@NetworkAccessPointID")
        roles = _order(ap, p, [("RoleIDCode", 0, None), ("MediaIdentifier", 0, 1)])
        for r in roles["RoleIDCode"]:
            _coded(r, f"{p}/RoleIDCode")
    src = parts["AuditSourceIdentification"][0]
    _attrs(src, "AuditSourceIdentification", {"AuditSourceID"}, {"AuditEnterpriseSiteID"})
    for t in _order(src, "AuditSourceIdentification", [("AuditSourceTypeCode", 0, None)])["AuditSourceTypeCode"]:
        if "codeSystemName" in t.attrib or "originalText" in t.attrib:
            _coded(t, "AuditSourceTypeCode")
        else:
            _attrs(t, "AuditSourceTypeCode", {"csd-code"})
            if t.get("csd-code") not in [str(i) for i in range(1, 10)]:
                _fail("AuditSourceTypeCode@csd-code", "1..9, or a code with its codeSystemName")
    for k, obj in enumerate(parts["ParticipantObjectIdentification"]):
        p = f"ParticipantObjectIdentification[{k}]"
        _attrs(obj, p, {"ParticipantObjectID"}, {"ParticipantObjectTypeCode", "ParticipantObjectTypeCodeRole",
                                                 "ParticipantObjectDataLifeCycle", "ParticipantObjectSensitivity"})
        _token(obj.get("ParticipantObjectID"), f"{p}@ParticipantObjectID")
        if obj.get("ParticipantObjectTypeCode") not in (None, "1", "2", "3", "4"):
            _fail(f"{p}@ParticipantObjectTypeCode", obj.get("ParticipantObjectTypeCode"))
        if obj.get("ParticipantObjectTypeCodeRole") not in [None, *map(str, range(1, 27))]:
            _fail(f"{p}@ParticipantObjectTypeCodeRole", obj.get("ParticipantObjectTypeCodeRole"))
        names = [c for c in obj if c.tag in ("ParticipantObjectName", "ParticipantObjectQuery")]
        spec = [("ParticipantObjectIDTypeCode", 1, 1), (names[0].tag if names else "ParticipantObjectName", 1, 1),
                ("ParticipantObjectDetail", 0, None), ("ParticipantObjectDescription", 0, None)]
        # The schema's text in PS3.15 A.5.1.1 makes the name (or query) a required choice: always given.
        got = _order(obj, p, spec)
        _coded(got["ParticipantObjectIDTypeCode"][0], f"{p}/ParticipantObjectIDTypeCode")
        for n in got.get("ParticipantObjectName", []):
            _token(n.text or "", f"{p}/ParticipantObjectName")
        for d in got["ParticipantObjectDetail"]:
            _attrs(d, f"{p}/ParticipantObjectDetail", {"type", "value"})
            base64.b64decode(d.get("value"), validate=True)
        for desc in got["ParticipantObjectDescription"]:
            for sop in desc:
                if sop.tag not in ("MPPS", "Accession", "SOPClass", "ParticipantObjectContainsStudy",
                                   "Encrypted", "Anonymized"):
                    _fail(f"{p}/ParticipantObjectDescription", f"<{sop.tag}> is not in the schema")
                if sop.tag == "SOPClass":
                    _attrs(sop, f"{p}/SOPClass", {"NumberOfInstances"}, {"UID"})
                    int(sop.get("NumberOfInstances"))
    return root


def code(el: ET.Element | None) -> str | None:
    return None if el is None else el.get("csd-code")


def check_instances_transferred(root: ET.Element) -> None:
    """A.5.3.10: the source and destination participants, one requestor, each study with its SOP
    classes, the patient."""
    ev = root.find("EventIdentification")
    assert code(ev.find("EventID")) == "110104"
    assert ev.get("EventActionCode") in ("C", "R", "U")
    roles = {code(ap.find("RoleIDCode")): ap for ap in root.findall("ActiveParticipant")}
    assert "110153" in roles and "110152" in roles, "Source Role ID and Destination Role ID participants"
    assert sum(ap.get("UserIsRequestor") == "true" for ap in root.findall("ActiveParticipant")) == 1
    objects = root.findall("ParticipantObjectIdentification")
    studies = [o for o in objects if code(o.find("ParticipantObjectIDTypeCode")) == "110180"]
    patients = [o for o in objects if o.get("ParticipantObjectTypeCodeRole") == "1"]
    assert studies and len(patients) == 1
    for s in studies:
        assert (s.get("ParticipantObjectTypeCode"), s.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
        assert s.findall("ParticipantObjectDescription/SOPClass")
    assert patients[0].get("ParticipantObjectTypeCode") == "1"
    assert code(patients[0].find("ParticipantObjectIDTypeCode")) == "2"


def check_application_activity(root: ET.Element) -> None:
    """A.5.3.1: an Application Start or Stop, the application as a participant."""
    ev = root.find("EventIdentification")
    assert code(ev.find("EventID")) == "110100" and ev.get("EventActionCode") == "E"
    assert code(ev.find("EventTypeCode")) in ("110120", "110121")
    assert any(code(ap.find("RoleIDCode")) == "110150" for ap in root.findall("ActiveParticipant"))


def check_security_alert(root: ET.Element) -> None:
    """A.5.3.11: the alert's type, the reporting application, the alert subject."""
    ev = root.find("EventIdentification")
    assert code(ev.find("EventID")) == "110113" and ev.get("EventActionCode") == "E"
    assert code(ev.find("EventTypeCode")) is not None
    assert root.findall("ParticipantObjectIdentification")
