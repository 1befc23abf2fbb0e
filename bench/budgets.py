"""The budgets file a release is gated on (TOML): its format, reading and validating it (and
loading its baseline run), and writing a starting one from a run (`suggest`). The check itself,
its report and the command line are in bench/gate.py::

    python -m bench.gate --check budgets.toml results.json     # exit 0 pass, 1 fail, 2 bad input
    python -m bench.gate --suggest results.json > budgets.toml  # a starting budget file

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

import json
import math
import tomllib
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bench.schema import SCHEMA_ID, STATS, Document

Stat = Literal["min", "p50", "p95", "p99", "max", "mean"]
assert set(Stat.__args__) == set(STATS)  # type: ignore[attr-defined]


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


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BudgetError(f"{path}: cannot read the {what} file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise BudgetError(f"{path}: not UTF-8 text: {exc}") from exc


def load_budgets(path: str | Path, *, load_baseline: bool = True) -> Budgets:
    """Read, validate and (with ``load_baseline``) load the baseline of a budgets file; raises
    `BudgetError`. Cheap: call it before a long run so a typo fails in a second, not after it."""
    path = Path(path)
    file = parse_budgets(_read_text(path, "budgets"), str(path))
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
    text = _read_text(path, "results")
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


# --------------------------------------------------------------------------- a starting file


def quantity(x: float | None, unit: str = "") -> str:
    """A measured value and its unit, as the gate's log and a suggested budgets file write it:
    about four significant digits, never in exponent form for everyday magnitudes."""
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
    ``min = value * (1 - margin)`` rounded down, on the ``min`` statistic unless ``stat`` is p50 or
    mean, because a throughput's bad tail is its low end; three significant digits), so the run it came from
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
        # The tail that matters: a latency's high percentile, a throughput's low end (the
        # statistics have no p5, so its worst sample).
        used = stat if r.better == "lower" or stat in ("p50", "mean") else "min"
        v = r.stats.get(used)
        out.append("[[budget]]")
        out.append(f"id = {_toml_str(r.id)}")
        out.append(f"stat = {_toml_str(used)}")
        if r.better == "lower":
            bound = f"max = {_toml_float(_round_sig(v * (1 + margin), 3, up=True))}"
        else:
            bound = f"min = {_toml_float(_round_sig(v * (1 - margin), 3, up=False))}"
        out.append(f"{bound}  # measured {quantity(v, r.unit)}")
        out.append(f"unit = {_toml_str(r.unit)}")
        out.append(f"note = {_toml_str(f'{r.title} (n={r.stats.n})')}")
        out.append("")
    return "\n".join(out)
