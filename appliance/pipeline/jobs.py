"""The job queue: one row per volume to process, in SQLite, so jobs survive crashes and restarts.

States: queued -> running -> exporting -> done, or -> failed; a streamed series' job is
``streaming`` from its first slab until its last (then exporting), and goes ``queued`` when the
series falls back to batch. A job is unique per
(series, generation, volume label): assembling the same series again after a restart enqueues
nothing new. Jobs found ``running`` at start were cut off by a crash and go back to ``queued``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.db import Store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    series_uid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    label TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    calling_ae TEXT,
    pipeline TEXT NOT NULL,
    destinations TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    received_first REAL,
    received_last REAL,
    completed_at REAL,
    queued_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    derived_series_uid TEXT,
    timings TEXT NOT NULL DEFAULT '{}',
    reason TEXT,
    detail TEXT,
    UNIQUE (series_uid, generation, label)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
"""

QUEUED, RUNNING, EXPORTING, DONE, FAILED = "queued", "running", "exporting", "done", "failed"
STREAMING = "streaming"


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    generation: int
    label: str
    study_uid: str
    calling_ae: str
    pipeline: str
    destinations: tuple[str, ...]
    state: str
    attempts: int
    received_first: float | None
    received_last: float | None
    completed_at: float | None
    queued_at: float
    started_at: float | None
    finished_at: float | None
    derived_series_uid: str | None
    timings: dict[str, float]
    reason: str | None
    detail: str | None


_COLUMNS = (
    "id, series_uid, generation, label, study_uid, coalesce(calling_ae, ''), pipeline, destinations, state,"
    " attempts, received_first, received_last, completed_at, queued_at, started_at, finished_at,"
    " derived_series_uid, timings, reason, detail"
)


def _job(row: tuple) -> Job:
    values = list(row)
    values[7] = tuple(json.loads(values[7]))
    values[17] = json.loads(values[17])
    return Job(*values)


class JobQueue(Store):
    schema = _SCHEMA

    def __init__(self, path: Path) -> None:
        super().__init__(path)

    def open(self, max_attempts: int = 2) -> list[Job]:
        """Open the queue after a start. Jobs found running were cut off by a crash: those with
        attempts left go back to the queue; those without fail as ``crashed``, so a study that
        kills the process cannot make the daemon crash-loop. Returns the jobs failed so."""
        self._open_db()
        now = time.time()
        with self._lock:
            crashed = [_job(r) for r in self.db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state = ? AND attempts >= ?", (RUNNING, max_attempts))]
            self.db.execute(
                "UPDATE jobs SET state = ?, reason = 'crashed', finished_at = ?,"
                " detail = 'the appliance stopped while processing this job, ' || attempts || ' time(s)'"
                " WHERE state = ? AND attempts >= ?", (FAILED, now, RUNNING, max_attempts))
            self.db.execute("UPDATE jobs SET state = ? WHERE state = ?", (QUEUED, RUNNING))
        return crashed

    def _one(self, sql: str, args: tuple = ()) -> Job | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE {sql}", args).fetchone()
        return _job(row) if row else None

    def enqueue(
        self,
        *,
        series_uid: str,
        generation: int,
        label: str,
        study_uid: str,
        calling_ae: str,
        pipeline: str,
        destinations: list[str],
        received_first: float | None,
        received_last: float | None,
        completed_at: float | None,
        state: str = QUEUED,
    ) -> tuple[Job, bool]:
        """Queue a job (or start a streamed one: ``state`` STREAMING); returns (job, created).
        Enqueueing the same volume again returns the existing job."""
        with self._lock:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO jobs (series_uid, generation, label, study_uid, calling_ae, pipeline,"
                " destinations, state, received_first, received_last, completed_at, queued_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (series_uid, generation, label, study_uid, calling_ae, pipeline, json.dumps(destinations), state,
                 received_first, received_last, completed_at, time.time()),
            )
            job = self._one("series_uid = ? AND generation = ? AND label = ?", (series_uid, generation, label))
        return job, cur.rowcount == 1

    def take_next(self) -> Job | None:
        """The oldest queued job, now marked running with its attempt counted."""
        with self._lock:
            job = self._one("state = ? ORDER BY id LIMIT 1", (QUEUED,))
            if job is None:
                return None
            self.db.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, started_at = ? WHERE id = ?",
                (RUNNING, time.time(), job.id),
            )
            return self._one("id = ?", (job.id,))

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            return self._one("id = ?", (job_id,))

    def _set(self, job_id: int, **fields: object) -> None:
        if "timings" in fields:
            fields["timings"] = json.dumps(fields["timings"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self.db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def requeue(self, job_id: int, reason: str, detail: str) -> None:
        self._set(job_id, state=QUEUED, reason=reason, detail=detail)

    def streaming(self, job_id: int, started_at: float | None = None) -> None:
        fields: dict = {"state": STREAMING}
        if started_at is not None:
            fields["started_at"] = started_at
        self._set(job_id, **fields)

    def series_completed(self, job_id: int, received_last: float, completed_at: float | None) -> None:
        """A streamed job's series is complete: its times, as a batch job has them from the start."""
        self._set(job_id, received_last=received_last, completed_at=completed_at)

    def in_state(self, state: str) -> list[Job]:
        with self._lock:
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state = ? ORDER BY id", (state,)).fetchall()
        return [_job(r) for r in rows]

    def exporting(self, job_id: int, derived_series_uid: str, timings: dict[str, float]) -> None:
        self._set(job_id, state=EXPORTING, derived_series_uid=derived_series_uid, timings=timings)

    def done(self, job_id: int) -> None:
        self._set(job_id, state=DONE, finished_at=time.time())

    def failed(self, job_id: int, reason: str, detail: str) -> None:
        self._set(job_id, state=FAILED, reason=reason, detail=detail, finished_at=time.time())

    def for_series(self, series_uid: str, generation: int) -> list[Job]:
        with self._lock:
            rows = self.db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE series_uid = ? AND generation = ? ORDER BY id",
                (series_uid, generation),
            ).fetchall()
        return [_job(r) for r in rows]

    def count(self, *states: str) -> int:
        marks = ",".join("?" * len(states))
        with self._lock:
            return self.db.execute(f"SELECT count(*) FROM jobs WHERE state IN ({marks})", states).fetchone()[0]
