"""The daemon: wires the data path, one way, each hand-over a plain call or durable state.

    SCP -> spool -> assembler (streams slabs as instances arrive; completion closes the series)
        -> routing -> job -> worker (stages, derive, slab by slab) -> outbox -> exporter (C-STORE)
        -> release of the received instances

Three processes by default: the receiver (SCP and spool, `dicom.scp_process`), this one (assembler,
completion, worker, events) and the exporter (`dicom.export_process`). They share only SQLite
state and files, and talk over pipes in one direction each: stored instances' headers from the
receiver, wake-ups to and delivery reports from the exporter.

A series whose pipeline streams goes through slab by slab while it arrives (`dicom.stream`); any
other series, and any series that leaves the streaming path, is one slab = the whole series.

Every hand-over is recorded in SQLite (spool index, jobs, outbox), so a restart resumes where the
previous process stopped. Events go to ZeroMQ as they happen; they are notifications, the SQLite
state is the record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pydicom

from appliance import __version__, audit
from appliance.config import ApplianceConfig
from appliance.dicom.assemble import Assembly, Rejection, assemble_series, plan_series
from appliance.dicom.completion import CompletionWatcher
from appliance.dicom.export import Entry, Exporter, Outbox
from appliance.dicom.scp import StorageSCP
from appliance.dicom.spool import ASSEMBLED, COMPLETE, RECEIVING, REJECTED, SeriesRow, Spool, StoreOutcome
from appliance.dicom.stream import SeriesStream, add_instance, final_slabs, ready_slabs
from appliance.dicom.validate import InstanceHeader
from appliance.events import (ExportDone, Health, JobFailed, JobQueued, Publisher, SeriesReceived, SeriesRejected,
                              StreamFallback)
from appliance.logging import get_logger
from appliance.pipeline import stages
from appliance.pipeline.jobs import DONE, EXPORTING, QUEUED, RUNNING, STREAMING, Job, JobQueue
from appliance.pipeline.routing import route
from appliance.pipeline.worker import Worker, input_label
from appliance.volume import Volume
from appliance import sdnotify
from engines.cache import atomic_write

log = get_logger(__name__)


def _utc(ts: float | None) -> datetime:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), tz=timezone.utc)


class Daemon:
    def __init__(self, cfg: ApplianceConfig) -> None:
        self.cfg = cfg
        unknown = sorted({r.pipeline for r in cfg.routes} - set(stages.available()))
        if unknown:
            raise ValueError(f"routes name unknown pipeline(s) {unknown}; available: {stages.available()}")
        # Built once, here: loading a model (or a bad one) happens at start, not at the first study.
        names = sorted({r.pipeline for r in cfg.routes} | {"passthrough"})
        self.pipelines = {name: stages.build(name, cfg) for name in names}
        root = cfg.storage.root
        self.spool = Spool(root, cfg.limits, keep_refused=cfg.storage.keep_rejected)
        self.jobs = JobQueue(root / "jobs.sqlite")
        self.outbox = Outbox(root)
        self.publisher = Publisher(cfg.events, appliance=cfg.node.ae_title)
        self.audit = cfg.audit_trail()
        log_level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        if cfg.node.process:
            from appliance.dicom.scp_process import ReceiverProcess

            self.scp = ReceiverProcess(cfg, on_stored=self._on_stored, on_released=self._on_released,
                                       log_level=log_level)
        else:
            self.scp = StorageSCP(cfg, self.spool, on_stored=self._on_stored, on_released=self._on_released)
        self.watcher = CompletionWatcher(self.spool, cfg.completion, on_complete=self._on_complete)
        self.worker = Worker(cfg, self.spool, self.jobs, self.outbox, self.publisher, self.pipelines,
                             on_exporting=self._on_exporting)
        self.worker.audit = self.audit
        if cfg.export.process:
            from appliance.dicom.export_process import ExporterProcess

            self.exporter = ExporterProcess(cfg, self.outbox, on_sent=self._on_export_sent,
                                            on_gave_up=self._on_export_gave_up, log_level=log_level)
        else:
            self.exporter = Exporter(self.outbox, cfg.destinations, cfg.export, cfg.node.ae_title,
                                     on_sent=self._on_export_sent, on_gave_up=self._on_export_gave_up)
        self._assembly_queue: queue.Queue[tuple | None] = queue.Queue()
        self.streams: dict[str, SeriesStream] = {}  # series uid -> its stream (assembler thread only)
        self._assembler: threading.Thread | None = None
        self._health: threading.Thread | None = None
        self._watchdog = sdnotify.Watchdog(self.healthy)
        self._started_at = time.monotonic()
        self._stopped = threading.Event()

    # ---- receive -> stream / assemble -> queue ---------------------------------------------
    def _on_stored(self, outcome: StoreOutcome, header: InstanceHeader) -> None:
        self._assembly_queue.put(("instance", outcome, header))
        self.watcher.notify()

    def _on_released(self, series_uids: list[str]) -> None:
        self.watcher.released(series_uids)

    def _on_complete(self, row: SeriesRow) -> None:
        why = self.watcher.why.pop(row.series_uid, None) or (
            "expected_count" if row.expected_count and row.instance_count >= row.expected_count else "resumed")
        self.publisher.publish(SeriesReceived(
            study_uid=row.study_uid, series_uid=row.series_uid, instances=row.instance_count,
            calling_ae=row.calling_ae, modality=row.modality, received_first=_utc(row.first_received),
            received_last=_utc(row.last_received), completed_at=_utc(None), why=why,
        ))
        self._assembly_queue.put(("complete", row))

    def _assemble_loop(self) -> None:
        while True:
            item = self._assembly_queue.get()
            if item is None:
                return
            try:
                if item[0] == "instance":
                    self._stream_instance(item[1], item[2])
                else:
                    self.assemble(item[1])
            except Exception:
                log.exception("assembly.failed", series_uid=getattr(item[-1], "series_uid", None))

    # ---- streaming ---------------------------------------------------------------------------
    def _new_stream(self, row: SeriesRow, header: InstanceHeader) -> SeriesStream:
        stream = SeriesStream(row.series_uid, row.generation, row.calling_ae, context=1)
        rule = route(self.cfg.routes, row.calling_ae, header.dataset, "images") if header.dataset else None
        pipeline = self.worker.pipeline(rule.pipeline) if rule is not None and rule.pipeline in self.pipelines else None
        if not self.cfg.streaming.enabled or pipeline is None or not pipeline.streams or not rule.destinations:
            stream.fallback, stream.fallback_detail = "batch_pipeline", "the route's pipeline needs the whole series"
        else:
            stream.context_model = pipeline.context_slices
            stream.context = max(1, pipeline.context_slices)
            stream.rule = rule
            stream.pipeline = pipeline
            existing = [j for j in self.jobs.for_series(row.series_uid, row.generation) if j.label == ""]
            if existing:  # a job from before a restart: the batch way finishes it
                stream.fallback, stream.fallback_detail = "resumed", "streaming began before a restart"
        return stream

    def _stream_instance(self, outcome: StoreOutcome, header: InstanceHeader) -> None:
        row = self.spool.series(header.series_uid)
        if row is None or row.state != RECEIVING:
            return  # completed (or released) meanwhile: the completion path has it
        stream = self.streams.get(row.series_uid)
        if stream is None or stream.generation != row.generation:
            stream = self.streams[row.series_uid] = self._new_stream(row, header)
        was_streaming = stream.streaming
        if header.dataset is not None:
            add_instance(stream, header.dataset, outcome.path, outcome.kind, self.cfg.assembly)
        else:
            stream.fallback = stream.fallback or "no_header"
        if stream.job_id is not None and stream.job_id in self.worker.failed_streams:
            stream.fallback = stream.fallback or "slab_failed"
        if was_streaming and not stream.streaming:
            self._publish_fallback(row, stream)
            return
        for slab in ready_slabs(stream, self.cfg.assembly, self.cfg.streaming.slab_slices):
            self._submit_slab(row, stream, slab, final=False)

    def _publish_fallback(self, row: SeriesRow, stream: SeriesStream) -> None:
        if stream.job_id is None and stream.fallback == "batch_pipeline":
            return  # never meant to stream: nothing fell back
        self.publisher.publish(StreamFallback(
            study_uid=row.study_uid, series_uid=row.series_uid, job_id=stream.job_id, reason=stream.fallback,
            detail=stream.fallback_detail, streamed_slices=len(stream.emitted)))

    def _submit_slab(self, row: SeriesRow, stream: SeriesStream, slab, final: bool) -> None:
        if stream.job_id is None:
            rule = stream.rule
            job, new = self.jobs.enqueue(
                series_uid=row.series_uid, generation=row.generation, label="", study_uid=row.study_uid,
                calling_ae=row.calling_ae, pipeline=rule.pipeline, destinations=rule.destinations,
                received_first=row.first_received, received_last=None, completed_at=None, state=STREAMING,
            )
            self.jobs.streaming(job.id, started_at=time.time())
            stream.job_id = job.id
            stream.job = self.jobs.get(job.id)
            self.publisher.publish(JobQueued(
                study_uid=row.study_uid, series_uid=row.series_uid, job_id=job.id, pipeline=job.pipeline,
                label="", shape=list(slab.volume.shape), queued_at=_utc(job.queued_at),
            ))
        self.worker.submit_slab(stream.job, slab, final, stream.pipeline)

    def _finish_stream(self, row: SeriesRow, stream: SeriesStream, paths) -> bool:
        """At completion of a series that streamed: its last slab, if the whole series is what the
        streamer saw. False: it falls back to batch."""
        if stream.job_id in self.worker.failed_streams:
            stream.fallback = stream.fallback or "slab_failed"
        for path in paths:  # instances whose hand-over the completion overtook
            if stream.streaming and path not in stream.headers:
                try:
                    add_instance(stream, pydicom.dcmread(path, stop_before_pixels=True), path, "stored",
                                 self.cfg.assembly)
                except Exception as exc:
                    stream.fallback, stream.fallback_detail = "unreadable", f"{type(exc).__name__}: {exc}"
        if stream.streaming:
            plan = plan_series(paths, self.cfg.assembly, stream.headers)
            whole = plan.planned[0] if len(plan.planned) == 1 else None
            rule = route(self.cfg.routes, row.calling_ae, plan.headers[whole.order[0].path], "images") if whole else None
            if plan.rejections or plan.projection_paths or whole is None or whole.label:
                reasons = sorted({r.reason for r in plan.rejections}) or ["split"]
                stream.fallback, stream.fallback_detail = ",".join(reasons), "judged on the whole series"
            elif {f.sop_instance_uid for f in whole.order} != set(stream.frames):
                stream.fallback, stream.fallback_detail = "instances_changed", "the series is not what streamed"
            elif rule is None or rule.pipeline != stream.rule.pipeline or rule.destinations != stream.rule.destinations:
                stream.fallback, stream.fallback_detail = "route_changed", "the series' first slice routes elsewhere"
            else:
                slabs = final_slabs(stream, whole.order, self.cfg.assembly)
                if stream.streaming:
                    self.jobs.series_completed(stream.job_id, row.last_received,
                                               self.spool.series(row.series_uid).completed_at)
                    stream.job = self.jobs.get(stream.job_id)
                    for i, slab in enumerate(slabs):
                        self._submit_slab(row, stream, slab, final=i == len(slabs) - 1)
                    if not slabs:  # every slice went already (cannot happen with context >= 1)
                        self.jobs.requeue(stream.job_id, "stream_fallback", "nothing left for the last slab")
                        self.worker.notify()
                    self.spool.set_series_state(row.series_uid, ASSEMBLED, None, row.generation)
                    log.info("series.streamed", series_uid=row.series_uid, slabs=stream.slabs,
                             instances=len(stream.frames), job_id=stream.job_id)
                    return True
        self._publish_fallback(row, stream)
        return False

    def assemble(self, row: SeriesRow) -> Assembly | None:
        stream = self.streams.pop(row.series_uid, None)
        if stream is not None and stream.generation != row.generation:
            stream = None
        paths = self.spool.instance_paths(row.series_uid)
        if stream is not None and stream.job_id is not None and self._finish_stream(row, stream, paths):
            return None
        t0 = time.perf_counter()
        try:
            result = assemble_series(paths, self.cfg.assembly, stream.headers if stream is not None else None)
        except Exception as exc:  # a bug or an input nobody foresaw: reject with a reason, never stick
            log.exception("assembly.crashed", series_uid=row.series_uid)
            result = Assembly(rejections=[Rejection("internal_error", f"{type(exc).__name__}: {exc}", "", 0)])
        assemble_s = time.perf_counter() - t0
        if result.rejected:
            reasons = sorted({r.reason for r in result.rejections})
            self.spool.set_series_state(row.series_uid, REJECTED, ",".join(reasons), row.generation)
            streamed = len(stream.emitted) if stream is not None else 0
            log.warning("series.rejected", series_uid=row.series_uid, reasons=reasons,
                        details=[r.detail for r in result.rejections][:5], assemble_s=round(assemble_s, 3),
                        streamed_instances=streamed)
            for job in self.jobs.for_series(row.series_uid, row.generation):
                if job.state == STREAMING:
                    self.jobs.failed(job.id, "rejected", ",".join(reasons))
            self.publisher.publish(SeriesRejected(study_uid=row.study_uid, series_uid=row.series_uid,
                                                  reasons=reasons, details=[r.detail for r in result.rejections],
                                                  streamed_instances=streamed))
            return result
        created = self._enqueue(row, result, assemble_s)
        partial = ",".join(sorted({r.reason for r in result.rejections})) or None
        if not self.spool.set_series_state(row.series_uid, ASSEMBLED, partial, row.generation):
            # New instances arrived meanwhile: the next completion makes fresh jobs.
            for job in created:
                self.jobs.failed(job.id, "superseded", "new instances arrived during assembly")
                self.worker.discard(job.id)
            log.info("series.superseded", series_uid=row.series_uid)
            return result
        log.info("series.assembled", series_uid=row.series_uid, assemble_s=round(assemble_s, 3),
                 volumes=[{"label": v.label, "shape": list(v.shape), "units": v.units} for v in result.volumes],
                 rejected_parts=len(result.rejections), jobs=[j.id for j in created])
        if created:
            self.worker.notify()
        return result

    def _enqueue(self, row: SeriesRow, result: Assembly, assemble_s: float) -> list[Job]:
        created = []
        completed_at = self.spool.series(row.series_uid).completed_at  # one read for every volume
        for item in [*result.volumes, *result.projections]:
            data = "images" if isinstance(item, Volume) else "projections"
            label = input_label(item)
            rule = route(self.cfg.routes, row.calling_ae, item.header, data)
            if rule is None:
                log.warning("series.unrouted", series_uid=row.series_uid, label=label, data=data,
                            note="no routing rule matches; the series stays in the spool")
                continue
            job, new = self.jobs.enqueue(
                series_uid=row.series_uid, generation=row.generation, label=label,
                study_uid=row.study_uid, calling_ae=row.calling_ae, pipeline=rule.pipeline,
                destinations=rule.destinations, received_first=row.first_received,
                received_last=row.last_received, completed_at=completed_at,
            )
            if not new and job.state == STREAMING:
                # Its streaming ended (fallback, failed slab or restart): the whole volume goes now,
                # and only instances whose bytes differ from what was streamed are sent again.
                self.jobs.requeue(job.id, "stream_fallback", "processed whole after streaming")
                job = self.jobs.get(job.id)
            elif not new:
                continue
            created.append(job)
            self.publisher.publish(JobQueued(
                study_uid=row.study_uid, series_uid=row.series_uid, job_id=job.id, pipeline=job.pipeline,
                label=job.label, shape=list(item.shape if data == "images" else item.data.shape),
                queued_at=_utc(job.queued_at),
            ))
            self.worker.submit(job, item)
        return created

    # ---- export -> release -----------------------------------------------------------------
    def _on_exporting(self, job: Job | None) -> None:
        """From the worker: a slab's instances are in the outbox (``job`` None), or the job's last
        slab is and the job is exporting."""
        if job is not None and not job.destinations:
            self.jobs.done(job.id)
            log.info("job.done", job_id=job.id, note="no destinations: nothing to send, sources kept")
            return
        self.exporter.notify()

    def _on_export_sent(self, entry: Entry) -> None:
        self._audit_export(entry, audit.SUCCESS, f"derived series {entry.derived_series_uid} to {entry.destination}"
                           f" in {entry.attempts + 1} attempt(s)")
        job = self.jobs.get(entry.job_id)
        end_to_end = time.time() - job.received_first if job and job.received_first else None
        self.publisher.publish(ExportDone(
            study_uid=job.study_uid if job else None, series_uid=job.series_uid if job else None,
            job_id=entry.job_id, destination=entry.destination, derived_series_uid=entry.derived_series_uid,
            instances=self.outbox.instance_count(entry.id), attempts=entry.attempts,
            seconds=entry.seconds or 0.0, end_to_end_s=end_to_end,
        ))
        if job is None or job.state != EXPORTING:
            return
        entries = self.outbox.for_job(job.id)
        delivered = {e.destination for e in entries if e.state == "sent"}
        if not set(job.destinations) <= delivered:
            return  # another destination still waits: the job is done only when all have it
        self.jobs.done(job.id)
        self.outbox.remove_files(entry)
        log.info("job.delivered", job_id=job.id, end_to_end_s=round(end_to_end or 0, 3))
        self._maybe_release(job)

    def _maybe_release(self, job: Job) -> None:
        siblings = self.jobs.for_series(job.series_uid, job.generation)
        if self.cfg.export.release_sources != "delete" or any(j.state != DONE for j in siblings):
            return
        removed = self.spool.release(job.series_uid, job.generation)
        log.info("series.released", series_uid=job.series_uid, instances_removed=removed)

    def _audit_export(self, entry: Entry, outcome: str, description: str) -> None:
        """DICOM Instances Transferred (action R) for a derived series and one destination."""
        files = sorted(Path(entry.folder).glob("*.dcm"))[:1] if entry.folder else []
        studies: dict[str, audit.StudyTransfer] = {}
        if files:
            try:
                ds = pydicom.dcmread(files[0], stop_before_pixels=True)
                study = studies[str(ds.StudyInstanceUID)] = audit.StudyTransfer.of(ds)
                study.add(str(ds.SOPClassUID), self.outbox.instance_count(entry.id))
            except Exception as exc:  # the record is still written, with what is known
                log.warning("audit.export_unread", entry_id=entry.id, error=str(exc))
        dest = self.cfg.destinations.get(entry.destination)
        self.audit.instances_transferred(
            "R", audit.Node(self.cfg.node.ae_title, None, requestor=True),
            audit.Node(dest.ae_title if dest else entry.destination, dest.host if dest else None), studies, outcome,
            description)

    def _on_export_gave_up(self, entry: Entry) -> None:
        self._audit_export(entry, audit.SERIOUS_FAILURE, f"gave up on {entry.destination}: {entry.last_error}")
        job = self.jobs.get(entry.job_id)
        detail = f"{entry.destination}: {entry.last_error} (after {entry.attempts} attempts)"
        if job is not None:
            self.jobs.failed(job.id, "export_gave_up", detail)
        self.publisher.publish(JobFailed(
            study_uid=job.study_uid if job else None, series_uid=job.series_uid if job else None,
            job_id=entry.job_id, reason="export_gave_up", detail=detail, pipeline=job.pipeline if job else None,
        ))

    # ---- health ----------------------------------------------------------------------------
    def healthy(self) -> bool:
        """For the systemd watchdog: every thread of the data path is alive."""
        assembler_alive = self._assembler is not None and self._assembler.is_alive()
        return (assembler_alive and self.worker.alive and self.exporter.alive and self.watcher.alive
                and self.scp.alive and not self._stopped.is_set())

    def _health_loop(self) -> None:
        while not self._stopped.wait(self.cfg.events.health_interval_s):
            try:
                self.publisher.publish(Health(
                    version=__version__, uptime_s=time.monotonic() - self._started_at,
                    queued_jobs=self.jobs.count(QUEUED, RUNNING), pending_exports=self.outbox.pending_count(),
                    free_bytes=self.spool.free_bytes(),
                ))
            except Exception:
                log.exception("health.failed")

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.spool.open()
        crashed = self.jobs.open(self.cfg.pipeline.max_attempts)
        self.outbox.open()
        self.publisher.start()
        for job in crashed:
            log.error("job.crashed", job_id=job.id, series_uid=job.series_uid, attempts=job.attempts)
            self.publisher.publish(JobFailed(
                study_uid=job.study_uid, series_uid=job.series_uid, job_id=job.id, reason="crashed",
                detail=f"the appliance stopped while processing this job {job.attempts} time(s)",
                pipeline=job.pipeline,
            ))
        for job in self.jobs.in_state(STREAMING):
            # Streaming was cut off by the stop. A series still arriving or complete goes the batch
            # way at its completion (`_enqueue`); one already handed on is processed whole now.
            series = self.spool.series(job.series_uid)
            if series is None or series.generation != job.generation or series.state not in (RECEIVING, COMPLETE):
                self.jobs.requeue(job.id, "resumed", "streaming was cut off by a stop; processed whole")
        self._assembler = threading.Thread(target=self._assemble_loop, name="assembler", daemon=True)
        self._assembler.start()
        self.worker.start()
        self.exporter.start()
        self.watcher.resume_after_restart()
        self.watcher.start()
        self.scp.start()
        self._health = threading.Thread(target=self._health_loop, name="health", daemon=True)
        self._health.start()
        sdnotify.notify("READY=1")
        tls_port = self.scp.tls_port
        sdnotify.notify(f"STATUS=listening on port {self.scp.port}" + (f", TLS on {tls_port}" if tls_port else ""))
        self._watchdog.start()
        self.audit.application(started=True, description=f"appliance {__version__}, port {self.scp.port}"
                               + (f", TLS port {tls_port}" if tls_port else ""))
        self._audit_changes()
        log.info("daemon.started", storage_root=str(self.cfg.storage.root), port=self.scp.port, tls_port=tls_port,
                 events=self.publisher.endpoint, pending_jobs=self.jobs.count(QUEUED, RUNNING, EXPORTING))

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Graceful stop: no new associations, running ones finish, the job in hand finishes.
        Queued jobs, pending exports and completed series resume at the next start."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        sdnotify.notify("STOPPING=1")
        self._watchdog.stop()
        self.scp.stop(drain_timeout_s)
        self.watcher.stop()
        self._assembly_queue.put(None)
        if self._assembler is not None:
            self._assembler.join(drain_timeout_s)
        self.worker.stop(drain_timeout_s)
        self.exporter.stop(drain_timeout_s)
        self.publisher.stop()
        self.outbox.close()
        self.jobs.close()
        self.spool.close()
        self.audit.application(started=False)
        self.audit.close()
        log.info("daemon.stopped")

    def _audit_changes(self) -> None:
        """A Security Alert when the configuration, the software version or a model differs from
        the last start's (the state lies beside the audit log)."""
        state_path = self.audit.path.parent / "last-start.json"
        now = {
            "version": __version__,
            "config_sha256": hashlib.sha256(self.cfg.model_dump_json().encode()).hexdigest(),
            "models": {name: p.version for name, p in sorted(self.pipelines.items())},
        }
        try:
            before = json.loads(state_path.read_text())
        except (OSError, ValueError):
            before = None
        if before is not None:
            if before.get("config_sha256") != now["config_sha256"]:
                self.audit.security_alert(audit.SECURITY_CONFIGURATION, audit.SUCCESS, self.cfg.node.ae_title,
                                          "the configuration differs from the last start's "
                                          f"(sha256 {now['config_sha256'][:16]}, was {str(before.get('config_sha256'))[:16]})")
            changed = [f"appliance {before.get('version')} -> {now['version']}"] if before.get("version") != \
                now["version"] else []
            changed += [f"{n} {before.get('models', {}).get(n)} -> {v}" for n, v in now["models"].items()
                        if before.get("models", {}).get(n) != v]
            if changed:
                self.audit.security_alert(audit.SOFTWARE_CONFIGURATION, audit.SUCCESS, self.cfg.node.ae_title,
                                          "software changed since the last start: " + "; ".join(changed))
        try:
            atomic_write(state_path, json.dumps(now, indent=1).encode())
        except OSError as exc:
            log.warning("audit.state_not_written", path=str(state_path), error=str(exc))

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

