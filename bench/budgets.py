"""The budget gate: does a benchmark run meet its budgets, and did it regress against a baseline?

QA gates a release on ``appliance bench --check budgets.toml`` (after a run) or
``appliance bench check RESULTS.json --budgets budgets.toml`` (on a stored run), or directly::

    python -m bench.budgets --check budgets.toml results.json     # exit 0 pass, 1 fail, 2 bad input
    python -m bench.budgets --suggest results.json > budgets.toml  # a starting budget file

**Budgets are per hardware.** A latency budget met by a 16-core server with a GPU says nothing about a
2-core appliance: keep one budgets file per machine class (its ``description`` says which), start it
with ``--suggest`` from a full run on that machine, then tighten it by hand.

The budgets file (TOML)::

    # what this budget file gates (free text; shown in the report)
    description = "2-core CPU appliance, built-in default config"

    [regression]                    # optional: compare with a stored run
    baseline = "../results/2026-11-23-2core/results.json"  # relative to this file's folder, or absolute
    max_fraction = 0.25             # a result more than 25 % worse than the baseline fails
    stat = "p50"                    # the statistic compared (default p50: the most stable)
    ignore = ["ingest/*"]           # optional: fnmatch patterns of result ids not compared

    [[budget]]                      # any number of these
    id = "e2e/denoise/512x512x300/appliance-scu/c1/first_byte_to_last_response"
    stat = "p95"                    # min, p50, p95, p99, max or mean (default p95)
    max = 90.0                      # in the result's unit; or `min` (e.g. for throughputs)
    unit = "s"                      # optional: the check fails if the result's unit differs
    stage = "export"                # optional (e2e): the budget applies to this stage's seconds
    optional = false                # optional: true = not failing when no result matches
    note = "300-slice CT, p95 first byte to last response"

Rules:

- A budget's ``id`` is an exact result id or an fnmatch pattern (``*`` also crosses ``/``:
  ``e2e/*/c1/*``); it applies to every result it matches. A budget that matches no result fails
  ("not measured": a gate must not pass because a scenario silently did not run), unless
  ``optional = true`` (e.g. GPU backends in a file shared by machines with and without a GPU).
- A budget has exactly one of ``max`` (passes when measured <= max) and ``min`` (passes when
  measured >= min). Either may be used whatever the result's ``better``: ``max`` on a throughput
  or ``min`` on a latency is just a bound (a "too fast to be true" floor catches a stage that did
  nothing).
- Regression: every result present in both the run and the baseline (same id and unit; ids matching
  an ``ignore`` pattern are skipped) fails when it is worse than the baseline by more than
  ``max_fraction`` in its ``better`` direction: lower is better fails when
  ``current > baseline * (1 + f)``, higher is better when ``current < baseline * (1 - f)``. Results
  the baseline lacks are reported "new", baseline results the run lacks "not run"; neither fails
  (required measurements are what ``[[budget]]`` is for). A baseline from another machine (CPU,
  cores or GPU differ) or of another kind of run (``--quick`` or not) draws a warning, not a failure.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
import tomllib
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bench.schema import SCHEMA_ID, STATS, Document, Machine, Result, Stats

Stat = Literal["min", "p50", "p95", "p99", "max", "mean"]
assert set(Stat.__args__) == set(STATS)  # type: ignore[attr-defined]

EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2


class BudgetError(Exception):
    """Input the gate cannot use (budgets file, its baseline, or a results document); the message
    names the file and, for a validation problem, the field."""


# --------------------------------------------------------------------------- the budgets file


class Regression(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    baseline: str = Field(min_length=1, description="results JSON; relative to the budgets file's folder, or absolute")
    max_fraction: float = Field(gt=0, description="a result worse than the baseline by more than this fraction fails")
    stat: Stat = "p50"
    ignore: list[str] = Field(default_factory=list, description="fnmatch patterns of result ids not compared")


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    id: str = Field(min_length=1, description="a result id or an fnmatch pattern")
    stat: Stat = "p95"
    max: float | None = None
    min: float | None = None
    unit: str | None = Field(None, description="when given, the result's unit must be this one")
    stage: str | None = Field(None, description="e2e: the budget applies to this stage (seconds)")
    optional: bool = False
    note: str = ""

    @model_validator(mode="after")
    def _one_bound(self) -> Budget:
        if (self.max is None) == (self.min is None):
            raise ValueError("give exactly one of `max` (measured <= max passes) and `min` (measured >= min passes)")
        return self

    @property
    def op(self) -> Literal["<=", ">="]:
        return "<=" if self.max is not None else ">="

    @property
    def limit(self) -> float:
        return self.max if self.max is not None else self.min  # type: ignore[return-value]


class BudgetFile(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    description: str = ""
    regression: Regression | None = None
    budgets: list[Budget] = Field(default_factory=list, alias="budget")

    @model_validator(mode="after")
    def _gates_something(self) -> BudgetFile:
        if not self.budgets and self.regression is None:
            raise ValueError("gates nothing: add a [[budget]] table or a [regression] table")
        return self


_FIELDS = {"": BudgetFile, "regression": Regression, "budget": Budget}


class Budgets(BaseModel):
    """A loaded budgets file: the parsed file, where it came from, and its baseline (loaded)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    file: BudgetFile
    source: str = "<budgets>"
    baseline_path: Path | None = None
    baseline: Document | None = None


def _allowed(model: type[BaseModel]) -> str:
    return ", ".join(f.alias or name for name, f in model.model_fields.items())


def _format_validation(source: str, data: Any, exc: ValidationError) -> str:
    lines = [f"{source}: {exc.error_count()} problem(s)"]
    for err in exc.errors():
        loc = list(err["loc"])
        where, model = "(top level)", _FIELDS[""]
        if loc and loc[0] == "budget" and len(loc) >= 2 and isinstance(loc[1], int):
            i = loc[1]
            entry = data.get("budget", [])[i] if isinstance(data.get("budget"), list) else None
            bid = entry.get("id") if isinstance(entry, dict) else None
            where = f"[[budget]] #{i + 1}" + (f" (id = {bid!r})" if isinstance(bid, str) else "")
            model, loc = Budget, loc[2:]
        elif loc and loc[0] == "regression":
            where, model, loc = "[regression]", Regression, loc[1:]
        if loc:
            field = ".".join(str(p) for p in loc)
            where = field if where == "(top level)" else f"{where} {field}"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown field (allowed: {_allowed(model)})"
        elif err["type"] == "missing":
            msg = "required field missing"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def parse_budgets(text: str, source: str = "<budgets>") -> BudgetFile:
    """Parse and validate budgets TOML (the baseline is not loaded). Raises `BudgetError`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BudgetError(f"{source}: not valid TOML: {exc}") from exc
    try:
        return BudgetFile.model_validate(data)
    except ValidationError as exc:
        raise BudgetError(_format_validation(source, data, exc)) from exc


def load_budgets(path: str | Path, *, load_baseline: bool = True) -> Budgets:
    """Read, validate and (with ``load_baseline``) load the baseline of a budgets file; raises
    `BudgetError`. Cheap: call it before a long run so a typo fails in a second, not after it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BudgetError(f"{path}: cannot read the budgets file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise BudgetError(f"{path}: not UTF-8 text: {exc}") from exc
    file = parse_budgets(text, str(path))
    budgets = Budgets(file=file, source=str(path))
    if file.regression is not None:
        base = Path(file.regression.baseline).expanduser()
        if not base.is_absolute():
            base = path.parent / base
        budgets.baseline_path = base
        if load_baseline:
            try:
                budgets.baseline = load_results(base)
            except BudgetError as exc:
                raise BudgetError(f"{path}: [regression] baseline: {exc}") from exc
    return budgets


def load_results(path: str | Path) -> Document:
    """A results document (``bench/schema.py``); raises `BudgetError` naming the file and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BudgetError(f"{path}: cannot read the results file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise BudgetError(f"{path}: not UTF-8 text: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BudgetError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or "schema" not in data:
        raise BudgetError(f"{path}: not an {SCHEMA_ID} results document (no \"schema\" field; "
                          "written by an older benchmark script?)")
    try:
        return Document.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        lines = [f"{path}: not a valid {SCHEMA_ID} results document: {len(errors)} problem(s)"]
        for err in errors[:10]:
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg'].removeprefix('Value error, ')}")
        if len(errors) > 10:
            lines.append(f"  ... and {len(errors) - 10} more")
        raise BudgetError("\n".join(lines)) from exc


# --------------------------------------------------------------------------- the check


Status = Literal["pass", "fail", "new", "not run", "skip"]


class CheckLine(BaseModel):
    """One check: a budget against one result, or one result against the baseline."""

    kind: Literal["budget", "regression"]
    id: str = Field(description="the result id (for a budget that matched nothing: its pattern)")
    stat: str
    measured: float | None = None
    limit: float | None = Field(None, description="budget: max or min; regression: the value that would fail")
    op: Literal["<=", ">="] | None = Field(None, description="measured op limit passes")
    baseline: float | None = Field(None, description="regression: the baseline's value")
    unit: str = ""
    passed: bool
    status: Status
    message: str = ""
    note: str = ""


class CheckReport(BaseModel):
    budgets: str = Field(description="the budgets file")
    description: str = ""
    results: str = Field("", description="the results checked (a path, or a summary of the run)")
    baseline: str | None = None
    regression_stat: str | None = None
    max_fraction: float | None = None
    warnings: list[str] = Field(default_factory=list)
    lines: list[CheckLine] = Field(default_factory=list)
    ignored: list[str] = Field(default_factory=list, description="result ids matching a regression ignore pattern")

    @property
    def passed(self) -> bool:
        return all(line.passed for line in self.lines)

    @property
    def failures(self) -> list[CheckLine]:
        return [line for line in self.lines if not line.passed]

    @property
    def exit_code(self) -> int:
        return EXIT_PASS if self.passed else EXIT_FAIL

    def count(self, kind: str, status: str) -> int:
        return sum(1 for line in self.lines if line.kind == kind and line.status == status)

    def summary(self) -> str:
        n_fail, n = len(self.failures), sum(1 for line in self.lines if line.status in ("pass", "fail"))
        head = f"PASS: all {n} checks passed" if self.passed else f"FAIL: {n_fail} of {n} checks failed"
        parts = []
        if any(line.kind == "budget" for line in self.lines):
            b = f"budgets {self.count('budget', 'pass')} passed, {self.count('budget', 'fail')} failed"
            if self.count("budget", "skip"):
                b += f", {self.count('budget', 'skip')} optional not measured"
            parts.append(b)
        if self.baseline is not None:
            r = (f"regression ({self.regression_stat}, max {self.max_fraction * 100:g}% worse) "
                 f"{self.count('regression', 'pass')} passed, {self.count('regression', 'fail')} failed, "
                 f"{self.count('regression', 'new')} new, {self.count('regression', 'not run')} not run")
            if self.count("regression", "skip"):
                r += f", {self.count('regression', 'skip')} not comparable"
            if self.ignored:
                r += f", {len(self.ignored)} ignored"
            parts.append(r)
        return head + (" (" + "; ".join(parts) + ")" if parts else "")

    def format(self) -> str:
        """A table for a CI log: the header, warnings, one row per check, the failures again, and a
        final PASS/FAIL line with the counts."""
        out = [f"Budgets:  {self.budgets}" + (f"  ({self.description})" if self.description else "")]
        if self.results:
            out.append(f"Results:  {self.results}")
        if self.baseline is not None:
            out.append(f"Baseline: {self.baseline}")
        for w in self.warnings:
            out.append(f"WARNING: {w}")
        out.append("")
        rows = [("STATUS", "KIND", "STAT", "MEASURED", "LIMIT", "ID", "")]
        for line in self.lines:
            limit = f"{line.op} {_num(line.limit, line.unit)}" if line.limit is not None and line.op else "-"
            msg = line.message + (f"  [{line.note}]" if line.note else "")
            rows.append((line.status.upper(), line.kind, line.stat, _num(line.measured, line.unit), limit, line.id, msg))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        for r in rows:
            out.append(("  ".join(c.ljust(w) for c, w in zip(r[:6], widths)) + "  " + r[6]).rstrip())
        if not self.lines:
            out.append("(no checks)")
        if self.failures:
            out.append("")
            out.append("Failed:")
            for line in self.failures:
                out.append(f"  {line.kind} {line.id} {line.stat}: {line.message}")
        out.append("")
        out.append(self.summary())
        return "\n".join(out) + "\n"


def _num(x: float | None, unit: str = "") -> str:
    """About four significant digits, never in exponent form for everyday magnitudes."""
    if x is None:
        return "-"
    a = abs(x)
    if a == 0:
        text = "0"
    elif 1e-6 <= a < 1e9:
        text = f"{x:.{min(9, max(0, 3 - math.floor(math.log10(a))))}f}"
    else:
        text = f"{x:.4g}"
    return f"{text} {unit}".rstrip()


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def _machine(m: Machine) -> str:
    return f"{m.hostname}: {m.cpu or 'unknown CPU'}, {m.cores} cores, " + (f"GPU {m.gpu}" if m.gpu else "no GPU")


def _describe(doc: Document, source: str | None) -> str:
    run = f"{_machine(doc.machine)}; git {doc.git.revision}{' (dirty)' if doc.git.dirty else ''}; " \
          f"{'quick' if doc.options.quick else 'full'} run, {doc.started:%Y-%m-%d %H:%M}"
    return f"{source}  [{run}]" if source else run


def _machine_differences(a: Machine, b: Machine) -> list[str]:
    diffs = []
    if a.cpu != b.cpu:
        diffs.append(f"CPU {b.cpu!r} vs {a.cpu!r}")
    if a.cores != b.cores:
        diffs.append(f"{b.cores} vs {a.cores} cores")
    if a.gpu != b.gpu:
        diffs.append(f"GPU {b.gpu or 'none'} vs {a.gpu or 'none'}")
    return diffs


def _skip_reason(doc: Document, pattern: str) -> str:
    """Why a budget's results may be missing: entries of ``doc.skipped`` its pattern names."""
    segments = pattern.split("/")
    hits = [f"{k}: {why}" for k, why in doc.skipped.items()
            if k == segments[0] or pattern.startswith(k + "/") or k in segments or fnmatchcase(k, pattern)]
    return f"; skipped in this run: {'; '.join(hits)}" if hits else ""


def _check_budget(doc: Document, b: Budget) -> list[CheckLine]:
    common = dict(kind="budget", stat=b.stat + (f" {b.stage}" if b.stage else ""), limit=b.limit, op=b.op,
                  note=b.note)
    matches = [r for r in doc.results if fnmatchcase(r.id, b.id)]
    if not matches:
        msg = "not measured: no result matches" + _skip_reason(doc, b.id)
        if not b.optional and not any(c in b.id for c in "*?["):
            close = difflib.get_close_matches(b.id, [r.id for r in doc.results], n=1, cutoff=0.8)
            if close:
                msg += f" (did you mean {close[0]!r}?)"
        return [CheckLine(id=b.id, unit=b.unit or "", passed=b.optional, status="skip" if b.optional else "fail",
                          message=("optional, " if b.optional else "") + msg, **common)]
    lines = []
    for r in matches:
        stats: Stats | None = r.stats
        unit = r.unit
        if b.stage is not None:
            stats, unit = r.stages.get(b.stage), "s"
            if stats is None:
                stages = ", ".join(r.stages) or "none"
                lines.append(CheckLine(id=r.id, unit=unit, passed=b.optional, status="skip" if b.optional else "fail",
                                       message=f"{'optional, ' if b.optional else ''}no stage {b.stage!r} "
                                               f"(stages: {stages})", **common))
                continue
        if b.unit is not None and b.unit != unit:
            lines.append(CheckLine(id=r.id, unit=unit, passed=False, status="fail",
                                   message=f"the budget is in {b.unit!r}, the result in {unit!r}", **common))
            continue
        v = stats.get(b.stat)
        ok = v <= b.limit if b.max is not None else v >= b.limit
        if b.limit == 0:
            msg = "" if ok else ("above the max" if b.max is not None else "below the min")
        elif ok:
            msg = f"{abs(b.limit - v) / abs(b.limit):.0%} headroom"
        else:
            what = "exceeds the max" if b.max is not None else "below the min"
            msg = f"{what} by {abs(v - b.limit) / abs(b.limit):.1%}"
        if stats.n < 20 and b.stat in ("p95", "p99"):
            msg += f" ({b.stat} of n={stats.n})"
        lines.append(CheckLine(id=r.id, measured=v, unit=unit, passed=ok, status="pass" if ok else "fail",
                               message=msg, **common))
    return lines


def _check_regression(doc: Document, base: Document, reg: Regression, report: CheckReport) -> None:
    ignored = lambda rid: any(fnmatchcase(rid, p) for p in reg.ignore)  # noqa: E731
    by_id: dict[str, Result] = {}
    for r in base.results:
        if r.id in by_id:
            report.warnings.append(f"the baseline has result {r.id!r} twice; comparing with the first")
        by_id.setdefault(r.id, r)
    f = reg.max_fraction
    run_ids = set()
    for r in doc.results:
        run_ids.add(r.id)
        if ignored(r.id):
            report.ignored.append(r.id)
            continue
        common = dict(kind="regression", id=r.id, stat=reg.stat, unit=r.unit)
        cur = r.stats.get(reg.stat)
        b = by_id.get(r.id)
        if b is None:
            report.lines.append(CheckLine(measured=cur, passed=True, status="new", message="not in the baseline",
                                          **common))
            continue
        ref = b.stats.get(reg.stat)
        if b.unit != r.unit:
            report.lines.append(CheckLine(measured=cur, baseline=ref, passed=True, status="skip",
                                          message=f"not compared: unit {b.unit!r} in the baseline, {r.unit!r} now",
                                          **common))
            continue
        if r.better == "lower":
            limit, op = ref * (1 + f), "<="
            ok = cur <= limit
        else:
            limit, op = ref * (1 - f), ">="
            ok = cur >= limit
        change = f"{_pct(cur / ref - 1)} vs baseline {_num(ref, r.unit)}" if ref else f"baseline {_num(ref, r.unit)}"
        allowed = f"{'+' if r.better == 'lower' else '-'}{f * 100:g}%"
        msg = f"{change} ({r.better} is better; fails beyond {allowed})"
        if b.better != r.better:
            msg += f"; the baseline said {b.better} is better"
        report.lines.append(CheckLine(measured=cur, limit=limit, op=op, baseline=ref, passed=ok,
                                      status="pass" if ok else "fail", message=msg, **common))
    for rid, b in by_id.items():
        if rid not in run_ids and not ignored(rid):
            report.lines.append(CheckLine(kind="regression", id=rid, stat=reg.stat, baseline=b.stats.get(reg.stat),
                                          unit=b.unit, passed=True, status="not run",
                                          message=f"in the baseline ({_num(b.stats.get(reg.stat), b.unit)}), "
                                                  "not in this run"))


def evaluate(doc: Document, budgets: Budgets, *, results_source: str | None = None) -> CheckReport:
    """Check a results document against loaded budgets (and their baseline, if any)."""
    reg = budgets.file.regression
    report = CheckReport(budgets=budgets.source, description=budgets.file.description,
                         results=_describe(doc, results_source))
    for b in budgets.file.budgets:
        report.lines.extend(_check_budget(doc, b))
    if reg is not None:
        if budgets.baseline is None:
            if budgets.baseline_path is None:
                raise BudgetError(f"{budgets.source}: [regression] without a baseline")
            try:
                budgets.baseline = load_results(budgets.baseline_path)
            except BudgetError as exc:
                raise BudgetError(f"{budgets.source}: [regression] baseline: {exc}") from exc
        base = budgets.baseline
        report.baseline = _describe(base, str(budgets.baseline_path) if budgets.baseline_path else None)
        report.regression_stat, report.max_fraction = reg.stat, reg.max_fraction
        diffs = _machine_differences(doc.machine, base.machine)
        if diffs:
            report.warnings.append("the baseline ran on a different machine (" + "; ".join(diffs) +
                                   "): comparisons across machines mean little")
        if doc.options.quick != base.options.quick:
            report.warnings.append(f"comparing a {'quick' if doc.options.quick else 'full'} run with a "
                                   f"{'quick' if base.options.quick else 'full'} baseline")
        _check_regression(doc, base, reg, report)
    return report


def check(doc: Document, budgets_path: Path | str | Budgets, *, results_source: str | None = None) -> CheckReport:
    """Check ``doc`` against a budgets file (a path, or `Budgets` from `load_budgets`).
    Raises `BudgetError` when the budgets file or its baseline cannot be used."""
    budgets = budgets_path if isinstance(budgets_path, Budgets) else load_budgets(budgets_path)
    return evaluate(doc, budgets, results_source=results_source)


def gate(doc: Document, budgets_path: Path | str | Budgets, out: TextIO | None = None, err: TextIO | None = None,
         *, results_source: str | None = None) -> int:
    """`check` and print the report: the exit code (0 pass, 1 a check failed, 2 bad input)."""
    out = out or sys.stdout
    err = err or out
    try:
        report = check(doc, budgets_path, results_source=results_source)
    except BudgetError as exc:
        print(f"budget check: {exc}", file=err)
        return EXIT_BAD_INPUT
    out.write(report.format())
    return report.exit_code


def run_check(results_path: Path | str, budgets_path: Path | str, out: TextIO | None = None,
              err: TextIO | None = None) -> int:
    """Check a stored results file: prints the report to ``out`` (default stdout) and problems with
    the input to ``err`` (default: ``out``); returns 0 pass, 1 a check failed, 2 bad input."""
    out = out or sys.stdout
    err = err or out
    try:
        budgets = load_budgets(budgets_path)
        doc = load_results(results_path)
    except BudgetError as exc:
        print(f"budget check: {exc}", file=err)
        return EXIT_BAD_INPUT
    return gate(doc, budgets, out, err, results_source=str(results_path))


# --------------------------------------------------------------------------- suggest


def _round_sig(x: float, digits: int, up: bool) -> float:
    if x == 0:
        return 0.0
    q = Decimal(1).scaleb(math.floor(math.log10(abs(x))) - digits + 1)
    return float(Decimal(repr(x)).quantize(q, rounding=ROUND_CEILING if up else ROUND_FLOOR))


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")  # JSON strings are TOML basic strings


def _toml_float(x: float) -> str:
    text = repr(float(x))
    return text if any(c in text for c in ".en") else text + ".0"


def suggest(doc: Document, margin: float = 0.5, stat: str = "p95", *, baseline: str | None = None,
            max_fraction: float = 0.25) -> str:
    """A starting budgets TOML for the machine ``doc`` ran on: for every result, its ``stat`` with
    ``margin`` of slack (lower-is-better: ``max = value * (1 + margin)`` rounded up; higher-is-better:
    ``min = value * (1 - margin)`` rounded down; three significant digits), so the run it came from
    passes. With ``baseline`` (a path as it should appear in the file) a [regression] table is
    written; otherwise a commented-out one. Budgets are per hardware: generate one per machine class."""
    if stat not in STATS:
        raise ValueError(f"unknown statistic {stat!r}; one of {', '.join(STATS)}")
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin {margin} must be >= 0")
    if margin >= 1 and any(r.better == "higher" for r in doc.results):
        raise ValueError(f"margin {margin} would put a throughput minimum at or below zero; use 0 <= margin < 1")
    m = doc.machine
    desc = f"{m.cores}-core {m.cpu or 'CPU'}" + (f", {m.gpu}" if m.gpu else ", no GPU")
    out = [
        "# Budgets for `appliance bench --check` (see bench/budgets.py for the format).",
        "# Budgets are per hardware: these were generated from one run on the machine below and hold",
        "# only for that machine class. Review every number before gating a release on it.",
        f"# Generated from: {doc.started:%Y-%m-%d %H:%M} run on {m.hostname}, git {doc.git.revision}"
        f"{' (dirty)' if doc.git.dirty else ''}, {'quick' if doc.options.quick else 'full'} run,"
        f" {stat} with {margin * 100:g}% margin.",
        f"description = {_toml_str(desc)}",
        "",
    ]
    reg = ["[regression]", f"baseline = {_toml_str(baseline or 'results.json')}  # relative to this file's folder",
           f"max_fraction = {_toml_float(max_fraction)}", 'stat = "p50"', "ignore = []"]
    if baseline is None:
        out.append("# Uncomment to also fail on regressions against a stored run:")
        reg = ["# " + line for line in reg]
    out += reg + [""]
    if doc.skipped:
        out.append("# Not run on this machine: " + "; ".join(f"{k} ({v})" for k, v in doc.skipped.items()))
        out.append("")
    for r in doc.results:
        v = r.stats.get(stat)
        out.append("[[budget]]")
        out.append(f"id = {_toml_str(r.id)}")
        out.append(f"stat = {_toml_str(stat)}")
        if r.better == "lower":
            out.append(f"max = {_toml_float(_round_sig(v * (1 + margin), 3, up=True))}  # measured {_num(v, r.unit)}")
        else:
            out.append(f"min = {_toml_float(_round_sig(v * (1 - margin), 3, up=False))}  # measured {_num(v, r.unit)}")
        out.append(f"unit = {_toml_str(r.unit)}")
        out.append(f"note = {_toml_str(f'{r.title} (n={r.stats.n})')}")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.budgets",
        description="Check a benchmark results file against a budgets file (exit 0 pass, 1 fail, 2 bad input), "
                    "or print a starting budgets file for the machine a run came from.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", metavar="BUDGETS.toml", type=Path, help="the budgets file to check against")
    mode.add_argument("--suggest", action="store_true", help="print a budgets TOML from the results (per machine)")
    p.add_argument("results", metavar="RESULTS.json", type=Path)
    p.add_argument("--margin", type=float, default=0.5, help="--suggest: slack over the measured value (0.5)")
    p.add_argument("--stat", choices=STATS, default="p95", help="--suggest: the statistic budgeted (p95)")
    p.add_argument("--baseline", help="--suggest: write a [regression] table with this baseline path")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # --help: 0; bad arguments: 2
        return int(exc.code or 0)
    if args.check is not None:
        return run_check(args.results, args.check, sys.stdout, sys.stderr)
    try:
        doc = load_results(args.results)
        text = suggest(doc, args.margin, args.stat, baseline=args.baseline)
    except (BudgetError, ValueError) as exc:
        print(f"budget suggest: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    sys.stdout.write(text)
    return EXIT_PASS


if __name__ == "__main__":
    sys.exit(main())
