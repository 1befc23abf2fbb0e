"""DESIGN's failure policy: a failing job is retried, then fails (or is passed through), and
every failure is reported with its reason."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from appliance.config import RouteRule
from appliance.daemon import Daemon
from appliance.dicom.scu import send_folder
from appliance.pipeline import stages
from appliance.pipeline.jobs import DONE, FAILED
from appliance.synth.series import axial_geometry
from tests.helpers import ramp_volume, write_series


class Exploding:
    name = "explode"

    def __call__(self, volume):
        raise RuntimeError("CUDA error: out of memory")


@pytest.fixture(autouse=True)
def _broken_pipeline():
    stages.register("broken", lambda cfg: stages.Pipeline("broken", "0.0.1", [Exploding()]))
    yield
    stages._REGISTRY.pop("broken", None)


def _run(cfg, tmp_path: Path, on_failure: str):
    cfg.routes = [RouteRule(pipeline="broken", destinations=[])]
    cfg.pipeline.on_failure = on_failure
    published = []
    d = Daemon(cfg)
    d.publisher.publish = lambda event, buffer=None: published.append(event)
    d.start()
    try:
        paths = write_series(tmp_path / "s", ramp_volume((3, 8, 8)), axial_geometry((3, 8, 8), 1.0, 1.0))
        assert send_folder(tmp_path / "s", "127.0.0.1", d.scp.port).sent == 3
        deadline = time.monotonic() + 20
        job = None
        while time.monotonic() < deadline:
            job = d.jobs.get(1)
            if job and job.state in (DONE, FAILED):
                break
            time.sleep(0.05)
        return job, published, d.outbox, pydicom.dcmread(paths[0]).SeriesInstanceUID
    finally:
        d.stop(5)


def test_a_failing_job_is_retried_once_then_fails_with_its_reason(cfg, tmp_path):
    job, published, _, _ = _run(cfg, tmp_path, "fail")
    assert job.state == FAILED and job.attempts == 2
    assert job.reason == "stage_error" and "out of memory" in job.detail
    failed = [e for e in published if e.topic == "job.failed"]
    assert [e.will_retry for e in failed] == [True, False]
    assert all(e.stage == "explode" for e in failed)


def test_passthrough_fallback_sends_the_original_after_the_retry(cfg, tmp_path):
    job, published, outbox, _ = _run(cfg, tmp_path, "passthrough")
    assert job.state == DONE and job.attempts == 2
    assert [e.topic for e in published if e.topic in ("job.failed", "job.done")] == ["job.failed", "job.failed", "job.done"]
    done = next(e for e in published if e.topic == "job.done")
    assert done.pipeline == "passthrough"
    assert len(list(outbox.folder_for(done.job_id, done.derived_series_uid).iterdir())) == 3


class NotANumber:
    name = "nan"

    def __call__(self, volume):
        volume.voxels[:] = float("nan")  # a result the derived-series writer must refuse
        return volume


def test_a_failure_while_writing_the_result_goes_through_the_same_policy(cfg, tmp_path):
    stages.register("nan", lambda cfg: stages.Pipeline("nan", "0.0.1", [NotANumber()]))
    try:
        cfg.routes = [RouteRule(pipeline="nan", destinations=[])]
        published = []
        d = Daemon(cfg)
        d.publisher.publish = lambda event, buffer=None: published.append(event)
        d.start()
        try:
            write_series(tmp_path / "s", ramp_volume((3, 8, 8)), axial_geometry((3, 8, 8), 1.0, 1.0))
            assert send_folder(tmp_path / "s", "127.0.0.1", d.scp.port).sent == 3
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (d.jobs.get(1) and d.jobs.get(1).state == FAILED):
                time.sleep(0.05)
            job = d.jobs.get(1)
        finally:
            d.stop(5)
    finally:
        stages._REGISTRY.pop("nan", None)
    assert job.state == FAILED and job.attempts == 2
    assert [e.will_retry for e in published if e.topic == "job.failed"] == [True, False]
