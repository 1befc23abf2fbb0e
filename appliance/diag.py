"""``appliance diag``: a diagnostic bundle a field engineer can send to the vendor, without patient data.

One ``.tar.gz`` holding:

    README.txt         what is in it and what was taken out
    system.json        versions (appliance, Python packages, OS), uptime, disk and memory, the booted slot
    config.toml        the configuration in effect (`appliance config show`)
    state.json         the spool, jobs and outbox as counts by state and the last failures' reasons
    models.txt         `appliance models list`; models-audit.jsonl: the model store's audit trail
    slots-audit.jsonl  the image's install / trial / commit / rollback log, when on an image
    image-build.json   the slot's version and bill of materials (Debian packages, wheels), on an image
    logs/*.log         the appliance's journal (or the log files named with --log)

What is taken out: nothing in it is read from a DICOM file. Log lines and audit records pass a
scrubber: values of keys that name patient attributes are removed, words in DICOM person-name form
(``FAMILY^GIVEN``) are removed, and every DICOM UID (study, series, instance: five or more
dot-separated numbers, in a value or inside a path) becomes ``uid:`` and 12 hex digits of a keyed
hash whose key is made for this bundle and not kept: the same UID gives the same token within a
bundle, so one series can be followed through the logs, but the token cannot be traced back to
the hospital's records, nor matched across two bundles.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import platform
import re
import shutil
import socket
import sqlite3
import subprocess
import tarfile
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from appliance import __version__
from appliance.config import ApplianceConfig, to_toml

# A DICOM UID: digits and dots, five or more components (an IPv4 address has four, a version three).
UID = re.compile(r"(?<![\w.])[0-9]+(?:\.[0-9]+){4,}(?![\w.])")
# A person name in DICOM form: FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX (a caret between name parts).
PERSON_NAME = re.compile(r"[^\s\"',;:=\[\]{}()<>/\\]*\^[^\s\"',;:=\[\]{}()<>/\\]*")
PATIENT_KEYS = re.compile(r"patient|birth|accession|physician|operator_name|institution|other_patient", re.I)
IMAGE_FILES = {"slots-audit.jsonl": Path("/data/audit/slots.jsonl"),
               "image-build.json": Path("/usr/lib/appliance-image/build.json")}
PACKAGES = ("appliance", "numpy", "pydicom", "pynetdicom", "pyzmq", "pydantic", "structlog", "onnxruntime",
            "tensorrt", "tensorrt_rtx", "pycuda")
UNITS = ("appliance.service", "appliance-slot-check.service", "appliance-update@*.service", "rauc.service")


class Scrubber:
    """Removes patient data from text and JSON; UIDs become keyed-hash tokens (the key dies with it)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or os.urandom(32)
        self.uids = 0
        self.names = 0
        self.values = 0

    def _uid(self, match: re.Match) -> str:
        self.uids += 1
        return "uid:" + hmac.new(self._key, match.group(0).encode(), hashlib.sha256).hexdigest()[:12]

    def text(self, s: str) -> str:
        s = UID.sub(self._uid, s)
        s, n = PERSON_NAME.subn("[name removed]", s)
        self.names += n
        return s

    def value(self, key: str, v):
        if isinstance(key, str) and PATIENT_KEYS.search(key) and v not in (None, ""):
            self.values += 1
            return "[removed]"
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, dict):
            return {k: self.value(k, x) for k, x in v.items()}
        if isinstance(v, list):
            return [self.value(key, x) for x in v]
        return v

    def line(self, line: str) -> str:
        """One log or audit line: JSON objects field by field, anything else as text."""
        stripped = line.strip()
        if stripped.startswith("{"):
            try:
                obj = json.loads(stripped)
            except ValueError:
                return self.text(line)
            if isinstance(obj, dict):
                return json.dumps({k: self.value(k, v) for k, v in obj.items()}, sort_keys=True)
        return self.text(line)

    def lines(self, lines: Iterable[str]) -> str:
        return "".join(self.line(line.rstrip("\n")) + "\n" for line in lines)


def _run(cmd: list[str], timeout: float = 30.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def system_info(cfg: ApplianceConfig) -> dict:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    root = cfg.storage.root
    disk = None
    if root.exists():
        st = os.statvfs(root)
        disk = {"path": str(root), "total_bytes": st.f_blocks * st.f_frsize, "free_bytes": st.f_bavail * st.f_frsize}
    meminfo = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            if k in ("MemTotal", "MemAvailable"):
                meminfo[k] = v.strip()
    except OSError:
        pass
    try:
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        uptime_s = None
    os_release = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                os_release[k] = v.strip('"')
    except OSError:
        pass
    cmdline = Path("/proc/cmdline").read_text().split() if Path("/proc/cmdline").exists() else []
    slot = next((a.split("=", 1)[1] for a in cmdline if a.startswith("rauc.slot=")), None)
    return {"collected_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "appliance": __version__,
            "packages": {p: version(p) for p in PACKAGES}, "python": platform.python_version(),
            "machine": platform.machine(), "kernel": platform.release(), "hostname": socket.gethostname(),
            "os": {k: os_release.get(k) for k in ("PRETTY_NAME", "VERSION_ID")}, "uptime_s": uptime_s,
            "memory": meminfo, "disk": disk, "booted_slot": slot, "cpus": os.cpu_count()}


def _query(db: Path, sql: str) -> list[tuple]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def state_summary(root: Path, scrub: Scrubber) -> dict:
    """Counts by state, and the reasons of the last failures and refusals (scrubbed): no UIDs, no headers."""
    index, jobs, outbox = root / "index.sqlite", root / "jobs.sqlite", root / "outbox.sqlite"
    return {
        "series_by_state": dict(_query(index, "SELECT state, count(*) FROM series GROUP BY state")),
        "series_by_modality": dict(_query(index, "SELECT coalesce(modality, ''), count(*) FROM series GROUP BY 1")),
        "instances": dict(_query(index, "SELECT 'count', count(*) FROM instances UNION ALL "
                                        "SELECT 'bytes', coalesce(sum(size), 0) FROM instances")),
        "refused_by_reason": dict(_query(index, "SELECT reason, count(*) FROM refused GROUP BY reason")),
        "last_refusals": [{"received_at": t, "reason": r, "detail": scrub.text(d or ""), "calling_ae": ae}
                          for t, r, d, ae in _query(index, "SELECT received_at, reason, detail, calling_ae "
                                                           "FROM refused ORDER BY id DESC LIMIT 20")],
        "jobs_by_state": dict(_query(jobs, "SELECT state, count(*) FROM jobs GROUP BY state")),
        "jobs_by_pipeline": dict(_query(jobs, "SELECT pipeline, count(*) FROM jobs GROUP BY pipeline")),
        "last_job_failures": [{"job_id": i, "pipeline": p, "reason": r, "detail": scrub.text(d or ""),
                               "attempts": a, "finished_at": f}
                              for i, p, r, d, a, f in _query(jobs, "SELECT id, pipeline, reason, detail, attempts, "
                                                                   "finished_at FROM jobs WHERE reason IS NOT NULL "
                                                                   "ORDER BY id DESC LIMIT 20")],
        "outbox_by_state": {f"{d}/{s}": n for d, s, n in
                            _query(outbox, "SELECT destination, state, count(*) FROM outbox GROUP BY 1, 2")},
        "last_export_errors": [{"destination": d, "attempts": a, "error": scrub.text(e or "")}
                               for d, a, e in _query(outbox, "SELECT destination, attempts, last_error FROM outbox "
                                                             "WHERE last_error IS NOT NULL ORDER BY id DESC LIMIT 20")],
    }


def journal(since: str) -> list[str] | None:
    """The appliance's units' journal as JSON lines (None where there is no journal)."""
    cmd = ["journalctl", "--no-pager", "-o", "json", "--since", since, "--output-fields",
           "__REALTIME_TIMESTAMP,_SYSTEMD_UNIT,SYSLOG_IDENTIFIER,PRIORITY,MESSAGE"]
    for unit in UNITS:
        cmd += ["-u", unit]
    out = _run(cmd, timeout=120.0)
    if out is None:
        return None
    lines = []
    for raw in out.splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        message = entry.get("MESSAGE")
        if isinstance(message, list):  # journald gives bytes it cannot decode as a list of ints
            message = bytes(message).decode("utf-8", "replace")
        stamp = int(entry.get("__REALTIME_TIMESTAMP", 0)) / 1e6
        lines.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(stamp))}Z "
                     f"{entry.get('_SYSTEMD_UNIT') or entry.get('SYSLOG_IDENTIFIER', '')}: {message}")
    return lines


def collect(cfg: ApplianceConfig, out: Path, logs: list[Path] | None = None, use_journal: bool = True,
            since: str = "-7d", image_files: dict[str, Path] | None = None) -> tuple[Path, dict]:
    """Write the bundle to ``out`` (a .tar.gz); returns its path and what was scrubbed."""
    scrub = Scrubber()
    files: dict[str, bytes] = {}
    notes: list[str] = []

    def add(name: str, text: str) -> None:
        files[name] = text.encode("utf-8")

    add("system.json", json.dumps(system_info(cfg), indent=1, sort_keys=True) + "\n")
    add("config.toml", scrub.text(to_toml(cfg)))
    add("state.json", json.dumps(state_summary(cfg.storage.root, scrub), indent=1, sort_keys=True) + "\n")
    store = cfg.model_store()
    try:
        rows = store.rows()
        add("models.txt", "".join(f"{'*' if r.active else ' '} {r.name} {r.version} sha256 {r.sha256} "
                                  f"{r.installed_at or ''} {r.signer or ''}\n" for r in rows))
    except Exception as exc:
        notes.append(f"models: {exc}")
    audit = store.root / "audit.jsonl"
    if audit.exists():
        add("models-audit.jsonl", scrub.lines(audit.read_text(encoding="utf-8", errors="replace").splitlines()))
    for name, path in (IMAGE_FILES if image_files is None else image_files).items():
        if path.exists():
            text = path.read_text(encoding="utf-8", errors="replace")
            add(name, scrub.lines(text.splitlines()) if name.endswith(".jsonl") else text)
    rauc = _run(["rauc", "status", "--output-format=json"])
    if rauc is not None:
        add("rauc-status.json", rauc)
    if use_journal:
        lines = journal(since)
        if lines is None:
            notes.append("no journal here (journalctl missing or not readable): logs/ holds only --log files")
        else:
            add("logs/journal.log", scrub.lines(lines))
    for i, path in enumerate(logs or []):
        try:
            add(f"logs/{i:02d}-{path.name}", scrub.lines(path.read_text(encoding="utf-8", errors="replace")
                                                         .splitlines()))
        except OSError as exc:
            notes.append(f"{path}: {exc}")
    removed = {"uids_tokenised": scrub.uids, "person_names_removed": scrub.names,
               "patient_values_removed": scrub.values}
    readme = (__doc__.split("\n\n", 1)[1] + "\nThis bundle: " + json.dumps(removed) + "\n"
              + "".join(f"note: {n}\n" for n in notes))
    files = {"README.txt": readme.encode("utf-8"), **files}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    top = out.name.removesuffix(".tar.gz")
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            tar.addfile(info, io.BytesIO(data))
    os.chmod(tmp, 0o600)
    os.replace(tmp, out)
    return out, {**removed, "files": sorted(files), "notes": notes}


def default_name() -> str:
    return f"appliance-diag-{socket.gethostname()}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.tar.gz"
