"""Series completion: decides when a series has fully arrived.

A series is complete after ``idle_seconds`` with no new instance, or as soon as the number of
instances a sender announced (``expected_count_tags``) has arrived. The state lives in the spool's
index (wall-clock times), so completion survives a restart: a series that was receiving goes on
timing from its last instance, and one that was complete but not yet handed on is handed on again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from appliance.background import BackgroundLoop
from appliance.config import CompletionConfig
from appliance.dicom.spool import COMPLETE, RECEIVING, SeriesRow, Spool
from appliance.logging import get_logger

log = get_logger(__name__)


def is_due(row: SeriesRow, now: float, idle_seconds: float) -> str | None:
    """Why ``row`` is complete at ``now`` ("expected_count" or "idle"), or None if it is not."""
    if row.expected_count and row.instance_count >= row.expected_count:
        return "expected_count"
    if now - row.last_received >= idle_seconds:
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

    def poll_once(self, now: float | None = None) -> list[SeriesRow]:
        now = time.time() if now is None else now
        done = []
        for row in self.spool.series_in_state(RECEIVING):
            why = is_due(row, now, self.cfg.idle_seconds)
            # The generation guard loses the race cleanly when an instance lands meanwhile.
            if why and self.spool.set_series_state(row.series_uid, COMPLETE, generation=row.generation):
                log.info("series.complete", series_uid=row.series_uid, instances=row.instance_count,
                         expected=row.expected_count, why=why,
                         receive_s=round(row.last_received - row.first_received, 3))
                done.append(row)
                self._hand_on(row)
        return done

    def resume_after_restart(self) -> list[SeriesRow]:
        """Hand on series that were complete when the previous process stopped."""
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
