"""The budget gate: does a benchmark run meet its budgets, and did it regress against a baseline?

QA gates a release on ``appliance bench --check budgets.toml`` (after a run) or
``appliance bench --results RESULTS.json --check budgets.toml`` (on a stored run), or directly::

    python -m bench.gate --check budgets.toml results.json     # exit 0 pass, 1 fail, 2 bad input
    python -m bench.gate --suggest results.json > budgets.toml  # a starting budget file

The budgets file, and the rules of what passes, fails or only warns, are in bench/budgets.py.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal, TextIO

from pydantic import BaseModel, Field

from bench.budgets import (Budget, BudgetError, Budgets, Regression, load_budgets, load_results, quantity,
                           suggest)
from bench.schema import STATS, Document, Machine, Result, Stats

EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2


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
            limit = f"{line.op} {quantity(line.limit, line.unit)}" if line.limit is not None and line.op else "-"
            msg = line.message + (f"  [{line.note}]" if line.note else "")
            measured = quantity(line.measured, line.unit)
            rows.append((line.status.upper(), line.kind, line.stat, measured, limit, line.id, msg))
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
        change = f"baseline {quantity(ref, r.unit)}"
        if ref:
            change = f"{_pct(cur / ref - 1)} vs " + change
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
                                          message=f"in the baseline ({quantity(b.stats.get(reg.stat), b.unit)}), "
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


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.gate",
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
