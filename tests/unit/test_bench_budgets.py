"""The budgets file (bench/budgets.py) and the gate (bench/gate.py) on synthetic results documents."""

from __future__ import annotations

import tomllib
from datetime import datetime, timezone
from pathlib import Path

import pytest

from bench import budgets, gate
from bench.schema import Document, Git, Machine, Options, Result, Stats

E2E = "e2e/denoise/512x512x300/appliance-scu/c1/first_byte_to_last_response"
E2E_C2 = "e2e/denoise/512x512x300/appliance-scu/c2/first_byte_to_last_response"
INGEST = "ingest/appliance/512x512x300/appliance-scu"
KERNEL = "kernels/host/forward_joseph/128^3"
DENOISE = "denoise/host/512x512x300"


def result(rid: str, samples: list[float], *, better: str = "lower", unit: str | None = None,
           stages: dict[str, list[float]] | None = None) -> Result:
    scenario = rid.split("/")[0]
    unit = unit or ("s" if better == "lower" else "1/s")
    return Result(id=rid, scenario=scenario, title=f"{rid} title", metric="latency" if better == "lower" else "throughput",
                  unit=unit, better=better, warmup=1, samples=samples, stats=Stats.of(samples),
                  stages={k: Stats.of(v) for k, v in (stages or {}).items()})


def document(*results: Result, cpu: str = "Intel(R) Xeon(R) Processor", cores: int = 2, gpu: str | None = None,
             quick: bool = False, skipped: dict[str, str] | None = None) -> Document:
    return Document(started=datetime(2026, 11, 23, 1, 25, tzinfo=timezone.utc), wall_s=60.0,
                    machine=Machine(hostname="vm", os="Linux", cpu=cpu, cores=cores, memory_gib=8.0, gpu=gpu),
                    git=Git(revision="abc1234", dirty=False), versions={"numpy": "2.4.6"},
                    options=Options(quick=quick, repeats=5, warmup=1, scenarios=["e2e"], command="appliance bench"),
                    results=list(results), skipped=skipped or {})


def standard() -> Document:
    return document(
        result(E2E, [80.0, 81.0, 82.0, 83.0, 84.0],
               stages={"receive": [10.0, 11.0, 12.0], "export": [2.0, 2.5, 3.0]}),
        result(E2E_C2, [150.0, 152.0, 154.0]),
        result(INGEST, [100.0, 110.0, 120.0], better="higher"),
        result(KERNEL, [0.13, 0.14, 0.15], better="higher", unit="GUPS"),
    )


def write(tmp_path: Path, text: str, name: str = "budgets.toml") -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def save(tmp_path: Path, doc: Document, name: str = "results.json") -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(doc.dump())
    return p


def check_text(tmp_path: Path, doc: Document, text: str) -> gate.CheckReport:
    return gate.check(doc, write(tmp_path, text))


def only(report: gate.CheckReport, kind: str = "budget") -> gate.CheckLine:
    lines = [line for line in report.lines if line.kind == kind]
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------ budgets


def test_max_budget_met(tmp_path: Path):
    report = check_text(tmp_path, standard(), f'description = "2-core"\n[[budget]]\nid = "{E2E}"\nstat = "p95"\nmax = 90.0\n')
    line = only(report)
    assert report.passed and line.passed and line.status == "pass"
    assert line.measured == pytest.approx(Stats.of([80.0, 81.0, 82.0, 83.0, 84.0]).p95)
    assert (line.op, line.limit, line.unit) == ("<=", 90.0, "s")
    text = report.format()
    assert text.rstrip().splitlines()[-1].startswith("PASS: all 1 checks passed")
    assert E2E in text and "<= 90.00 s" in text and "2-core" in text


def test_max_budget_exceeded(tmp_path: Path):
    report = check_text(tmp_path, standard(), f'[[budget]]\nid = "{E2E}"\nstat = "max"\nmax = 83.0\n')
    line = only(report)
    assert not report.passed and line.status == "fail" and line.measured == 84.0
    assert "exceeds the max" in line.message
    assert report.format().rstrip().splitlines()[-1].startswith("FAIL: 1 of 1 checks failed")


def test_min_budget_met_and_missed(tmp_path: Path):
    ok = check_text(tmp_path, standard(), f'[[budget]]\nid = "{INGEST}"\nstat = "p50"\nmin = 100.0\nunit = "1/s"\n')
    assert ok.passed and only(ok).op == ">="
    bad = check_text(tmp_path, standard(), f'[[budget]]\nid = "{INGEST}"\nstat = "p50"\nmin = 115.0\n')
    assert not bad.passed and "below the min" in only(bad).message


def test_max_on_throughput_and_min_on_latency_are_plain_bounds(tmp_path: Path):
    report = check_text(tmp_path, standard(),
                        f'[[budget]]\nid = "{INGEST}"\nmax = 1000.0\n[[budget]]\nid = "{E2E}"\nstat = "min"\nmin = 1.0\n')
    assert report.passed and len(report.lines) == 2


def test_gate_fails_when_budget_set_below_measured_value(tmp_path: Path, capsys):
    """The issue's requirement: a budget below what was measured makes the gate exit non-zero."""
    doc = standard()
    measured = doc.result(E2E).stats.p95
    results = save(tmp_path, doc)
    below = write(tmp_path, f'[[budget]]\nid = "{E2E}"\nstat = "p95"\nmax = {measured * 0.9}\n', "below.toml")
    above = write(tmp_path, f'[[budget]]\nid = "{E2E}"\nstat = "p95"\nmax = {measured * 1.1}\n', "above.toml")

    assert gate.run_check(results, above) == 0
    assert gate.run_check(results, below) == 1
    assert gate.main(["--check", str(below), str(results)]) == 1
    out = capsys.readouterr().out
    assert "FAIL: 1 of 1 checks failed" in out and E2E in out
    assert gate.gate(doc, below) == 1  # what `appliance bench --check` calls after a run


def test_pattern_budget_applies_to_every_match(tmp_path: Path):
    report = check_text(tmp_path, standard(), '[[budget]]\nid = "e2e/*/first_byte_to_last_response"\nmax = 100.0\n')
    assert [line.id for line in report.lines] == [E2E, E2E_C2]
    assert [line.passed for line in report.lines] == [True, False]


def test_missing_result_fails_unless_optional(tmp_path: Path):
    doc = document(result(E2E, [1.0, 2.0]), skipped={"denoise/tensorrt": "no GPU"})
    report = check_text(tmp_path, doc, '[[budget]]\nid = "denoise/tensorrt/*"\nmax = 5.0\n')
    line = only(report)
    assert not report.passed and line.status == "fail"
    assert "not measured" in line.message and "no GPU" in line.message
    report = check_text(tmp_path, doc, '[[budget]]\nid = "denoise/tensorrt/*"\nmax = 5.0\noptional = true\n')
    assert report.passed and only(report).status == "skip"
    assert "1 optional not measured" in report.summary()


def test_typo_in_exact_id_names_the_close_match(tmp_path: Path):
    report = check_text(tmp_path, standard(), f'[[budget]]\nid = "{E2E.replace("appliance-scu", "apliance-scu")}"\nmax = 90.0\n')
    assert not report.passed and E2E in only(report).message


def test_stage_budget_and_unit_mismatch(tmp_path: Path):
    report = check_text(tmp_path, standard(),
                        f'[[budget]]\nid = "{E2E}"\nstage = "export"\nstat = "max"\nmax = 3.0\n'
                        f'[[budget]]\nid = "{E2E}"\nstage = "derive"\nmax = 3.0\n'
                        f'[[budget]]\nid = "{E2E}"\nunit = "ms"\nmax = 90000.0\n')
    export, derive, unit = report.lines
    assert export.passed and export.measured == 3.0 and export.stat == "max export"
    assert not derive.passed and "no stage 'derive'" in derive.message and "receive, export" in derive.message
    assert not unit.passed and "'ms'" in unit.message


# ------------------------------------------------------------------ regression


def regression_file(tmp_path: Path, baseline: Document, fraction: float = 0.25, extra: str = "") -> Path:
    save(tmp_path, baseline, "base/results.json")
    return write(tmp_path, f'[regression]\nbaseline = "base/results.json"\nmax_fraction = {fraction}\n{extra}')


@pytest.mark.parametrize("better, base, now, passed", [
    ("lower", 10.0, 12.4, True),    # +24 %: within 25 %
    ("lower", 10.0, 12.6, False),   # +26 %
    ("lower", 10.0, 5.0, True),     # faster
    ("higher", 100.0, 76.0, True),  # -24 %
    ("higher", 100.0, 74.0, False),  # -26 %
    ("higher", 100.0, 200.0, True),
])
def test_regression_both_directions(tmp_path: Path, better: str, base: float, now: float, passed: bool):
    rid = DENOISE if better == "lower" else INGEST
    path = regression_file(tmp_path, document(result(rid, [base], better=better)))
    report = gate.check(document(result(rid, [now], better=better)), path)
    line = only(report, "regression")
    assert (report.passed, line.passed, line.status) == (passed, passed, "pass" if passed else "fail")
    assert line.baseline == base and line.measured == now
    assert line.limit == pytest.approx(base * (1.25 if better == "lower" else 0.75))
    assert report.exit_code == (0 if passed else 1)


def test_regression_compares_the_configured_stat(tmp_path: Path):
    path = regression_file(tmp_path, document(result(DENOISE, [10.0, 10.0, 10.0])), extra='stat = "max"\n')
    report = gate.check(document(result(DENOISE, [10.0, 10.0, 20.0])), path)  # p50 same, max doubled
    assert not report.passed and only(report, "regression").stat == "max"


def test_new_not_run_and_ignored_do_not_fail(tmp_path: Path):
    base = document(result(DENOISE, [10.0]), result(KERNEL, [1.0], better="higher", unit="GUPS"),
                    result(INGEST, [100.0], better="higher"))
    path = regression_file(tmp_path, base, extra='ignore = ["ingest/*"]\n')
    now = document(result(DENOISE, [10.0]), result(E2E, [80.0]), result(INGEST, [10.0], better="higher"))
    report = gate.check(now, path)
    by_id = {line.id: line.status for line in report.lines}
    assert by_id == {DENOISE: "pass", E2E: "new", KERNEL: "not run"}
    assert report.ignored == [INGEST] and report.passed
    assert "1 new, 1 not run, 1 ignored" in report.summary()


def test_unit_change_is_not_compared(tmp_path: Path):
    path = regression_file(tmp_path, document(result(DENOISE, [10000.0], unit="ms")))
    report = gate.check(document(result(DENOISE, [10.0])), path)
    assert report.passed and only(report, "regression").status == "skip"


def test_relative_baseline_path_is_relative_to_the_budgets_file(tmp_path: Path, monkeypatch):
    save(tmp_path, document(result(DENOISE, [10.0])), "results/base.json")
    path = write(tmp_path, '[regression]\nbaseline = "../results/base.json"\nmax_fraction = 0.1\n', "budgets/cpu.toml")
    monkeypatch.chdir(tmp_path / "results")  # not the budgets file's folder
    loaded = budgets.load_budgets(path)
    assert loaded.baseline_path == tmp_path / "budgets" / "../results/base.json"
    assert not gate.check(document(result(DENOISE, [12.0])), path).passed


def test_absolute_baseline_path(tmp_path: Path):
    base = save(tmp_path, document(result(DENOISE, [10.0])), "elsewhere/base.json")
    path = write(tmp_path, f'[regression]\nbaseline = "{base}"\nmax_fraction = 0.1\n', "budgets/cpu.toml")
    assert gate.check(document(result(DENOISE, [10.5])), path).passed


def test_machine_mismatch_warns_but_does_not_fail(tmp_path: Path):
    path = regression_file(tmp_path, document(result(DENOISE, [10.0]), cores=16, gpu="NVIDIA H100"))
    report = gate.check(document(result(DENOISE, [10.0]), quick=True), path)
    assert report.passed
    assert any("different machine" in w and "16 vs 2 cores" in w and "GPU NVIDIA H100 vs none" in w
               for w in report.warnings)
    assert any("quick run with a full baseline" in w for w in report.warnings)
    assert "WARNING: the baseline ran on a different machine" in report.format()
    path = regression_file(tmp_path, document(result(DENOISE, [10.0])))
    assert gate.check(document(result(DENOISE, [10.0])), path).warnings == []


# ------------------------------------------------------------------ bad input -> exit 2


@pytest.mark.parametrize("text, expected", [
    ("[[budget]\nid = 'x'\n", "not valid TOML"),
    (f'[[budget]]\nid = "{E2E}"\nmaxx = 90.0\n', "maxx: unknown field (allowed: id, stat, max, min"),
    (f'[[budget]]\nid = "{E2E}"\nmax = 90.0\nmin = 1.0\n', "exactly one of `max`"),
    (f'[[budget]]\nid = "{E2E}"\n', "exactly one of `max`"),
    (f'[[budget]]\nid = "{E2E}"\nstat = "p90"\nmax = 1.0\n', "stat: Input should be"),
    ('[[budget]]\nmax = 1.0\n', "[[budget]] #1 id: required field missing"),
    (f'[[budget]]\nid = "{E2E}"\nmax = nan\n', "max"),
    ('[regression]\nbaseline = "b.json"\nmax_fraction = 0\n', "[regression] max_fraction"),
    ('[regression]\nbaseline = "b.json"\nmax_fraction = 0.1\nignor = []\n', "[regression] ignor: unknown field"),
    ('descripton = "x"\n', "descripton: unknown field"),
    ('description = "nothing"\n', "gates nothing"),
    ('[regression]\nbaseline = "missing.json"\nmax_fraction = 0.1\n', "[regression] baseline"),
])
def test_invalid_budgets_exit_2_with_a_clear_message(tmp_path: Path, capsys, text: str, expected: str):
    path = write(tmp_path, text)
    results = save(tmp_path, standard())
    assert gate.main(["--check", str(path), str(results)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and expected in err, err
    with pytest.raises(budgets.BudgetError):
        gate.check(standard(), path)


def test_second_budget_is_named_by_its_id(tmp_path: Path):
    path = write(tmp_path, f'[[budget]]\nid = "a"\nmax = 1.0\n[[budget]]\nid = "{E2E}"\nmax = 1.0\nmin = 0.5\n')
    with pytest.raises(budgets.BudgetError, match=r"\[\[budget\]\] #2 \(id = 'e2e/denoise"):
        budgets.load_budgets(path)


@pytest.mark.parametrize("content, expected", [
    (None, "cannot read the results file"),
    ("{not json", "not valid JSON"),
    ('{"when": "2026", "results": []}', "no \"schema\" field"),
    ('{"schema": "appliance-bench/1", "results": []}', "not a valid appliance-bench/1 results document"),
])
def test_bad_results_file_exits_2(tmp_path: Path, capsys, content: str | None, expected: str):
    path = write(tmp_path, f'[[budget]]\nid = "{E2E}"\nmax = 90.0\n')
    results = tmp_path / "results.json"
    if content is not None:
        results.write_text(content)
    assert gate.run_check(results, path) == 2
    out = capsys.readouterr().out
    assert expected in out and str(results) in out


def test_bad_baseline_document_exits_2(tmp_path: Path, capsys):
    write(tmp_path, "{}", "base.json")
    path = write(tmp_path, '[regression]\nbaseline = "base.json"\nmax_fraction = 0.1\n')
    assert gate.run_check(save(tmp_path, standard()), path) == 2
    assert "[regression] baseline" in capsys.readouterr().out


# ------------------------------------------------------------------ suggest


def test_suggest_round_trips_into_a_passing_check(tmp_path: Path, capsys):
    doc = standard()
    text = budgets.suggest(doc, margin=0.5, stat="p95")
    assert "per hardware" in text
    data = tomllib.loads(text)
    assert len(data["budget"]) == len(doc.results) and "regression" not in data
    by_id = {b["id"]: b for b in data["budget"]}
    assert by_id[INGEST]["min"] <= doc.result(INGEST).stats.p95 * 0.5
    assert by_id[E2E]["max"] >= doc.result(E2E).stats.p95 * 1.5
    assert by_id[E2E]["max"] == 126.0  # 83.8 * 1.5 = 125.7, rounded up to 3 significant digits
    report = gate.check(doc, write(tmp_path, text))
    assert report.passed and len(report.lines) == len(doc.results)

    # and with a baseline: the run is its own baseline, so it passes again
    results = save(tmp_path, doc)
    text = budgets.suggest(doc, baseline="results.json")
    assert gate.run_check(results, write(tmp_path, text)) == 0
    capsys.readouterr()
    assert gate.main(["--suggest", str(results), "--margin", "0.2", "--stat", "p50"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["budget"][0]["stat"] == "p50"


def test_suggest_rejects_a_margin_that_zeroes_a_throughput_floor():
    with pytest.raises(ValueError, match="margin"):
        budgets.suggest(standard(), margin=1.0)
    with pytest.raises(ValueError, match="margin"):
        budgets.suggest(standard(), margin=-0.1)


def test_round_sig():
    assert budgets._round_sig(125.7, 3, up=True) == 126.0
    assert budgets._round_sig(1234.5, 3, up=True) == 1240.0
    assert budgets._round_sig(0.0651, 3, up=False) == 0.0651
    assert budgets._round_sig(0.06519, 3, up=False) == 0.0651
