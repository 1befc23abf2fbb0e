"""The pipeline worker: one thread (the GPU is one resource) that runs pipelines on slabs. A slab
is a run of consecutive slices with its context slices: a streamed series arrives as several
(`submit_slab`, from the assembler, in order), a batch job as one slab that is the whole volume
(from the SQLite job queue). Each slab goes the same way: the pipeline's stages, its context
cropped off, derived instances encoded and written once, recorded in the outbox for every
destination (the exporter sends them at once); the last slab seals the outbox entries and moves
the job to exporting.

Failure policy: a job whose pipeline fails is tried again up to ``pipeline.max_attempts``; after
that it fails, or with ``on_failure = "passthrough"`` the original volume is sent as a
passthrough derived series. Every failure is published as ``job.failed`` with its reason.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance import audit
from appliance.background import BackgroundLoop
from appliance.config import ApplianceConfig
from appliance.dicom.assemble import assemble_series
from appliance.dicom.derive import derive_datasets, write_derived
from appliance.dicom.export import Outbox
from appliance.dicom.spool import RECEIVING, Spool
from appliance.dicom.stream import Slab, crop
from appliance.events import JobDone, JobFailed, JobStarted, ModelChanged, Publisher, StageDone
from appliance.logging import get_logger
from appliance.pipeline import stages
from appliance.pipeline.jobs import RUNNING, STREAMING, Job, JobQueue
from appliance.volume import Volume

log = get_logger(__name__)


def input_label(item) -> str:
    """The job label of an assembled input: a volume's split label, or "projections"."""
    return getattr(item, "label", None) if isinstance(item, Volume) else "projections"


def _utc(ts: float):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, tz=timezone.utc)


@dataclass
class SlabTask:
    job: Job
    slab: Slab
    final: bool
    pipeline: stages.Pipeline | None = None  # the one the stream began with: one model for the whole series


class Worker(BackgroundLoop):
    thread_name = "pipeline-worker"

    def __init__(
        self,
        cfg: ApplianceConfig,
        spool: Spool,
        jobs: JobQueue,
        outbox: Outbox,
        publisher: Publisher,
        pipelines: dict[str, stages.Pipeline],
        on_exporting: Callable[[Job], None],
    ) -> None:
        super().__init__(interval_s=1.0)
        self.cfg = cfg
        self.spool = spool
        self.jobs = jobs
        self.outbox = outbox
        self.publisher = publisher
        self.pipelines = pipelines
        self.on_exporting = on_exporting
        self.audit = None  # the daemon's `AuditTrail`: a model change is a Software Configuration alert
        self._volumes: dict[int, Volume] = {}  # fresh volumes handed over by the assembler
        self._volumes_lock = threading.Lock()
        self._slabs: collections.deque[SlabTask] = collections.deque()  # streamed slabs, in order
        self._job_stages: dict[int, dict[str, float]] = {}  # stage seconds summed over a job's slabs
        self.failed_streams: set[int] = set()  # jobs whose slab failed: the assembler falls back to batch
        self._pipelines_lock = threading.Lock()  # the assembler (new streams) and this thread ask for pipelines
        self._reload_failed: dict[str, str] = {}  # pipeline -> the model that would not load (not retried)

    # ---- hand-over -------------------------------------------------------------------------
    def submit(self, job: Job, volume: Volume) -> None:
        """Keep the assembled volume for ``job`` (saves assembling it again) and wake up."""
        with self._volumes_lock:
            self._volumes[job.id] = volume
        self.notify()

    def submit_slab(self, job: Job, slab: Slab, final: bool, pipeline: stages.Pipeline | None = None) -> None:
        """A slab of a streamed series (from the assembler thread, in slab order), with the
        pipeline its stream began with."""
        self._slabs.append(SlabTask(job, slab, final, pipeline))
        self.notify()

    def pipeline(self, name: str) -> stages.Pipeline:
        """The pipeline a new job gets. Built at start; another name (a job queued under an older
        configuration) is built now; a pipeline whose model the store changed since
        (`appliance models activate | rollback`) is built again, and if the new model does not load
        the one in use stays, said once in the log and as a ``model.changed`` event with ok false."""
        with self._pipelines_lock:
            current = self.pipelines.get(name)
            if current is None:
                current = self.pipelines[name] = stages.build(name, self.cfg)
                return current
            if current.wanted is None:
                return current
            wanted = current.wanted()
            if wanted == current.model or self._reload_failed.get(name) == wanted:
                return current
            try:
                fresh = stages.build(name, self.cfg)
            except Exception as exc:
                self._reload_failed[name] = wanted
                detail = f"{type(exc).__name__}: {exc}"
                log.error("pipeline.model_not_loaded", pipeline=name, wanted=wanted, kept=current.version,
                          detail=detail)
                self.publisher.publish(ModelChanged(pipeline=name, ok=False, previous=current.version,
                                                    current=current.version, detail=detail))
                return current
            self._reload_failed.pop(name, None)
            self.pipelines[name] = fresh
            log.info("pipeline.model_changed", pipeline=name, previous=current.version, current=fresh.version,
                     card=fresh.model)
            self.publisher.publish(ModelChanged(pipeline=name, ok=True, previous=current.version,
                                                current=fresh.version, detail=f"loaded {fresh.model}"))
            if self.audit is not None:
                self.audit.security_alert(audit.SOFTWARE_CONFIGURATION, audit.SUCCESS, self.cfg.node.ae_title,
                                          f"pipeline {name}: model {current.version} -> {fresh.version} ({fresh.model})")
            return fresh

    def discard(self, job_id: int) -> None:
        """Forget the volume kept for a job that will not run (superseded)."""
        with self._volumes_lock:
            self._volumes.pop(job_id, None)

    def _volume_for(self, job: Job) -> Volume:
        with self._volumes_lock:
            volume = self._volumes.pop(job.id, None)
        if volume is not None:
            return volume
        # After a restart: assemble the series again from the spool (deterministic).
        result = assemble_series(self.spool.instance_paths(job.series_uid), self.cfg.assembly)
        for item in [*result.volumes, *result.projections]:
            if input_label(item) == job.label:
                return item
        raise stages.StageError("assemble", "volume_missing", f"no volume labelled {job.label!r} in the series now")

    # ---- one job ---------------------------------------------------------------------------
    def _already_exported(self, job: Job) -> bool:
        """A job requeued after a crash whose derived series was already handed to the outbox for
        every destination goes straight back to exporting: nothing is computed or sent twice."""
        entries = self.outbox.for_job(job.id)
        if not job.destinations or {e.destination for e in entries} < set(job.destinations):
            return False
        if not all(e.sealed for e in entries):
            return False  # streamed in part before the stop: processed whole now, confirmed ones kept
        self.discard(job.id)
        self.jobs.exporting(job.id, entries[0].derived_series_uid, job.timings)
        log.info("job.resumed_exporting", job_id=job.id, derived_series_uid=entries[0].derived_series_uid)
        self.on_exporting(self.jobs.get(job.id))
        return True

    def _publish_started(self, job: Job) -> None:
        self.publisher.publish(JobStarted(
            study_uid=job.study_uid, series_uid=job.series_uid, job_id=job.id, pipeline=job.pipeline,
            label=job.label, attempt=max(1, job.attempts), started_at=_utc(job.started_at or time.time()),
        ))
        log.info("job.started", job_id=job.id, pipeline=job.pipeline, series_uid=job.series_uid, attempt=job.attempts)

    def process(self, job: Job) -> None:
        """A job from the queue: the whole volume as one slab."""
        if self._already_exported(job):
            return
        series = self.spool.series(job.series_uid)
        if series is not None and series.state == RECEIVING and series.generation == job.generation:
            # A streamed job cut off by a restart while its series still arrives: completion decides.
            self.jobs.streaming(job.id)
            log.info("job.waits_for_series", job_id=job.id, series_uid=job.series_uid)
            return
        self._publish_started(job)
        try:
            volume = self._volume_for(job)
            self.run_slab(job, volume, None, final=True)
        except Exception as exc:  # stages, derive and the outbox alike go through the failure policy
            self._failed(job, exc)

    def _process_slab(self, task: SlabTask) -> None:
        job, index = task.job, task.slab.index
        if index == 0:
            self._publish_started(job)
        if job.id in self.failed_streams:
            return  # an earlier slab failed: the series goes the batch way at completion
        try:
            self.run_slab(job, task.slab.volume, task.slab.crop, task.final, index, task.pipeline)
        except Exception as exc:
            reason = exc.reason if isinstance(exc, stages.StageError) else "pipeline_error"
            detail = exc.detail if isinstance(exc, stages.StageError) else f"{type(exc).__name__}: {exc}"
            log.error("slab.failed", job_id=job.id, slab=index, reason=reason, detail=detail)
            self.publisher.publish(JobFailed(
                study_uid=job.study_uid, series_uid=job.series_uid, job_id=job.id, reason=reason,
                detail=f"slab {index}: {detail}; the series will be processed whole", pipeline=job.pipeline,
                stage=getattr(exc, "stage", None), will_retry=True,
            ))
            self.failed_streams.add(job.id)
            if task.final:  # no later completion will come: go the batch way now
                self.jobs.requeue(job.id, reason, detail)
                self.notify()

    def run_slab(self, job: Job, volume: Volume, crop_to: tuple[int, int] | None, final: bool,
                 index: int | None = None, pipeline: stages.Pipeline | None = None) -> None:
        """Pipeline, crop, derive, write, outbox for one slab (``crop_to`` None: the whole volume)."""
        pipeline = pipeline or self.pipeline(job.pipeline)
        attempt = max(1, job.attempts)
        slices = (crop_to[1] - crop_to[0]) if crop_to else (volume.shape[0] if isinstance(volume, Volume) else None)
        result, stage_seconds = pipeline.run(volume, on_stage_done=lambda name, s: self.publisher.publish(StageDone(
            study_uid=job.study_uid, series_uid=job.series_uid, job_id=job.id, pipeline=job.pipeline,
            stage=name, seconds=s, attempt=attempt, slab=index,
            slices=slices,
        )))
        if crop_to is not None:
            result = crop(result, *crop_to)
        totals = self._job_stages.setdefault(job.id, {})
        for name, secs in stage_seconds.items():
            totals[name] = totals.get(name, 0.0) + secs
        self._deliver(job, result, pipeline, final)

    def _deliver(self, job: Job, result: Volume, pipeline: stages.Pipeline, final: bool = True) -> None:
        t0 = time.perf_counter()
        datasets = derive_datasets(result, pipeline.name, pipeline.version, self.cfg.dicom.uid_root,
                                   self.cfg.derived.series_number_offset)
        derived_uid = str(datasets[0].SeriesInstanceUID)
        paths, changed = write_derived(datasets, self.outbox.folder_for(job.id, derived_uid))
        totals = self._job_stages.setdefault(job.id, {})
        totals["derive"] = totals.get("derive", 0.0) + time.perf_counter() - t0
        files = [(str(ds.SOPInstanceUID), p) for ds, p in zip(datasets, paths)]
        current = self.jobs.get(job.id)
        if current is not None and current.state not in (RUNNING, STREAMING):
            # Superseded while it ran (new instances arrived): its result must not be sent.
            log.info("job.result_dropped", job_id=job.id, state=current.state, reason=current.reason)
            self._job_stages.pop(job.id, None)
            return
        self.outbox.add(job.id, list(job.destinations), derived_uid, files, sealed=final, changed=changed)
        if not final:
            log.debug("slab.delivered", job_id=job.id, instances=len(files))
            self.on_exporting(None)  # wake the exporter: these instances can go now
            return
        stage_totals = self._job_stages.pop(job.id, {})
        timings = {f"stage:{k}": v for k, v in stage_totals.items() if k != "derive"}
        timings["derive"] = stage_totals.get("derive", 0.0)
        if current is not None and current.started_at is not None:
            timings["queue_wait"] = max(0.0, current.started_at - current.queued_at)
            timings["process"] = time.time() - current.started_at
        self.jobs.exporting(job.id, derived_uid, timings)
        instances = self.outbox.instance_count(self.outbox.for_job(job.id)[0].id) if job.destinations else len(files)
        log.info("job.processed", job_id=job.id, pipeline=pipeline.name, derived_series_uid=derived_uid,
                 instances=instances, destinations=list(job.destinations),
                 timings={k: round(v, 3) for k, v in timings.items()})
        self.publisher.publish(
            JobDone(study_uid=job.study_uid, series_uid=job.series_uid, job_id=job.id, pipeline=pipeline.name,
                    pipeline_version=pipeline.version, label=job.label, derived_series_uid=derived_uid,
                    instances=instances, timings=timings),
            buffer=result.voxels if self.cfg.events.include_results else None,
        )
        self.on_exporting(self.jobs.get(job.id))

    def _failed(self, job: Job, exc: Exception) -> None:
        reason = exc.reason if isinstance(exc, stages.StageError) else "pipeline_error"
        detail = exc.detail if isinstance(exc, stages.StageError) else f"{type(exc).__name__}: {exc}"
        stage = exc.stage if isinstance(exc, stages.StageError) else None
        retry = job.attempts < self.cfg.pipeline.max_attempts
        log.error("job.failed", job_id=job.id, pipeline=job.pipeline, reason=reason, detail=detail,
                  stage=stage, will_retry=retry)
        self.publisher.publish(JobFailed(
            study_uid=job.study_uid, series_uid=job.series_uid, job_id=job.id, reason=reason, detail=detail,
            pipeline=job.pipeline, stage=stage, will_retry=retry,
        ))
        if retry:
            self.jobs.requeue(job.id, reason, detail)
            return
        if self.cfg.pipeline.on_failure == "passthrough":
            try:
                volume = self._volume_for(job)
                fallback = self.pipeline("passthrough")
                result, _ = fallback.run(volume)
                result.provenance.append(f"{job.pipeline} failed ({reason}); sent unprocessed")
                self._deliver(job, result, fallback)
                return
            except Exception as exc2:
                detail = f"{detail}; passthrough also failed: {type(exc2).__name__}: {exc2}"
        self.jobs.failed(job.id, reason, detail)

    # ---- thread ----------------------------------------------------------------------------
    def tick(self) -> bool:
        """Process the next streamed slab, else the next queued job; False when there was none.
        Stopping waits for the slab or job in hand: it is never cut off half-written."""
        if self._slabs:
            task = self._slabs.popleft()
            try:
                self._process_slab(task)
            except Exception:
                log.exception("slab.crashed", job_id=task.job.id)
            return True
        job = self.jobs.take_next()
        if job is None:
            return False
        try:
            self.process(job)
        except Exception as exc:  # a bug must not kill the worker: fail the job, go on
            log.exception("job.crashed", job_id=job.id)
            self.jobs.failed(job.id, "internal_error", f"{type(exc).__name__}: {exc}")
        return True
