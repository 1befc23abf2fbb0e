"""Series completion: decides when a series has fully arrived. Three rules, the first that
fires wins, and its name goes into the ``series.received`` event (``why``):

- ``expected_count``: the number of instances the sender announced (``expected_count_tags``) is here;
- ``released``: the association that sent the series was released normally and, for
  ``release_grace_s``, no instance arrived and no other association was storing into the series
  (``on_release``; aborted associations do not count);
- ``idle``: ``idle_seconds`` passed with no new instance.

The spool's index holds the times, so completion survives a restart: a series that was receiving
goes on timing from its last instance or from the restart, whichever is later (by the idle rule:
releases are not persisted; while the appliance was down its sender could not send, and a sender
cut off mid-series sends again), and one that was complete but not yet handed on is handed on again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from appliance.background import BackgroundLoop
from appliance.config import CompletionConfig
from appliance.dicom.spool import COMPLETE, RECEIVING, SeriesRow, Spool
from appliance.logging import get_logger

log = get_logger(__name__)


def is_due(row: SeriesRow, now: float, idle_seconds: float, released_at: float | None = None,
           grace_s: float = 0.0, idle_since: float = 0.0) -> str | None:
    """Why ``row`` is complete at ``now`` ("expected_count", "released" or "idle"), or None.
    ``released_at``: when the last association storing into it was released (None: not released);
    ``idle_since``: the idle time counts from no earlier than this (the restart)."""
    if row.expected_count and row.instance_count >= row.expected_count:
        return "expected_count"
    if released_at is not None and row.last_received <= released_at and now - released_at >= grace_s:
        return "released"
    if now - max(row.last_received, idle_since) >= idle_seconds:
        return "idle"
    return None


class CompletionWatcher(BackgroundLoop):
    """Polls the index and hands each completed series to ``on_complete`` exactly once per generation.
    `notify()` (an instance arrived) makes it check at once rather than at the next poll."""

    thread_name = "completion"

    def __init__(self, spool: Spool, cfg: CompletionConfig, on_complete: Callable[[SeriesRow], None]) -> None:
        super().__init__(cfg.poll_interval_s)
        self.spool = spool
        self.cfg = cfg
        self.on_complete = on_complete
        self._released: dict[str, float] = {}
        self._released_lock = threading.Lock()
        self.why: dict[str, str] = {}  # series uid -> the rule that completed it (read by on_complete)
        self._idle_since = 0.0  # the restart: idle time before it does not count

    def released(self, series_uids: list[str], now: float | None = None) -> None:
        """The senders of these series released their associations (from the SCP's thread)."""
        if not self.cfg.on_release:
            return
        now = time.time() if now is None else now
        with self._released_lock:
            for uid in series_uids:
                self._released[uid] = now
        self.notify()

    def wait_s(self) -> float:
        """Until the earliest release grace ends (or the poll interval)."""
        with self._released_lock:
            ends = [t + self.cfg.release_grace_s for t in self._released.values()]
        return max(0.01, min([self.cfg.poll_interval_s, *(e - time.time() for e in ends)]))

    def poll_once(self, now: float | None = None) -> list[SeriesRow]:
        now = time.time() if now is None else now
        done = []
        with self._released_lock:
            released = dict(self._released)
        for row in self.spool.series_in_state(RECEIVING):
            why = is_due(row, now, self.cfg.idle_seconds, released.get(row.series_uid), self.cfg.release_grace_s,
                         self._idle_since)
            if why != "released" and row.series_uid in released and row.last_received > released[row.series_uid]:
                with self._released_lock:  # an instance came after the release: that release is spent
                    if self._released.get(row.series_uid) == released[row.series_uid]:
                        del self._released[row.series_uid]
            # The generation guard loses the race cleanly when an instance lands meanwhile.
            if why and self.spool.set_series_state(row.series_uid, COMPLETE, generation=row.generation):
                log.info("series.complete", series_uid=row.series_uid, instances=row.instance_count,
                         expected=row.expected_count, why=why,
                         receive_s=round(row.last_received - row.first_received, 3))
                with self._released_lock:
                    self._released.pop(row.series_uid, None)
                self.why[row.series_uid] = why
                done.append(row)
                self._hand_on(row)
        return done

    def resume_after_restart(self, now: float | None = None) -> list[SeriesRow]:
        """Hand on series that were complete when the previous process stopped; those still
        receiving time their idle from now."""
        self._idle_since = time.time() if now is None else now
        rows = self.spool.series_in_state(COMPLETE)
        for row in rows:
            log.info("series.resumed", series_uid=row.series_uid, instances=row.instance_count)
            self._hand_on(row)
        return rows

    def _hand_on(self, row: SeriesRow) -> None:
        try:
            self.on_complete(row)
        except Exception:
            log.exception("series.hand_on_failed", series_uid=row.series_uid)

    def tick(self) -> bool:
        self.poll_once()
        return False
