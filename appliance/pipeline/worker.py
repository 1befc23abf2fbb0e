"""The pipeline worker: takes queued jobs one at a time (the GPU is one resource), runs the
pipeline's stages on the volume, writes the derived series into the outbox and records it for
every destination.

Failure policy: a job whose pipeline fails is tried again up to ``pipeline.max_attempts``; after
that it fails, or with ``on_failure = "passthrough"`` the original volume is sent as a
passthrough derived series. Every failure is published as ``job.failed`` with its reason.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from appliance.background import BackgroundLoop
from appliance.config import ApplianceConfig
from appliance.dicom.assemble import assemble_series
from appliance.dicom.derive import derive_datasets, write_derived
from appliance.dicom.export import Outbox
from appliance.dicom.spool import Spool
from appliance.events import JobDone, JobFailed, JobStarted, Publisher, StageDone
from appliance.logging import get_logger
from appliance.pipeline import stages
from appliance.pipeline.jobs import RUNNING, Job, JobQueue
from appliance.volume import Volume

log = get_logger(__name__)


def input_label(item) -> str:
    """The job label of an assembled input: a volume's split label, or "projections"."""
    return getattr(item, "label", None) if isinstance(item, Volume) else "projections"


def _utc(ts: float):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, tz=timezone.utc)


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
        self._volumes: dict[int, Volume] = {}  # fresh volumes handed over by the assembler
        self._volumes_lock = threading.Lock()

    # ---- hand-over -------------------------------------------------------------------------
    def submit(self, job: Job, volume: Volume) -> None:
        """Keep the assembled volume for ``job`` (saves assembling it again) and wake up."""
        with self._volumes_lock:
            self._volumes[job.id] = volume
        self.notify()

    def _pipeline(self, name: str) -> stages.Pipeline:
        """The pipelines the daemon built at start; another name (a job queued under an older
        configuration) is built now."""
        if name not in self.pipelines:
            self.pipelines[name] = stages.build(name, self.cfg)
        return self.pipelines[name]

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
        self.discard(job.id)
        self.jobs.exporting(job.id, entries[0].derived_series_uid, job.timings)
        log.info("job.resumed_exporting", job_id=job.id, derived_series_uid=entries[0].derived_series_uid)
        self.on_exporting(self.jobs.get(job.id))
        return True

    def process(self, job: Job) -> None:
        if self._already_exported(job):
            return
        self.publisher.publish(JobStarted(
            study_uid=job.study_uid, series_uid=job.series_uid, job_id=job.id, pipeline=job.pipeline,
            label=job.label, attempt=job.attempts, started_at=_utc(job.started_at or time.time()),
        ))
        log.info("job.started", job_id=job.id, pipeline=job.pipeline, series_uid=job.series_uid, attempt=job.attempts)
        try:
            volume = self._volume_for(job)
            pipeline = self._pipeline(job.pipeline)
            result, stage_seconds = pipeline.run(volume, on_stage_done=lambda name, s: self.publisher.publish(StageDone(
                study_uid=job.study_uid, series_uid=job.series_uid, job_id=job.id, pipeline=job.pipeline,
                stage=name, seconds=s, attempt=job.attempts,
            )))
            self._deliver(job, result, pipeline, stage_seconds)
        except Exception as exc:  # stages, derive and the outbox alike go through the failure policy
            self._failed(job, exc)

    def _deliver(self, job: Job, result: Volume, pipeline: stages.Pipeline, stage_seconds: dict[str, float]) -> None:
        t0 = time.perf_counter()
        datasets = derive_datasets(result, pipeline.name, pipeline.version, self.cfg.dicom.uid_root,
                                   self.cfg.derived.series_number_offset)
        derived_uid = str(datasets[0].SeriesInstanceUID)
        paths = write_derived(datasets, self.outbox.folder_for(job.id, derived_uid))
        derive_s = time.perf_counter() - t0
        files = [(str(ds.SOPInstanceUID), p) for ds, p in zip(datasets, paths)]
        current = self.jobs.get(job.id)
        if current is not None and current.state != RUNNING:
            # Superseded while it ran (new instances arrived): its result must not be sent.
            log.info("job.result_dropped", job_id=job.id, state=current.state, reason=current.reason)
            return
        self.outbox.add(job.id, list(job.destinations), derived_uid, files)
        timings = {f"stage:{k}": v for k, v in stage_seconds.items()}
        timings["derive"] = derive_s
        if job.started_at is not None:
            timings["queue_wait"] = max(0.0, job.started_at - job.queued_at)
            timings["process"] = time.time() - job.started_at
        self.jobs.exporting(job.id, derived_uid, timings)
        log.info("job.processed", job_id=job.id, pipeline=pipeline.name, derived_series_uid=derived_uid,
                 instances=len(files), destinations=list(job.destinations),
                 timings={k: round(v, 3) for k, v in timings.items()})
        self.publisher.publish(
            JobDone(study_uid=job.study_uid, series_uid=job.series_uid, job_id=job.id, pipeline=pipeline.name,
                    label=job.label, derived_series_uid=derived_uid, instances=len(files), timings=timings),
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
                fallback = self._pipeline("passthrough")
                result, seconds = fallback.run(volume)
                result.provenance.append(f"{job.pipeline} failed ({reason}); sent unprocessed")
                self._deliver(job, result, fallback, seconds)
                return
            except Exception as exc2:
                detail = f"{detail}; passthrough also failed: {type(exc2).__name__}: {exc2}"
        self.jobs.failed(job.id, reason, detail)

    # ---- thread ----------------------------------------------------------------------------
    def tick(self) -> bool:
        """Process the next queued job; False when there was none. Stopping waits for the job in
        hand: it is never cut off half-written."""
        job = self.jobs.take_next()
        if job is None:
            return False
        try:
            self.process(job)
        except Exception as exc:  # a bug must not kill the worker: fail the job, go on
            log.exception("job.crashed", job_id=job.id)
            self.jobs.failed(job.id, "internal_error", f"{type(exc).__name__}: {exc}")
        return True
