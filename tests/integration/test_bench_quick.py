"""`appliance bench --quick` as CI runs it: every scenario, a results document that validates
against the schema, the report, and the budget gate failing when a budget is below the measured
value. The numbers themselves are not asserted (a timing in a test is never an assertion)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import schema
from tests.integration.peers import require_dcmtk

pytestmark = pytest.mark.integration


def bench(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    require_dcmtk()
    out = tmp_path_factory.mktemp("bench") / "run"
    done = bench("--quick", "--out", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done


@pytest.mark.timeout(600)
def test_quick_run_writes_a_valid_document_with_every_scenario(quick_run):
    out, done = quick_run
    doc = schema.load(out / "results.json")  # validates: the schema is what CI asserts
    assert {r.scenario for r in doc.results} == set(schema.SCENARIOS)
    assert doc.options.quick and not doc.skipped
    assert doc.machine.cores >= 1 and doc.git.revision and doc.versions["pynetdicom"]
    assert doc.config["routes"][-1]["pipeline"] == "denoise"
    for r in doc.results:
        assert r.stats.n == len(r.samples) and r.stats.min <= r.stats.p50 <= r.stats.p95 <= r.stats.max
    e2e = [r for r in doc.results if r.scenario == "e2e"]
    assert {r.params["sender"] for r in e2e} == {"appliance-scu", "dcmtk-storescu", "dcmtk-storescu@dcmtk-storescp"}
    assert {r.params["concurrency"] for r in e2e} == {1, 2}
    assert {r.params["pipeline"] for r in e2e if r.params["console"] == "dcmtk-storescp"} == {"denoise", "passthrough"}
    first = next(r for r in e2e if r.params["measure"] == "first_byte_to_last_response")
    assert list(first.stages)[:2] == ["receive", "completion_wait"]
    assert {"stage:denoise", "derive", "export"} <= set(first.stages)
    # dcmtk in, dcmtk out: end to end as a multiple of the wire's floor, measured in the same run.
    for pipeline in ("denoise", "passthrough"):
        e2e_dcmtk = next(r for r in e2e if r.params["sender"] == "dcmtk-storescu@dcmtk-storescp"
                         and r.params["pipeline"] == pipeline and r.params["measure"] == "first_byte_to_last_response")
        wire = next(r for r in e2e if r.id == e2e_dcmtk.peer.id)
        assert wire.params["measure"] == "wire_floor" and 0 < wire.stats.p50 < e2e_dcmtk.stats.p50
        assert e2e_dcmtk.peer.ratio == pytest.approx(e2e_dcmtk.stats.p50 / wire.stats.p50)
    appliance_ingest = next(r for r in doc.results if r.id.startswith("ingest/appliance/"))
    assert appliance_ingest.peer is not None and appliance_ingest.peer.name == "dcmtk storescp"
    assert appliance_ingest.peer.ratio > 0
    assert "[  " in done.stderr  # the progress display
    report = (out / "report.md").read_text()
    assert "results.json" in report and list(out.glob("*.png"))


@pytest.mark.timeout(120)
def test_budget_gate_fails_when_a_budget_is_below_the_measured_value(quick_run, tmp_path):
    out, _ = quick_run
    doc = schema.load(out / "results.json")
    e2e = next(r for r in doc.results if r.scenario == "e2e")
    tight = tmp_path / "tight.toml"
    tight.write_text(f'[[budget]]\nid = "{e2e.id}"\nstat = "p95"\nmax = {e2e.stats.p95 * 0.5}\n')
    failed = bench("--results", str(out / "results.json"), "--no-report", "--check", str(tight), timeout=60)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "FAIL" in failed.stdout
    loose = tmp_path / "loose.toml"
    loose.write_text(f'[[budget]]\nid = "{e2e.id}"\nstat = "p95"\nmax = {e2e.stats.p95 * 2}\n')
    passed = bench("--results", str(out / "results.json"), "--no-report", "--check", str(loose), timeout=60)
    assert passed.returncode == 0, passed.stdout + passed.stderr
