"""SQLite connections for the appliance's durable state (spool index, jobs, outbox)."""

from __future__ import annotations

import sqlite3
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
