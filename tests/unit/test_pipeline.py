from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from appliance.config import RouteRule
from appliance.pipeline import stages
from appliance.pipeline.jobs import DONE, EXPORTING, QUEUED, RUNNING, JobQueue
from appliance.pipeline.routing import route


def _header(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


RULES = [
    RouteRule(name="ct low dose", modalities=["CT"], series_description=r"low ?dose", pipeline="denoise"),
    RouteRule(name="from the recon console", calling_ae_titles=["CT_RECON"], pipeline="recon"),
    RouteRule(name="mr protocol", modalities=["MR"], protocol_name="^t1", pipeline="mr"),
    RouteRule(name="everything else", pipeline="passthrough"),
]


@pytest.mark.parametrize(
    "calling, header, expected",
    [
        ("CONSOLE", _header(Modality="CT", SeriesDescription="Thorax LowDose 1.0"), "denoise"),
        ("CONSOLE", _header(Modality="CT", SeriesDescription="Thorax standard"), "passthrough"),
        ("CT_RECON", _header(Modality="CT", SeriesDescription="raw"), "recon"),
        ("CONSOLE", _header(Modality="MR", ProtocolName="T1 MPRAGE"), "mr"),
        ("CONSOLE", _header(Modality="MR", ProtocolName="T2 FLAIR"), "passthrough"),
        ("CONSOLE", _header(), "passthrough"),
    ],
)
def test_first_matching_rule_chooses_the_pipeline(calling, header, expected):
    assert route(RULES, calling, header).pipeline == expected


def test_no_rule_matches():
    assert route(RULES[:1], "CONSOLE", _header(Modality="MR")) is None


def test_passthrough_pipeline_times_its_stage():
    import numpy as np

    from appliance.volume import Geometry, SeriesRef, Volume

    vol = Volume(np.zeros((2, 3, 4), np.float32), Geometry(np.zeros(3), np.eye(3), (1.0, 1.0, 1.0)), "HU",
                 SeriesRef("1", "2", "CT", "1.2", ("3", "4")))
    seen = []
    result, timings = stages.build("passthrough").run(vol, on_stage_done=lambda n, s: seen.append(n))
    assert result is vol and list(timings) == ["passthrough"] == seen
    assert any("passthrough" in p for p in result.provenance)


def test_a_failing_stage_raises_a_coded_error():
    class Broken:
        name = "broken"

        def __call__(self, volume):
            raise MemoryError("out of GPU memory")

    with pytest.raises(stages.StageError) as err:
        stages.Pipeline("x", "1", [Broken()]).run(None)
    assert err.value.stage == "broken" and "out of GPU memory" in err.value.detail


def test_unknown_pipeline_names_the_available_ones():
    with pytest.raises(KeyError, match="passthrough"):
        stages.build("nope")


def _enqueue(q: JobQueue, label: str = "", generation: int = 0):
    return q.enqueue(series_uid="1.2.3", generation=generation, label=label, study_uid="1.2", calling_ae="C",
                     pipeline="passthrough", destinations=["console"], received_first=1.0, received_last=2.0,
                     completed_at=3.0)


def _open(path) -> JobQueue:
    q = JobQueue(path)
    q.open(max_attempts=2)
    return q


def test_job_queue_is_idempotent_and_survives_a_crash(tmp_path):
    q = _open(tmp_path / "jobs.sqlite")
    job, new = _enqueue(q)
    assert new and job.state == QUEUED and job.destinations == ("console",)
    assert _enqueue(q) == (job, False)  # same series, generation and label
    assert _enqueue(q, label="echo=2")[1] and _enqueue(q, generation=1)[1]
    taken = q.take_next()
    assert taken.id == job.id and taken.state == RUNNING and taken.attempts == 1
    q.close()
    q = _open(tmp_path / "jobs.sqlite")  # the process died while running it
    again = q.take_next()
    assert again.id == job.id and again.attempts == 2
    q.exporting(job.id, "9.9", {"derive": 0.5})
    q.done(job.id)
    j = q.get(job.id)
    assert (j.state, j.derived_series_uid, j.timings) == (DONE, "9.9", {"derive": 0.5})
    assert q.count(QUEUED) == 2 and q.count(EXPORTING) == 0


def test_a_job_that_keeps_killing_the_process_fails_instead_of_looping(tmp_path):
    q = _open(tmp_path / "jobs.sqlite")
    job, _ = _enqueue(q)
    for _ in range(2):  # taken, and the process dies, twice
        assert q.take_next().id == job.id
        q.close()
        q = JobQueue(tmp_path / "jobs.sqlite")
        crashed = q.open(max_attempts=2)
    assert [j.id for j in crashed] == [job.id]
    failed = q.get(job.id)
    assert failed.state == "failed" and failed.reason == "crashed" and "2 time(s)" in failed.detail
    assert q.take_next() is None
