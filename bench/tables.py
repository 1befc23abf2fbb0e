"""The report's Markdown tables: one row per result (what it is, n, the order statistics, the
peer and the ratio, the extra numbers, its id) and the e2e per-stage breakdown."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from bench.labels import as_text, cube_label, fields, fmt, fmt_ratio, measure_label, series_label, stage_order
from bench.schema import Result

EXTRA_NAMES = {"mb_per_s": "MB/s p50", "ms_per_slice": "ms/slice p50", "mvoxels_per_s": "Mvoxel/s p50",
               "batch_makespan_s_p50": "batch makespan p50 (s)", "seconds_per_iteration": "s/iteration p50"}


def cell(v: Any) -> str:
    """A value as a Markdown table cell: as `as_text` shows it, pipes escaped, on one line."""
    return as_text(v).replace("|", "\\|").replace("\n", " ")


Column = tuple[str, Callable[[Result, dict[str, Any]], Any]]

_PARAM_COLUMNS: dict[str, list[Column]] = {
    "e2e": [
        ("Pipeline", lambda r, f: f.get("pipeline")),
        ("Series (cols×rows×slices)", lambda r, f: series_label(f)),
        ("Sender", lambda r, f: f.get("sender")),
        ("Concurrent studies", lambda r, f: f.get("concurrency")),
        ("Measure", lambda r, f: measure_label(f.get("measure")) if f.get("measure") else None),
    ],
    "ingest": [
        ("Receiver", lambda r, f: f.get("receiver")),
        ("Sender", lambda r, f: f.get("sender")),
        ("Series (cols×rows×slices)", lambda r, f: series_label(f)),
        ("Study MB", lambda r, f: fmt(f["bytes"] / 1e6) if isinstance(f.get("bytes"), (int, float)) else None),
    ],
    "denoise": [
        ("Backend", lambda r, f: f.get("backend")),
        ("Model", lambda r, f: f.get("model")),
        ("Volume (cols×rows×slices)", lambda r, f: series_label(f)),
        ("Slab", lambda r, f: f.get("slab")),
    ],
    "recon": [
        ("Backend", lambda r, f: f.get("backend")),
        ("Algorithm", lambda r, f: f.get("algorithm")),
        ("Volume", lambda r, f: cube_label(f)),
        ("Views", lambda r, f: f.get("views")),
        ("Detector", lambda r, f: f.get("detector")),
        ("Iterations", lambda r, f: f.get("iterations")),
        ("Subsets", lambda r, f: f.get("subsets")),
    ],
    "kernels": [
        ("Backend", lambda r, f: f.get("backend")),
        ("Operation", lambda r, f: f.get("operation")),
        ("Volume", lambda r, f: cube_label(f)),
        ("Views", lambda r, f: f.get("views")),
        ("Detector", lambda r, f: f.get("detector")),
    ],
}


#: params shown by the columns above (or folded into them); any other param goes to "other params"
_SHOWN_PARAMS = {
    "e2e": {"pipeline", "slices", "rows", "cols", "sender", "concurrency", "measure", "console"},
    "ingest": {"receiver", "sender", "slices", "rows", "cols", "bytes"},
    "denoise": {"backend", "model", "slices", "rows", "cols", "slab"},
    "recon": {"backend", "algorithm", "n", "views", "detector", "iterations", "subsets"},
    "kernels": {"backend", "operation", "n", "views", "detector"},
}


def _other_params(r: Result) -> str | None:
    shown = _SHOWN_PARAMS.get(r.scenario, set())
    rest = {k: v for k, v in r.params.items() if k not in shown and v is not None}
    return ", ".join(f"{k}={as_text(v)}" for k, v in rest.items()) or None


def markdown_table(header: list[str], rows: list[list[Any]], align: list[str] | None = None) -> list[str]:
    """A Markdown table's lines; ``align``: "l" or "r" per column (default all left)."""
    align = align or ["l"] * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(str(h).replace("|", "\\|") for h in header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def _drop_empty_columns(header: list[str], rows: list[list[Any]], align: list[str], keep: int) -> tuple:
    """Leave out the descriptive columns (those before index ``keep``) that no row has a value for."""
    cols = [i for i in range(len(header)) if i >= keep or any(as_text(row[i]) != "—" for row in rows)]
    return [header[i] for i in cols], [[row[i] for i in cols] for row in rows], [align[i] for i in cols]


def result_table(results: list[Result], exclude: Iterable[str] = ()) -> list[str]:
    """One row per result: what it is (from id and params), n, the order statistics, unit, the
    peer's p50 and the ratio where there is a peer, the extra numbers, and the id (what budgets
    refer to). ``exclude``: descriptive columns left out (the same for every row)."""
    if not results:
        return []
    scenario = results[0].scenario
    param_cols = [c for c in _PARAM_COLUMNS.get(scenario, []) if c[0] not in set(exclude)]
    param_cols.append(("other params", lambda r, f: _other_params(r)))
    extras: list[str] = []
    for r in results:
        extras += [k for k in r.extra if k not in extras]
    with_peer = any(r.peer is not None for r in results)
    warmups = {r.warmup for r in results}
    stat_names = ["min", "p50", "p95", "p99", "max"]

    header = [h for h, _ in param_cols]
    align = ["l"] * len(header)
    header += ["n"] + (["warm-up"] if len(warmups) > 1 else []) + stat_names + ["unit"]
    align += ["r"] * (1 + (len(warmups) > 1) + len(stat_names)) + ["l"]
    if with_peer:
        header += ["peer", "peer p50", "ratio"]
        align += ["l", "r", "r"]
    header += [EXTRA_NAMES.get(k, k) for k in extras] + ["id"]
    align += ["r"] * len(extras) + ["l"]

    rows = []
    for r in results:
        f = fields(r)
        row: list[Any] = [fn(r, f) for _, fn in param_cols]
        row += [r.stats.n] + ([r.warmup] if len(warmups) > 1 else [])
        row += [fmt(r.stats.get(s)) for s in stat_names] + [r.unit]
        if with_peer:
            row += ([r.peer.name, fmt(r.peer.stats.p50), fmt_ratio(r.peer.ratio)] if r.peer else ["—", "—", "—"])
        row += [fmt(r.extra.get(k)) for k in extras] + [f"`{r.id}`"]
        rows.append(row)
    n_params = len(param_cols)
    header, rows, align = _drop_empty_columns(header, rows, align, keep=n_params)
    if not any(h in header for h, _ in param_cols):  # nothing known about these results: say what they are
        header, align = ["Result"] + header, ["l"] + align
        rows = [[r.title] + row for r, row in zip(results, rows)]

    lines = markdown_table(header, rows, align)
    better = {r.better for r in results}
    notes = []
    if len(warmups) == 1:
        w = warmups.pop()
        notes.append(f"n samples after {w} warm-up run{'s' if w != 1 else ''}")
    else:
        notes.append("n samples after the warm-up runs shown")
    if len(better) == 1:
        notes.append(f"{better.pop()} is better")
    if with_peer:
        notes.append("ratio = this p50 / the peer's p50")
    few = sorted({r.stats.n for r in results if r.stats.n < 20})
    if few:
        notes.append(f"n < 20 in {sum(r.stats.n < 20 for r in results)} of {len(results)} rows: "
                     "there p95 and p99 lie between the two largest samples")
    lines += ["", "*" + "; ".join(notes) + ".*"]
    return lines


def stage_table(results: list[Result]) -> list[str]:
    """The e2e per-stage breakdown: one row per result with stages, each stage's p50 / p95."""
    staged = [r for r in results if r.stages]
    if not staged:
        return []
    stages = stage_order(staged)
    header = ["Series (cols×rows×slices)", "Sender", "Concurrent studies", "n"] + stages + ["end to end"]
    align = ["l", "l", "r", "r"] + ["r"] * (len(stages) + 1)
    rows = []
    odd_n = False
    for r in staged:
        f = fields(r)
        row: list[Any] = [series_label(f), f.get("sender"), f.get("concurrency"), r.stats.n]
        for s in stages:
            st = r.stages.get(s)
            if st is None:
                row.append("—")
                continue
            cell = f"{fmt(st.p50, 3)} / {fmt(st.p95, 3)}"
            if st.n != r.stats.n:
                cell += f" (n={st.n})"
                odd_n = True
            row.append(cell)
        row.append(f"{fmt(r.stats.p50, 3)} / {fmt(r.stats.p95, 3)}")
        rows.append(row)
    lines = markdown_table(header, rows, align)
    unit = staged[0].unit
    note = (f"Each cell: p50 / p95 in {unit} over the n studies, stages in pipeline order. Stages overlap "
            "(receive runs while the series arrives) and percentiles do not add up, so the stages need not "
            "sum to the end-to-end figure.")
    if odd_n:
        note += " (n=…) marks a stage measured on a different number of samples."
    return lines + ["", f"*{note}*"]
