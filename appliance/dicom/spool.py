"""Durable spool: every received instance is on disk and indexed before it is acknowledged.

Layout under the storage root::

    incoming/            files being received or written; never acknowledged, cleared at start
    series/<series uid>/ <sop uid>.dcm, and <sop uid>.v<N>.dcm for later versions with other bytes
    quarantine/          refused instances with a ``.json`` reason beside each (when enabled)
    index.sqlite         the index (WAL, synchronous=FULL)

A store is: the received file (pynetdicom writes it into ``incoming/``) hashed and fsynced, then, in
one index transaction (BEGIN IMMEDIATE: the receiver's process and the daemon's serialise on it),
linked into ``series/`` without replacing anything, the directory fsynced, the rows inserted and
committed; a file from elsewhere is first copied into ``incoming/`` while hashing. A name already on
disk but not in the index (a released series' file not yet deleted, or a crash's leftover) is never
overwritten: the new file takes a name of its own. A crash between link and commit leaves a file the
index does not know; `Spool.open` indexes such files again (they were never acknowledged, so the
sender re-sends and the duplicate check answers success).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pydicom

from appliance.config import LimitsConfig
from appliance.db import Store
from appliance.dicom.validate import STATUS_OUT_OF_RESOURCES, InstanceHeader, InstanceRefused
from appliance.fsutil import fsync_dir
from appliance.logging import get_logger

log = get_logger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT,
    peer_address TEXT,
    received_at REAL NOT NULL,
    UNIQUE (sop_instance_uid, version)
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (series_uid);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT,
    calling_ae TEXT,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    expected_count INTEGER,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    completed_at REAL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS series_by_state ON series (state);
CREATE TABLE IF NOT EXISTS refused (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT,
    calling_ae TEXT,
    peer_address TEXT,
    path TEXT
);
"""

# Series states. receiving -> complete -> assembled | rejected -> released (sources deleted after
# every destination stored the result); a new instance reopens any of them.
RECEIVING, COMPLETE, ASSEMBLED, REJECTED, RELEASED = "receiving", "complete", "assembled", "rejected", "released"


class OutOfSpace(InstanceRefused):
    def __init__(self, detail: str) -> None:
        super().__init__(STATUS_OUT_OF_RESOURCES, "out_of_space", detail)


@dataclass(frozen=True)
class StoreOutcome:
    kind: Literal["stored", "duplicate", "new_version"]
    path: Path
    version: int
    reopened: bool = False  # the series had been completed and is receiving again


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    modality: str
    calling_ae: str
    first_received: float
    last_received: float
    expected_count: int | None
    state: str
    generation: int
    completed_at: float | None
    reason: str | None
    instance_count: int


def _copy_hashing(src: Path, dst: Path) -> str:
    """Copy src to dst (fsynced), return the sha256 of the bytes. Removes dst on any failure."""
    digest = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            while chunk := fin.read(1 << 20):
                digest.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def hash_and_fsync(path: Path) -> str:
    """sha256 of a file written by someone else (the bytes are still in the page cache), and the
    file fsynced, before it is linked into place. Both release the interpreter lock: the receiver
    runs this beside its header parse (`scp.StorageSCP`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
        os.fsync(f.fileno())
    return digest.hexdigest()


def _link_new(src: Path, folder: Path, stem: str) -> Path:
    """``src`` under ``folder`` as ``<stem>.dcm``, or ``<stem>.<random>.dcm`` when that name is
    taken: a hard link never replaces a file (a name on disk the index does not list may still be
    deleted by a release in progress, and must not take a new instance with it)."""
    name = f"{stem}.dcm"
    while True:
        final = folder / name
        try:
            os.link(src, final)
            return final
        except FileExistsError:
            name = f"{stem}.{uuid.uuid4().hex[:12]}.dcm"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Spool(Store):
    """The durable store of received instances and the series index. Thread-safe."""

    schema = _SCHEMA

    def __init__(self, root: Path, limits: LimitsConfig, keep_refused: bool = True) -> None:
        super().__init__(Path(root) / "index.sqlite")
        self.root = Path(root)
        self.limits = limits
        self.keep_refused = keep_refused
        self.incoming = self.root / "incoming"
        self.series_dir = self.root / "series"
        self.quarantine_dir = self.root / "quarantine"

    # ---- lifecycle -------------------------------------------------------------------------
    def open(self, recover: bool = True) -> Spool:
        """``recover``: clear ``incoming/`` and index the files a crash left (the daemon, once at
        start, before anything is received); the receiver's process opens with False."""
        for d in (self.root, self.incoming, self.series_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._open_db()
        if recover:
            self._clear_incoming()
            self._finish_cut_releases()
            self._recover_orphans()
        return self

    def _clear_incoming(self) -> None:
        # Copies (*.part) and the receiver's chunked dataset files: neither was ever acknowledged.
        for part in self.incoming.iterdir():
            if part.is_file():
                part.unlink(missing_ok=True)

    def _finish_cut_releases(self) -> None:
        """Rows whose file is gone. A series whose indexed files are all gone was being released
        when the process died (`release` deletes them before its commit): the release is finished.
        Otherwise the rows go and it is said loudly: a re-send of those instances is then stored
        again rather than answered as a duplicate of nothing."""
        gone: dict[str, list[str]] = {}
        total: dict[str, int] = {}
        for series_uid, rel in self.db.execute("SELECT series_uid, path FROM instances").fetchall():
            total[series_uid] = total.get(series_uid, 0) + 1
            if not (self.root / rel).exists():
                gone.setdefault(series_uid, []).append(rel)
        for series_uid, rels in gone.items():
            with self._lock, self._transaction() as db:
                db.executemany("DELETE FROM instances WHERE path = ?", [(r,) for r in rels])
                if len(rels) == total[series_uid]:
                    db.execute("UPDATE series SET state = ? WHERE series_uid = ?", (RELEASED, series_uid))
            if len(rels) == total[series_uid]:
                log.warning("spool.release_finished", series_uid=series_uid, instances=len(rels),
                            note="a release was cut off by a stop; its files were already deleted")
            else:
                log.error("spool.files_missing", series_uid=series_uid, missing=len(rels), indexed=total[series_uid],
                          note="rows of files that are gone were dropped; a re-send is stored again")

    def _recover_orphans(self) -> None:
        """Index files renamed into place by a process that died before its commit; delete those
        of a released series (left by a crash during `release`: delivered, not needed)."""
        known = {row[0] for row in self.db.execute("SELECT path FROM instances")}
        released = {row[0] for row in self.db.execute("SELECT series_uid FROM series WHERE state = ?", (RELEASED,))}
        for series in self.series_dir.iterdir() if self.series_dir.exists() else []:
            for f in series.glob("*.dcm"):
                rel = str(f.relative_to(self.root))
                if rel in known:
                    continue
                if series.name in released:
                    f.unlink(missing_ok=True)
                    continue
                try:
                    ds = pydicom.dcmread(f, stop_before_pixels=True)
                    header = InstanceHeader(
                        sop_class_uid=str(ds.SOPClassUID),
                        sop_instance_uid=str(ds.SOPInstanceUID),
                        study_uid=str(ds.StudyInstanceUID),
                        series_uid=str(ds.SeriesInstanceUID),
                        modality=str(ds.get("Modality", "") or ""),
                        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                        expected_count=None,
                    )
                except Exception as exc:  # a file we wrote but cannot read back: keep it, say so
                    log.error("spool.orphan_unreadable", path=rel, error=str(exc))
                    continue
                with self._lock:
                    row = self.db.execute("SELECT max(version) FROM instances WHERE sop_instance_uid = ?",
                                          (header.sop_instance_uid,)).fetchone()
                    version = (row[0] or 0) + 1
                    with self._transaction():
                        self._index(header, rel, version, _file_sha256(f), f.stat().st_size, None, None,
                                    f.stat().st_mtime)
                log.warning("spool.orphan_recovered", path=rel, series_uid=header.series_uid)

    # ---- storing ---------------------------------------------------------------------------
    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def _ensure_space(self, size: int) -> None:
        free = self.free_bytes()
        reserve = self.limits.free_space_reserve_bytes
        if free - size < reserve:
            raise OutOfSpace(f"{free} bytes free, {size} needed plus a reserve of {reserve}")

    def store(
        self,
        src: Path,
        header: InstanceHeader,
        calling_ae: str | None = None,
        peer_address: str | None = None,
        now: float | None = None,
        move: bool = False,
        sha256: str | None = None,
    ) -> StoreOutcome:
        """Store a received file durably and index it; returns once both are on disk.

        ``move``: ``src`` is the receiver's own temporary file (pynetdicom's chunked dataset file,
        written into ``incoming/``): it is hashed and fsynced where it lies and linked into the
        series folder, never copied; ``sha256``: the caller did that already (`hash_and_fsync`).
        Otherwise (or when ``src`` is on another file system) it is copied into ``incoming/`` while
        hashing."""
        size = os.path.getsize(src)
        if size > self.limits.max_bytes_per_instance:
            raise InstanceRefused(
                STATUS_OUT_OF_RESOURCES,
                "too_large",
                f"{size} bytes, the limit is {self.limits.max_bytes_per_instance}",
            )
        self._ensure_space(size)
        try:
            if move and os.stat(src).st_dev == os.stat(self.incoming).st_dev:
                tmp, sha = Path(src), sha256 or hash_and_fsync(src)
            else:
                tmp = self.incoming / f"{uuid.uuid4().hex}.part"
                sha = _copy_hashing(src, tmp)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpace(f"disk full while writing {size} bytes") from exc
            raise
        try:
            return self._commit(tmp, header, sha, size, calling_ae, peer_address, now or time.time())
        finally:
            tmp.unlink(missing_ok=True)

    def _commit(
        self,
        tmp: Path,
        header: InstanceHeader,
        sha: str,
        size: int,
        calling_ae: str | None,
        peer_address: str | None,
        now: float,
    ) -> StoreOutcome:
        """Link ``tmp`` into the series folder and index it, in one write transaction (taken
        first, so every read below is current); a duplicate only touches the series' time."""
        linked: list[Path] = []
        with self._lock:
            try:
                with self._transaction() as db:
                    versions = db.execute(
                        "SELECT version, sha256, path FROM instances WHERE sop_instance_uid = ? ORDER BY version",
                        (header.sop_instance_uid,),
                    ).fetchall()
                    for version, known_sha, rel in versions:
                        if known_sha == sha:
                            db.execute(
                                "UPDATE series SET last_received = max(last_received, ?) WHERE series_uid = ?",
                                (now, header.series_uid),
                            )
                            return StoreOutcome("duplicate", self.root / rel, version)
                    if not versions:
                        count = db.execute(
                            "SELECT count(DISTINCT sop_instance_uid) FROM instances WHERE series_uid = ?",
                            (header.series_uid,),
                        ).fetchone()[0]
                        if count >= self.limits.max_instances_per_series:
                            raise InstanceRefused(
                                STATUS_OUT_OF_RESOURCES,
                                "series_limit",
                                f"series already holds {count} instances, the limit",
                            )
                    version = versions[-1][0] + 1 if versions else 1
                    series_path = self.series_dir / header.series_uid
                    new_dir = not series_path.exists()
                    series_path.mkdir(exist_ok=True)
                    stem = header.sop_instance_uid if version == 1 else f"{header.sop_instance_uid}.v{version}"
                    final = _link_new(tmp, series_path, stem)
                    linked.append(final)
                    fsync_dir(series_path)
                    if new_dir:
                        fsync_dir(self.series_dir)
                    reopened = self._index(header, str(final.relative_to(self.root)), version, sha, size,
                                           calling_ae, peer_address, now)
            except BaseException:
                for f in linked:  # its row went with the rollback: never indexed, never acknowledged
                    f.unlink(missing_ok=True)
                raise
        if version > 1:
            log.warning(
                "spool.new_version",
                sop_instance_uid=header.sop_instance_uid,
                series_uid=header.series_uid,
                version=version,
                note="same SOP Instance UID with different bytes; both versions kept, the newest is used",
            )
        return StoreOutcome("stored" if version == 1 else "new_version", final, version, reopened)

    @contextmanager
    def _transaction(self):
        """BEGIN IMMEDIATE (SQLite's write lock, which the receiver's process and the daemon's
        share) ... COMMIT, or ROLLBACK on any exception. The caller holds ``_lock``."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _index(
        self,
        header: InstanceHeader,
        rel: str,
        version: int,
        sha: str,
        size: int,
        calling_ae: str | None,
        peer_address: str | None,
        now: float,
    ) -> bool:
        """Insert the instance and update its series. The caller holds the lock and the transaction."""
        db = self.db
        db.execute(
            "INSERT INTO instances (sop_instance_uid, version, sha256, sop_class_uid, transfer_syntax_uid,"
            " series_uid, study_uid, path, size, calling_ae, peer_address, received_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                header.sop_instance_uid, version, sha, header.sop_class_uid, header.transfer_syntax_uid,
                header.series_uid, header.study_uid, rel, size, calling_ae, peer_address, now,
            ),
        )
        row = db.execute("SELECT state FROM series WHERE series_uid = ?", (header.series_uid,)).fetchone()
        reopened = False
        if row is None:
            db.execute(
                "INSERT INTO series (series_uid, study_uid, modality, calling_ae, first_received,"
                " last_received, expected_count, state) VALUES (?,?,?,?,?,?,?,?)",
                (header.series_uid, header.study_uid, header.modality, calling_ae, now, now,
                 header.expected_count, RECEIVING),
            )
        else:
            reopened = row[0] != RECEIVING
            db.execute(
                "UPDATE series SET last_received = max(last_received, ?),"
                " expected_count = coalesce(expected_count, ?),"
                " state = ?, reason = CASE WHEN ? THEN NULL ELSE reason END,"
                " generation = generation + ?, completed_at = CASE WHEN ? THEN NULL ELSE completed_at END"
                " WHERE series_uid = ?",
                (now, header.expected_count, RECEIVING, reopened, int(reopened), reopened, header.series_uid),
            )
        if reopened:
            log.warning("series.reopened", series_uid=header.series_uid, previous_state=row[0])
        return reopened

    def record_refused(
        self, src: Path | None, reason: str, detail: str, calling_ae: str | None, peer_address: str | None
    ) -> Path | None:
        """Remember a refused instance (and keep its bytes in quarantine when there is room)."""
        kept: Path | None = None
        if self.keep_refused and src is not None and src.exists():
            size = os.path.getsize(src)
            try:
                self._ensure_space(size)
                stamp = time.strftime("%Y%m%d", time.gmtime())
                qdir = self.quarantine_dir / stamp
                qdir.mkdir(parents=True, exist_ok=True)
                kept = qdir / f"{uuid.uuid4().hex}.dcm"
                shutil.copyfile(src, kept)
                kept.with_suffix(".json").write_text(
                    json.dumps({"reason": reason, "detail": detail, "calling_ae": calling_ae}), encoding="utf-8"
                )
            except (OutOfSpace, OSError):
                if kept is not None:
                    kept.unlink(missing_ok=True)
                    kept.with_suffix(".json").unlink(missing_ok=True)
                kept = None
        try:
            with self._lock:
                self.db.execute(
                    "INSERT INTO refused (received_at, reason, detail, calling_ae, peer_address, path)"
                    " VALUES (?,?,?,?,?,?)",
                    (time.time(), reason, detail, calling_ae, peer_address,
                     str(kept.relative_to(self.root)) if kept else None),
                )
        except sqlite3.Error as exc:  # a full disk: the refusal stands (0xA700, ...), only its record is lost
            log.warning("spool.refusal_not_recorded", reason=reason, error=str(exc))
            if kept is not None:
                kept.unlink(missing_ok=True)
                kept.with_suffix(".json").unlink(missing_ok=True)
                kept = None
        return kept

    # ---- series index ----------------------------------------------------------------------
    _SERIES_COLUMNS = (
        "s.series_uid, s.study_uid, coalesce(s.modality, ''), coalesce(s.calling_ae, ''), s.first_received,"
        " s.last_received, s.expected_count, s.state, s.generation, s.completed_at, s.reason,"
        " (SELECT count(DISTINCT sop_instance_uid) FROM instances i WHERE i.series_uid = s.series_uid)"
    )

    def series(self, series_uid: str) -> SeriesRow | None:
        with self._lock:
            row = self.db.execute(
                f"SELECT {self._SERIES_COLUMNS} FROM series s WHERE s.series_uid = ?", (series_uid,)
            ).fetchone()
        return SeriesRow(*row) if row else None

    def series_in_state(self, state: str) -> list[SeriesRow]:
        with self._lock:
            rows = self.db.execute(
                f"SELECT {self._SERIES_COLUMNS} FROM series s WHERE s.state = ? ORDER BY s.last_received",
                (state,),
            ).fetchall()
        return [SeriesRow(*r) for r in rows]

    def set_series_state(
        self, series_uid: str, state: str, reason: str | None = None, generation: int | None = None
    ) -> bool:
        """Move a series to ``state``; with ``generation``, only if no new instance arrived since."""
        with self._lock:
            sql = "UPDATE series SET state = ?, reason = ?, completed_at = coalesce(completed_at, ?) WHERE series_uid = ?"
            args: tuple = (state, reason, time.time() if state != RECEIVING else None, series_uid)
            if generation is not None:
                sql += " AND generation = ?"
                args += (generation,)
            return self.db.execute(sql, args).rowcount == 1

    def instance_paths(self, series_uid: str) -> list[Path]:
        """The newest version of every instance of the series, in arrival order."""
        with self._lock:
            rows = self.db.execute(
                "SELECT path FROM instances i WHERE series_uid = ? AND version = "
                " (SELECT max(version) FROM instances j WHERE j.sop_instance_uid = i.sop_instance_uid"
                "  AND j.series_uid = i.series_uid)"
                " ORDER BY received_at, id",
                (series_uid,),
            ).fetchall()
        return [self.root / r[0] for r in rows]

    def release(self, series_uid: str, generation: int) -> int:
        """Delete the received instances of a series whose results were delivered; returns how many
        files were removed. Does nothing if instances arrived since (another generation).

        Rows and files go inside one write transaction: a store (in the receiver's process) waits
        for it, so a re-send arriving meanwhile is stored afresh after it, never deleted with it.
        A crash before the commit leaves rows whose files are gone; the next start finishes the
        release (`_finish_cut_releases`)."""
        with self._lock:
            with self._transaction() as db:
                row = db.execute("SELECT generation FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
                if row is None or row[0] != generation:
                    return 0
                rels = [r[0] for r in db.execute("SELECT path FROM instances WHERE series_uid = ?", (series_uid,))]
                db.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
                db.execute("UPDATE series SET state = ? WHERE series_uid = ?", (RELEASED, series_uid))
                for rel in rels:
                    (self.root / rel).unlink(missing_ok=True)
            try:
                (self.series_dir / series_uid).rmdir()
            except OSError:
                pass
        return len(rels)

    def refused(self) -> list[dict]:
        with self._lock:
            rows = self.db.execute(
                "SELECT received_at, reason, detail, calling_ae, peer_address, path FROM refused ORDER BY id"
            ).fetchall()
        keys = ("received_at", "reason", "detail", "calling_ae", "peer_address", "path")
        return [dict(zip(keys, r)) for r in rows]
