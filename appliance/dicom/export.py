"""Export: the persistent outbox and the C-STORE SCU that empties it.

Derived instances are written to disk first (``outbox/<job>/<derived series uid>/``), then
recorded in one outbox entry per destination. A streamed series adds its instances slab by slab
while the entry is open; the last slab seals it. The exporter keeps one association per
destination open while entries stream out, sends each instance as soon as it is recorded, as
the bytes on disk (no decode and re-encode), marks every instance delivered as soon as the
peer's success status arrives (so a restart re-sends only what was not confirmed), and retries
with exponential backoff until ``give_up_after_s``. An entry is sent when it is sealed and every
instance is confirmed.

Durability of progress: the per-instance marks are commits at ``synchronous=NORMAL`` (WAL): they
survive a crash of the process (kill -9) without an fsync each; the entry's ``sent`` mark is a
``synchronous=FULL`` commit, which makes every earlier mark durable too before the job is
reported done.

Transfer syntax: each SOP class is offered in Explicit and Implicit VR Little Endian; a file is
sent as it is when the peer accepted its own transfer syntax, and decoded and re-encoded by
pynetdicom only when the peer accepted the other one.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
from pydicom.uid import SecondaryCaptureImageStorage
from pynetdicom import AE

from appliance.background import BackgroundLoop
from appliance.config import Destination, ExportConfig
from appliance.db import Store
from appliance.dicom import tls
from appliance.dicom.scu import NODELAY, MessageIds, close_parked, park_reactor, usable
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
    sealed INTEGER NOT NULL DEFAULT 1,
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
    sealed: bool = True  # every instance of the derived series is recorded (the last slab is in)


_COLUMNS = (
    "id, job_id, destination, derived_series_uid, folder, state, attempts, created_at, next_attempt_at,"
    " sent_at, seconds, last_error, sealed"
)


class Outbox(Store):
    schema = _SCHEMA

    def __init__(self, root: Path) -> None:
        super().__init__(Path(root) / "outbox.sqlite")
        self.root = Path(root)

    def open(self) -> Outbox:
        (self.root / "outbox").mkdir(parents=True, exist_ok=True)
        self._open_db()
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(outbox)")}
        if "sealed" not in columns:  # an outbox written before streaming: every entry was whole
            self.db.execute("ALTER TABLE outbox ADD COLUMN sealed INTEGER NOT NULL DEFAULT 1")
        # Instance marks survive kill -9 without an fsync each; `mark_sent` commits at FULL.
        self.db.execute("PRAGMA synchronous=NORMAL")
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
        values[12] = bool(values[12])
        return Entry(*values)

    def add(self, job_id: int, destinations: list[str], derived_series_uid: str,
            files: list[tuple[str, Path]], sealed: bool = True, changed: set[str] = frozenset()) -> list[Entry]:
        """Record, in one transaction, that ``files`` [(SOP Instance UID, path)] must reach every
        one of ``destinations``. Called once per slab of a streamed series (``sealed`` False until
        the last) or once for a whole series. Idempotent: an instance already recorded keeps its
        delivery mark, unless its UID is in ``changed`` (its bytes differ from what was sent: it
        goes again)."""
        now = time.time()
        folder = str(self.folder_for(job_id, derived_series_uid))
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for destination in destinations:
                    self.db.execute(
                        "INSERT OR IGNORE INTO outbox (job_id, destination, derived_series_uid, folder, state,"
                        " created_at, next_attempt_at, sealed) VALUES (?,?,?,?,?,?,?,?)",
                        (job_id, destination, derived_series_uid, folder, PENDING, now, now, int(sealed)),
                    )
                    entry_id, state = self.db.execute(
                        "SELECT id, state FROM outbox WHERE job_id = ? AND destination = ?", (job_id, destination)
                    ).fetchone()
                    self.db.executemany(
                        "INSERT INTO outbox_instances (outbox_id, sop_instance_uid, path) VALUES (?,?,?)"
                        " ON CONFLICT (outbox_id, sop_instance_uid) DO UPDATE SET path = excluded.path,"
                        " sent_at = CASE WHEN ? THEN NULL ELSE sent_at END",
                        [(entry_id, uid, str(p), uid in changed) for uid, p in files],
                    )
                    reopen = state == SENT and (changed & {uid for uid, _ in files})
                    if sealed or reopen:
                        self.db.execute(
                            "UPDATE outbox SET sealed = max(sealed, ?), state = CASE WHEN ? THEN ? ELSE state END"
                            " WHERE id = ?", (int(sealed), bool(reopen), PENDING, entry_id))
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
        """The peer confirmed the instance (a NORMAL commit: survives a process crash)."""
        with self._lock:
            self.db.execute(
                "UPDATE outbox_instances SET sent_at = ? WHERE outbox_id = ? AND sop_instance_uid = ?",
                (time.time(), entry_id, sop_instance_uid),
            )

    def mark_sent(self, entry_id: int, seconds: float) -> None:
        """The destination has the whole series: a FULL commit, durable with every mark before it."""
        with self._lock:
            self.db.execute("PRAGMA synchronous=FULL")
            try:
                self.db.execute(
                    "UPDATE outbox SET state = ?, sent_at = ?, seconds = ?, attempts = attempts + 1,"
                    " last_error = NULL WHERE id = ?",
                    (SENT, time.time(), seconds, entry_id),
                )
            finally:
                self.db.execute("PRAGMA synchronous=NORMAL")

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


# SOP classes of the instances the appliance derives (derive._SOP_CLASS_BY_MODALITY and its default):
# offered on every association, so one association serves every series to that destination.
DERIVED_SOP_CLASSES = (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage)
_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class Link:
    """One association with one destination, kept open across entries while there is work."""

    def __init__(self, destination: Destination, calling_ae: str, timeout_s: float,
                 sop_classes: set[str] = frozenset()) -> None:
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
        ae.maximum_pdu_size = 0  # what we accept: no limit; what we send is cut to the peer's maximum
        self.sop_classes = set(DERIVED_SOP_CLASSES) | set(sop_classes)
        for sop_class in sorted(self.sop_classes):
            ae.add_requested_context(sop_class, list(_SYNTAXES))
        self.destination = destination
        try:
            tls_args = tls.client_context(destination.tls, destination.host) if destination.tls.enabled else None
        except tls.TlsSetupError as exc:
            raise DeliveryError(str(exc)) from exc
        self.assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                                  evt_handlers=NODELAY, tls_args=tls_args)
        if not self.assoc.is_established:
            raise DeliveryError(f"no association with {destination.ae_title}@{destination.host}:{destination.port}")
        self.accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in self.assoc.accepted_contexts}
        self._checkpoint = park_reactor(self.assoc)
        self._next_id = MessageIds()
        self.last_used = time.monotonic()

    @property
    def alive(self) -> bool:
        return usable(self.assoc)

    def send(self, path: Path) -> None:
        """C-STORE one file; raises DeliveryError unless the peer answers success or warning."""
        meta = pydicom.filereader.read_file_meta_info(path)
        sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        if sop_class not in self.sop_classes:
            raise DeliveryError(f"SOP class {sop_class} was not proposed on this association")
        # As the bytes on disk when the peer took the file's own transfer syntax; else pynetdicom
        # decodes the file and encodes it in the one the peer accepted.
        what = path if (sop_class, syntax) in self.accepted else pydicom.dcmread(path)
        try:
            status = self.assoc.send_c_store(what, msg_id=self._next_id())
        except Exception as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
        self.last_used = time.monotonic()
        code = int(status.Status) if status and "Status" in status else None
        if code is None:
            raise DeliveryError("no response (association lost or DIMSE timeout)")
        if code != 0 and code & 0xF000 != 0xB000:  # neither success nor warning
            raise DeliveryError(f"peer answered 0x{code:04X} {status.get('ErrorComment', '')}".strip())

    def close(self) -> None:
        close_parked(self.assoc, self._checkpoint)

    def abort(self) -> None:
        self.assoc.abort()
        if self._checkpoint is not None:
            self._checkpoint.unpark()


def store_series(
    files: list[tuple[str, Path]],
    destination: Destination,
    calling_ae: str,
    timeout_s: float,
    on_instance_sent: Callable[[str], None],
    link: Link | None = None,
) -> Link | None:
    """C-STORE ``files`` to ``destination`` (on ``link`` when it is open, else on a new
    association, returned for reuse); ``on_instance_sent(uid)`` after each success. Raises
    DeliveryError on the first failure (what was confirmed stays confirmed)."""
    if not files:
        return link  # everything was confirmed before (e.g. by a process that died before recording it)
    if link is None or not link.alive:
        sop_classes = {str(pydicom.filereader.read_file_meta_info(p).MediaStorageSOPClassUID) for _, p in files[:1]}
        link = Link(destination, calling_ae, timeout_s, sop_classes)
    for uid, path in files:
        link.send(path)
        on_instance_sent(uid)
    return link


class Exporter(BackgroundLoop):
    """Background sender. ``on_sent(entry)`` when a destination has the whole series;
    ``on_gave_up(entry)`` when an entry passed its give-up time."""

    thread_name = "exporter"
    link_idle_s = 2.0  # an association with no work for this long is released

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
        self._links: dict[str, Link] = {}
        self.sent_count = 0  # instances confirmed since start
        self._started: dict[int, float] = {}  # entry id -> when its first instance went out

    def backoff_s(self, attempts: int) -> float:
        return min(self.cfg.retry_max_s, self.cfg.retry_initial_s * 2 ** max(0, attempts - 1))

    def _drop_link(self, name: str) -> None:
        link = self._links.pop(name, None)
        if link is not None:
            try:
                link.close()
            except Exception:
                link.abort()

    def attempt(self, entry: Entry) -> bool:
        """Send what the entry has that its destination has not confirmed (counted in
        ``sent_count``); True when the entry is sealed and all of it is confirmed (marked sent)."""
        dest = self.destinations.get(entry.destination)
        t0 = self._started.setdefault(entry.id, time.perf_counter())
        try:
            if dest is None:
                raise DeliveryError(f"destination {entry.destination!r} is no longer configured")
            files = self.outbox.unsent(entry.id)

            def confirmed(uid: str) -> None:
                self.outbox.mark_instance_sent(entry.id, uid)
                self.sent_count += 1

            link = store_series(files, dest, dest.calling_ae_title or self.calling_ae, self.cfg.timeout_s,
                                confirmed, link=self._links.get(entry.destination))
            if isinstance(link, Link):
                self._links[entry.destination] = link
        except (DeliveryError, OSError) as exc:
            self._drop_link(entry.destination)
            self._started.pop(entry.id, None)
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
        current = self.outbox.get(entry.id)
        if current is None or not current.sealed or self.outbox.unsent(entry.id):
            return False  # more slabs to come, or instances recorded while these went out
        seconds = time.perf_counter() - self._started.pop(entry.id, t0)
        self.outbox.mark_sent(entry.id, seconds)
        log.info("export.sent", destination=entry.destination, series_uid=entry.derived_series_uid,
                 seconds=round(seconds, 3))
        self.on_sent(self.outbox.get(entry.id))
        return True

    def run_due(self) -> int:
        """One attempt per due entry; returns how many instances went."""
        before = self.sent_count
        for entry in self.outbox.due():
            if self.stopping:
                break
            try:
                self.attempt(entry)
            except Exception:
                log.exception("export.attempt_failed", destination=entry.destination)
        return self.sent_count - before

    def _release_idle_links(self) -> None:
        busy = {e.destination for e in self.outbox.due()}
        for name, link in list(self._links.items()):
            if not link.alive or (name not in busy and time.monotonic() - link.last_used > self.link_idle_s):
                self._drop_link(name)

    def tick(self) -> bool:
        sent = self.run_due()
        self._release_idle_links()
        return sent > 0

    def stop(self, timeout_s: float = 30.0) -> None:
        super().stop(timeout_s)
        for name in list(self._links):
            self._drop_link(name)
