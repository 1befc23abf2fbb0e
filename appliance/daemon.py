"""The daemon: wires the SCP, the spool, series completion and assembly.

Data moves one way: SCP -> spool -> completion -> assembler -> ``on_assembled`` (the pipeline's
entry point). Every hand-over is either a plain call or durable state in the spool's index, so a
restart resumes where the previous process stopped: series still receiving keep their timers,
completed series not yet assembled are assembled again.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Callable

from appliance.config import ApplianceConfig
from appliance.dicom.assemble import Assembly, assemble_series
from appliance.dicom.completion import CompletionWatcher
from appliance.dicom.scp import StorageSCP
from appliance.dicom.spool import ASSEMBLED, REJECTED, SeriesRow, Spool, StoreOutcome
from appliance.logging import get_logger

log = get_logger(__name__)

AssembledCallback = Callable[[SeriesRow, Assembly], None]


class Daemon:
    def __init__(self, cfg: ApplianceConfig, on_assembled: AssembledCallback | None = None) -> None:
        self.cfg = cfg
        self.on_assembled = on_assembled
        self.spool = Spool(cfg.storage.root, cfg.limits, keep_refused=cfg.storage.keep_rejected)
        self.scp = StorageSCP(cfg, self.spool, on_stored=self._on_stored)
        self.watcher = CompletionWatcher(self.spool, cfg.completion, on_complete=self._on_complete)
        self._assembly_queue: queue.Queue[SeriesRow | None] = queue.Queue()
        self._assembler: threading.Thread | None = None
        self._stopped = threading.Event()

    # ---- wiring ----------------------------------------------------------------------------
    def _on_stored(self, outcome: StoreOutcome, series_uid: str) -> None:
        self.watcher.notify()

    def _on_complete(self, row: SeriesRow) -> None:
        self._assembly_queue.put(row)

    def _assemble_loop(self) -> None:
        while True:
            row = self._assembly_queue.get()
            if row is None:
                return
            try:
                self.assemble(row)
            except Exception:
                log.exception("assembly.failed", series_uid=row.series_uid)

    def assemble(self, row: SeriesRow) -> Assembly:
        t0 = time.perf_counter()
        result = assemble_series(self.spool.instance_paths(row.series_uid), self.cfg.assembly)
        elapsed = time.perf_counter() - t0
        if result.rejected:
            reasons = sorted({r.reason for r in result.rejections})
            moved = self.spool.set_series_state(row.series_uid, REJECTED, ",".join(reasons), row.generation)
            log.warning("series.rejected", series_uid=row.series_uid, reasons=reasons,
                        details=[r.detail for r in result.rejections][:5], assemble_s=round(elapsed, 3))
        else:
            partial = ",".join(sorted({r.reason for r in result.rejections})) or None
            moved = self.spool.set_series_state(row.series_uid, ASSEMBLED, partial, row.generation)
            log.info("series.assembled", series_uid=row.series_uid,
                     volumes=[{"label": v.label, "shape": list(v.shape), "units": v.units} for v in result.volumes],
                     rejected_parts=len(result.rejections), assemble_s=round(elapsed, 3))
        if not moved:
            log.info("series.superseded", series_uid=row.series_uid, note="new instances arrived during assembly")
        elif self.on_assembled is not None:
            self.on_assembled(row, result)
        return result

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.spool.open()
        self._assembler = threading.Thread(target=self._assemble_loop, name="assembler", daemon=True)
        self._assembler.start()
        self.watcher.resume_after_restart()
        self.watcher.start()
        self.scp.start()
        log.info("daemon.started", storage_root=str(self.cfg.storage.root), port=self.scp.port)

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Graceful stop: finish running associations, then the series being assembled.
        Completed series still queued stay complete in the index and resume at the next start."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.scp.stop(drain_timeout_s)
        self.watcher.stop()
        pending = []
        while True:
            try:
                item = self._assembly_queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                pending.append(item.series_uid)
        self._assembly_queue.put(None)
        if self._assembler is not None:
            self._assembler.join(timeout=drain_timeout_s)
        self.spool.close()
        log.info("daemon.stopped", left_for_next_start=len(pending))

    def run_forever(self) -> int:
        """Run until SIGTERM or SIGINT; returns the exit status (0 after a clean drain)."""
        stop = threading.Event()

        def _signal(signum: int, _frame: object) -> None:
            log.info("daemon.signal", signal=signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        while not stop.wait(1.0):
            pass
        self.stop()
        return 0
