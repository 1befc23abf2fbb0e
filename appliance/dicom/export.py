"""Export: the persistent outbox and the C-STORE SCU that empties it.

A derived series is written to disk first (``outbox/<derived series uid>/``), then one outbox
entry per destination is recorded with every instance it must deliver. The exporter sends each
entry on one association, marks every instance delivered as soon as the peer's success status
arrives (so a restart re-sends only what was not confirmed), and retries with exponential
backoff until ``give_up_after_s``. Transfer syntax: each instance is offered in Explicit and
Implicit VR Little Endian and pynetdicom encodes it in the one the peer accepts.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from appliance.background import BackgroundLoop
from appliance.config import Destination, ExportConfig
from appliance.db import Store
from appliance.logging import get_logger

log = get_logger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    derived_series_uid TEXT NOT NULL,
    folder TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    sent_at REAL,
    seconds REAL,
    last_error TEXT,
    UNIQUE (job_id, destination)
);
CREATE TABLE IF NOT EXISTS outbox_instances (
    outbox_id INTEGER NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    sent_at REAL,
    PRIMARY KEY (outbox_id, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
"""

PENDING, SENT, GAVE_UP = "pending", "sent", "gave_up"


@dataclass(frozen=True)
class Entry:
    id: int
    job_id: int
    destination: str
    derived_series_uid: str
    folder: Path
    state: str
    attempts: int
    created_at: float
    next_attempt_at: float
    sent_at: float | None
    seconds: float | None
    last_error: str | None


_COLUMNS = (
    "id, job_id, destination, derived_series_uid, folder, state, attempts, created_at, next_attempt_at,"
    " sent_at, seconds, last_error"
)


class Outbox(Store):
    schema = _SCHEMA

    def __init__(self, root: Path) -> None:
        super().__init__(Path(root) / "outbox.sqlite")
        self.root = Path(root)

    def open(self) -> Outbox:
        (self.root / "outbox").mkdir(parents=True, exist_ok=True)
        self._open_db()
        return self

    def folder_for(self, job_id: int, derived_series_uid: str) -> Path:
        """Where a job writes its derived series: per job, so two jobs that derive the same series
        (a re-opened series, a re-run) never share or delete each other's files."""
        return self.root / "outbox" / str(job_id) / derived_series_uid

    def _entry(self, where: str, args: tuple) -> Entry | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE {where}", args).fetchone()
        if row is None:
            return None
        values = list(row)
        values[4] = Path(values[4])
        return Entry(*values)

    def add(self, job_id: int, destinations: list[str], derived_series_uid: str,
            files: list[tuple[str, Path]]) -> list[Entry]:
        """Record, in one transaction, that ``files`` [(SOP Instance UID, path)] must reach every
        one of ``destinations``. Idempotent: entries that exist are kept as they are."""
        now = time.time()
        folder = str(self.folder_for(job_id, derived_series_uid))
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for destination in destinations:
                    cur = self.db.execute(
                        "INSERT OR IGNORE INTO outbox (job_id, destination, derived_series_uid, folder, state,"
                        " created_at, next_attempt_at) VALUES (?,?,?,?,?,?,?)",
                        (job_id, destination, derived_series_uid, folder, PENDING, now, now),
                    )
                    if cur.rowcount == 1:
                        entry_id = cur.lastrowid
                        self.db.executemany(
                            "INSERT INTO outbox_instances (outbox_id, sop_instance_uid, path) VALUES (?,?,?)",
                            [(entry_id, uid, str(p)) for uid, p in files],
                        )
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            return [self._entry("job_id = ? AND destination = ?", (job_id, d)) for d in destinations]

    def due(self, now: float | None = None) -> list[Entry]:
        now = time.time() if now is None else now
        with self._lock:
            ids = [r[0] for r in self.db.execute(
                "SELECT id FROM outbox WHERE state = ? AND next_attempt_at <= ? ORDER BY next_attempt_at, id",
                (PENDING, now),
            )]
            return [self._entry("id = ?", (i,)) for i in ids]

    def get(self, entry_id: int) -> Entry | None:
        with self._lock:
            return self._entry("id = ?", (entry_id,))

    def for_job(self, job_id: int) -> list[Entry]:
        with self._lock:
            ids = [r[0] for r in self.db.execute("SELECT id FROM outbox WHERE job_id = ? ORDER BY id", (job_id,))]
            return [self._entry("id = ?", (i,)) for i in ids]

    def unsent(self, entry_id: int) -> list[tuple[str, Path]]:
        with self._lock:
            rows = self.db.execute(
                "SELECT sop_instance_uid, path FROM outbox_instances WHERE outbox_id = ? AND sent_at IS NULL"
                " ORDER BY rowid",
                (entry_id,),
            ).fetchall()
        return [(uid, Path(p)) for uid, p in rows]

    def instance_count(self, entry_id: int) -> int:
        with self._lock:
            return self.db.execute(
                "SELECT count(*) FROM outbox_instances WHERE outbox_id = ?", (entry_id,)
            ).fetchone()[0]

    def mark_instance_sent(self, entry_id: int, sop_instance_uid: str) -> None:
        with self._lock:
            self.db.execute(
                "UPDATE outbox_instances SET sent_at = ? WHERE outbox_id = ? AND sop_instance_uid = ?",
                (time.time(), entry_id, sop_instance_uid),
            )

    def mark_sent(self, entry_id: int, seconds: float) -> None:
        with self._lock:
            self.db.execute(
                "UPDATE outbox SET state = ?, sent_at = ?, seconds = ?, attempts = attempts + 1, last_error = NULL"
                " WHERE id = ?",
                (SENT, time.time(), seconds, entry_id),
            )

    def schedule_retry(self, entry_id: int, error: str, next_attempt_at: float) -> None:
        with self._lock:
            self.db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ? WHERE id = ?",
                (error, next_attempt_at, entry_id),
            )

    def give_up(self, entry_id: int, error: str) -> None:
        with self._lock:
            self.db.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ? WHERE id = ?",
                (GAVE_UP, error, entry_id),
            )

    def pending_count(self) -> int:
        with self._lock:
            return self.db.execute("SELECT count(*) FROM outbox WHERE state = ?", (PENDING,)).fetchone()[0]

    def remove_files(self, entry: Entry) -> None:
        """Delete a job's derived files once every destination has them."""
        shutil.rmtree(entry.folder.parent if entry.folder.parent.name == str(entry.job_id) else entry.folder,
                      ignore_errors=True)


class DeliveryError(Exception):
    pass


def store_series(
    files: list[tuple[str, Path]],
    destination: Destination,
    calling_ae: str,
    timeout_s: float,
    on_instance_sent: Callable[[str], None],
) -> None:
    """C-STORE ``files`` to ``destination`` on one association; ``on_instance_sent(uid)`` after each
    success. Raises DeliveryError on the first failure (what was confirmed stays confirmed)."""
    if not files:
        return  # everything was confirmed before (e.g. by a process that died before recording it)
    datasets = [(uid, pydicom.dcmread(path)) for uid, path in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    for sop_class in sorted({str(ds.SOPClassUID) for _, ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise DeliveryError(f"no association with {destination.ae_title}@{destination.host}:{destination.port}")
    try:
        for uid, ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except Exception as exc:
                raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
            code = int(status.Status) if status and "Status" in status else None
            if code is None:
                raise DeliveryError("no response (association lost or DIMSE timeout)")
            if code != 0 and code & 0xF000 != 0xB000:  # neither success nor warning
                raise DeliveryError(f"peer answered 0x{code:04X} {status.get('ErrorComment', '')}".strip())
            on_instance_sent(uid)
    finally:
        if assoc.is_established:
            assoc.release()


class Exporter(BackgroundLoop):
    """Background sender. ``on_sent(entry)`` when a destination has the whole series;
    ``on_gave_up(entry)`` when an entry passed its give-up time."""

    thread_name = "exporter"

    def __init__(
        self,
        outbox: Outbox,
        destinations: dict[str, Destination],
        cfg: ExportConfig,
        calling_ae: str,
        on_sent: Callable[[Entry], None],
        on_gave_up: Callable[[Entry], None],
    ) -> None:
        super().__init__(interval_s=0.5)
        self.outbox = outbox
        self.destinations = destinations
        self.cfg = cfg
        self.calling_ae = calling_ae
        self.on_sent = on_sent
        self.on_gave_up = on_gave_up

    def backoff_s(self, attempts: int) -> float:
        return min(self.cfg.retry_max_s, self.cfg.retry_initial_s * 2 ** max(0, attempts - 1))

    def attempt(self, entry: Entry) -> bool:
        """One delivery attempt; True when the destination now has the whole series."""
        dest = self.destinations.get(entry.destination)
        t0 = time.perf_counter()
        try:
            if dest is None:
                raise DeliveryError(f"destination {entry.destination!r} is no longer configured")
            files = self.outbox.unsent(entry.id)
            store_series(files, dest, dest.calling_ae_title or self.calling_ae, self.cfg.timeout_s,
                         lambda uid: self.outbox.mark_instance_sent(entry.id, uid))
        except (DeliveryError, OSError) as exc:
            attempts = entry.attempts + 1
            if time.time() - entry.created_at >= self.cfg.give_up_after_s:
                self.outbox.give_up(entry.id, str(exc))
                log.error("export.gave_up", destination=entry.destination, series_uid=entry.derived_series_uid,
                          attempts=attempts, error=str(exc))
                self.on_gave_up(self.outbox.get(entry.id))
            else:
                delay = self.backoff_s(attempts)
                self.outbox.schedule_retry(entry.id, str(exc), time.time() + delay)
                log.warning("export.retry", destination=entry.destination, series_uid=entry.derived_series_uid,
                            attempts=attempts, retry_in_s=round(delay, 1), error=str(exc))
            return False
        self.outbox.mark_sent(entry.id, time.perf_counter() - t0)
        log.info("export.sent", destination=entry.destination, series_uid=entry.derived_series_uid,
                 seconds=round(time.perf_counter() - t0, 3))
        self.on_sent(self.outbox.get(entry.id))
        return True

    def run_due(self) -> int:
        n = 0
        for entry in self.outbox.due():
            if self.stopping:
                break
            try:
                self.attempt(entry)
            except Exception:
                log.exception("export.attempt_failed", destination=entry.destination)
            n += 1
        return n

    def tick(self) -> bool:
        self.run_due()
        return False
