"""SQLite connections for the appliance's durable state (spool index, jobs, outbox)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


def connect(path: Path, schema: str) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, and synchronous=FULL:
    with WAL, NORMAL can lose the last commits on power loss, and a commit here is a promise
    to a sender. Shared between threads under the owner's lock."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=10000")
    db.executescript(schema)
    return db


class Store:
    """Base of the SQLite-backed stores: one connection, shared by threads under ``_lock``."""

    schema = ""

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _open_db(self) -> None:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = connect(self.db_path, self.schema)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"{type(self).__name__} is not open")
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
