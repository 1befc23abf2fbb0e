"""Render an ``appliance bench`` results document as a Markdown report with PNG plots.

    python -m bench.render bench/results/RUN/results.json [--out DIR]

The report (``report.md``, next to the plots) is what a QA engineer signs off on: where and how
the run was made, one table per scenario (n, min, p50, p95, p99, max, the ratio to a peer where
there is one), the end-to-end per-stage breakdown, and plots of the cost model: latency per stage,
latency against slices per series and against concurrent studies, denoise throughput against
volume size, ingest against dcmtk ``storescp``, projector throughput. A plot whose data is absent
from the document (a run of some scenarios only, a quick run with one series size) is left out
with a note saying why; any document that validates renders.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from bench.schema import SCENARIOS, Document, Result, Stats, load  # noqa: E402

DPI = 110
REPORT_NAME = "report.md"

#: Every plot the renderer can write, by a fixed file name (stale copies are removed on re-render).
PLOT_FILES = {
    "e2e_stages": "e2e-stages.png",
    "e2e_stages_stacked": "e2e-stages-stacked.png",
    "e2e_slices": "e2e-latency-vs-slices.png",
    "e2e_concurrency": "e2e-latency-vs-concurrency.png",
    "e2e_samples": "e2e-samples.png",
    "ingest": "ingest-throughput.png",
    "denoise": "denoise-throughput.png",
    "kernels": "kernels-gups.png",
}

FIRST_BYTE = "first_byte_to_last_response"
LAST_IMAGE = "last_image_to_last_response"
MEASURES = {
    FIRST_BYTE: "first byte → last response",
    LAST_IMAGE: "last image → last response",
}
EXTRA_NAMES = {"mb_per_s": "MB/s p50", "ms_per_slice": "ms/slice p50", "mvoxels_per_s": "Mvoxel/s p50",
               "batch_makespan_s_p50": "batch makespan p50 (s)", "seconds_per_iteration": "s/iteration p50"}
SCENARIO_TITLES = {
    "e2e": "End to end (e2e)",
    "ingest": "Ingest",
    "denoise": "Denoise",
    "recon": "Reconstruction (recon)",
    "kernels": "Projector kernels",
}
SCENARIO_NOTES = {
    "e2e": ("The real daemon on loopback: a synthetic study sent over DICOM, timed per study. "
            f"*{MEASURES[FIRST_BYTE]}*: from the first byte sent to the last C-STORE response at the "
            f"destination. *{MEASURES[LAST_IMAGE]}*: from the last source image's C-STORE response to "
            "the last derived image's, i.e. what the technologist waits for after the scan."),
    "ingest": ("Instances per second received by the storage SCP, the appliance side by side with dcmtk "
               "`storescp` on the same machine and the same study. ratio = appliance p50 / storescp p50: "
               "above 1 the appliance receives faster."),
    "denoise": "The denoise stage alone on an in-memory volume, per backend.",
    "recon": "Iterative/analytic reconstruction alone on an in-memory phantom, per backend.",
    "kernels": ("Forward and back projection throughput in GUPS (giga voxel-updates per second: "
                "voxels × views / seconds / 10⁹); higher is better."),
}

_NUM = r"(?P<cols>\d+)x(?P<rows>\d+)x(?P<slices>\d+)"
_ID_PATTERNS = {
    "e2e": re.compile(rf"^e2e/(?P<pipeline>[^/]+)/{_NUM}/(?P<sender>[^/]+)/c(?P<concurrency>\d+)/(?P<measure>[^/]+)$"),
    "ingest": re.compile(rf"^ingest/(?P<receiver>[^/]+)/{_NUM}/(?P<sender>[^/]+)$"),
    "denoise": re.compile(rf"^denoise/(?P<backend>[^/]+)/{_NUM}$"),
    "recon": re.compile(r"^recon/(?P<backend>[^/]+)/(?P<algorithm>[^/]+)/(?P<n>\d+)\^3$"),
    "kernels": re.compile(r"^kernels/(?P<backend>[^/]+)/(?P<operation>[^/]+)/(?P<n>\d+)\^3$"),
}
_OPERATIONS = ("forward_joseph", "adjoint_joseph", "backproject_fdk")
_RECEIVERS = ("appliance", "dcmtk-storescp")
_SENDERS = ("appliance-scu", "dcmtk-storescu")


# --------------------------------------------------------------------------------------------
# numbers and fields


def fmt(x: float | None, sig: int = 4) -> str:
    """A number for a table: ``sig`` significant digits, trailing zeros kept (12.30, 0.1230,
    1234, 12346); below 1e-4 in scientific notation; None as an em dash."""
    if x is None:
        return "—"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    a = abs(x)
    if a < 1e-4:
        return f"{x:.{sig - 1}e}"
    decimals = max(0, sig - 1 - math.floor(math.log10(a)))
    return f"{x:.{decimals}f}"


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v == int(v):
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        return int(v)
    return None


def fields(r: Result) -> dict[str, Any]:
    """What a result is about: the parts of its id (by the conventions in bench/schema.py), with
    its params on top (params win; either alone is enough)."""
    out: dict[str, Any] = {}
    pattern = _ID_PATTERNS.get(r.scenario)
    m = pattern.match(r.id) if pattern else None
    if m:
        out.update({k: (int(v) if v.isdigit() else v) for k, v in m.groupdict().items()})
    out.update({k: v for k, v in r.params.items() if v is not None})
    for k in ("cols", "rows", "slices", "concurrency", "n", "views", "iterations", "slab", "bytes"):
        if k in out and _int(out[k]) is not None:
            out[k] = _int(out[k])
    return out


def _text(v: Any) -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return fmt(v)
    if isinstance(v, (list, tuple)):
        return "×".join(_text(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k} {_text(x)}" for k, x in v.items())
    return str(v)


def _cell(v: Any) -> str:
    return _text(v).replace("|", "\\|").replace("\n", " ")


def series_label(f: dict[str, Any]) -> str:
    c, r, s = f.get("cols"), f.get("rows"), f.get("slices")
    if c is not None and r is not None and s is not None:
        return f"{c}×{r}×{s}"
    if s is not None:
        return f"{s} slices"
    return "—"


def cube_label(f: dict[str, Any]) -> str:
    return f"{f['n']}³" if f.get("n") is not None else "—"


def measure_label(m: Any) -> str:
    if m is None:
        return "—"
    return MEASURES.get(str(m), str(m).replace("_to_", " → ").replace("_", " "))


def _measure_rank(m: Any) -> int:
    return {FIRST_BYTE: 0, LAST_IMAGE: 1}.get(str(m), 2)


def _rank(value: Any, order: tuple[str, ...]) -> int:
    return order.index(value) if value in order else len(order)


def _sortable(v: Any) -> tuple:
    if v is None:
        return (2, 0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0, str(v))


def _number(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return v
    return None


def _concurrency(r: Result) -> int:
    """Concurrent studies of an e2e result; 1 where the result does not say."""
    c = _int(fields(r).get("concurrency"))
    return c if c is not None and c >= 1 else 1


def _voxels(f: dict[str, Any]) -> int | None:
    c, r, s = f.get("cols"), f.get("rows"), f.get("slices")
    if isinstance(c, int) and isinstance(r, int) and isinstance(s, int):
        return c * r * s
    return None


def _sort_key(r: Result) -> tuple:
    f = fields(r)
    keys: dict[str, list] = {
        "e2e": [f.get("pipeline"), _measure_rank(f.get("measure")), f.get("concurrency"), f.get("slices"),
                _voxels(f), _rank(f.get("sender"), _SENDERS), f.get("sender")],
        "ingest": [_voxels(f), f.get("slices"), _rank(f.get("sender"), _SENDERS), f.get("sender"),
                   _rank(f.get("receiver"), _RECEIVERS), f.get("receiver")],
        "denoise": [f.get("backend"), _voxels(f)],
        "recon": [f.get("backend"), f.get("algorithm"), f.get("n")],
        "kernels": [f.get("backend"), _rank(f.get("operation"), _OPERATIONS), f.get("operation"), f.get("n")],
    }
    return tuple(_sortable(v) for v in keys.get(r.scenario, [])) + (_sortable(r.id),)


# --------------------------------------------------------------------------------------------
# tables

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
    "e2e": {"pipeline", "slices", "rows", "cols", "sender", "concurrency", "measure"},
    "ingest": {"receiver", "sender", "slices", "rows", "cols", "bytes"},
    "denoise": {"backend", "model", "slices", "rows", "cols", "slab"},
    "recon": {"backend", "algorithm", "n", "views", "detector", "iterations", "subsets"},
    "kernels": {"backend", "operation", "n", "views", "detector"},
}


def _other_params(r: Result) -> str | None:
    shown = _SHOWN_PARAMS.get(r.scenario, set())
    rest = {k: v for k, v in r.params.items() if k not in shown and v is not None}
    return ", ".join(f"{k}={_text(v)}" for k, v in rest.items()) or None


def _table(header: list[str], rows: list[list[Any]], align: list[str] | None = None) -> list[str]:
    align = align or ["l"] * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(str(h).replace("|", "\\|") for h in header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _drop_empty_columns(header: list[str], rows: list[list[Any]], align: list[str], keep: int) -> tuple:
    """Leave out the descriptive columns (those before index ``keep``) that no row has a value for."""
    cols = [i for i in range(len(header)) if i >= keep or any(_text(row[i]) != "—" for row in rows)]
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

    lines = _table(header, rows, align)
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


def _stage_order(results: Iterable[Result]) -> list[str]:
    order: list[str] = []
    for r in results:
        for s in r.stages:
            if s not in order:
                order.append(s)
    return order


def stage_table(results: list[Result]) -> list[str]:
    """The e2e per-stage breakdown: one row per result with stages, each stage's p50 / p95."""
    staged = [r for r in results if r.stages]
    if not staged:
        return []
    stages = _stage_order(staged)
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
    lines = _table(header, rows, align)
    unit = staged[0].unit
    note = (f"Each cell: p50 / p95 in {unit} over the n studies, stages in pipeline order. Stages overlap "
            "(receive runs while the series arrives) and percentiles do not add up, so the stages need not "
            "sum to the end-to-end figure.")
    if odd_n:
        note += " (n=…) marks a stage measured on a different number of samples."
    return lines + ["", f"*{note}*"]


# --------------------------------------------------------------------------------------------
# plots


# matplotlib 3.10 added ``orientation`` and deprecated ``vert`` (removed in 3.13)
_HORIZONTAL = ({"orientation": "horizontal"}
               if tuple(int(x) for x in re.findall(r"\d+", matplotlib.__version__)[:2]) >= (3, 10) else {"vert": False})


class _Skip(Exception):
    """A plot not drawn for want of data; the message says why (it goes into the report)."""


@dataclass
class Plot:
    key: str
    title: str
    file: str | None = None  # set when written
    why_not: str | None = None  # set when skipped


def _save(fig, out_dir: Path, key: str) -> str:
    name = PLOT_FILES[key]
    try:
        fig.savefig(out_dir / name, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return name


def _colors(n: int, cmap: str = "tab10") -> list:
    cm = plt.get_cmap(cmap)
    if cmap in ("tab10", "tab20"):
        return [cm(i % cm.N) for i in range(n)]
    return [cm(0.15 + 0.7 * i / max(1, n - 1)) for i in range(n)]


def _log_if_wide(ax, values: Iterable[float], axis: str = "y", span: float = 30.0) -> bool:
    """A log scale when the values (all positive) span more than ``span``×: a GPU backend next to the
    host twin would otherwise flatten the host's bars to nothing."""
    vs = [v for v in values if math.isfinite(v)]
    if not vs or min(vs) <= 0 or max(vs) / min(vs) <= span:
        return False
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    return True


def _measures(results: list[Result]) -> list[str]:
    ms = sorted({str(fields(r).get("measure")) for r in results}, key=lambda m: (_measure_rank(m), m))
    return ms


def _result_label(r: Result, with_pipeline: bool = False) -> str:
    f = fields(r)
    parts = []
    if with_pipeline and f.get("pipeline"):
        parts.append(str(f["pipeline"]))
    parts += [f"{f['slices']} sl" if f.get("slices") is not None else series_label(f),
              str(f.get("sender", "?")), f"c{f.get('concurrency', '?')}"]
    return " · ".join(parts)


def _plot_e2e_stages(e2e: list[Result], out_dir: Path) -> str:
    staged = [r for r in e2e if r.stages]
    if not staged:
        raise _Skip("no e2e result carries per-stage timings")
    c_min = min(_concurrency(r) for r in staged)
    base = [r for r in staged if _concurrency(r) == c_min]
    panels: dict[tuple, list[Result]] = {}
    for r in sorted(base, key=_sort_key):
        f = fields(r)
        panels.setdefault((_text(f.get("pipeline")), _text(f.get("sender"))), []).append(r)
    pipelines = {p for p, _ in panels}
    sizes = sorted({series_label(fields(r)) for r in base}, key=lambda s: _sortable_size(s, base))
    size_colors = dict(zip(sizes, _colors(len(sizes), "viridis")))
    n_panels = len(panels)
    n_cols = min(n_panels, 2)
    n_rows = math.ceil(n_panels / n_cols)
    stages_all = _stage_order(base)
    height = max(3.0, 0.2 * len(stages_all) * max(1, len(sizes)) + 1.5)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(6.5 * n_cols, height * n_rows), squeeze=False, sharex=True)
    unit = base[0].unit
    for ax, ((pipeline, sender), rs) in zip(axes.flat, panels.items()):
        stages = _stage_order(rs)
        k = len(rs)
        h = 0.8 / k
        for j, r in enumerate(rs):
            ys = [i - 0.4 + h * (j + 0.5) for i in range(len(stages))]
            p50 = [r.stages[s].p50 if s in r.stages else math.nan for s in stages]
            p95 = [r.stages[s].p95 if s in r.stages else math.nan for s in stages]
            err = [[0.0] * len(stages), [max(0.0, b - a) if math.isfinite(b - a) else 0.0 for a, b in zip(p50, p95)]]
            label = series_label(fields(r))
            ax.barh(ys, p50, height=h * 0.9, color=size_colors.get(label), label=label,
                    xerr=err, error_kw={"ecolor": "0.25", "capsize": 2, "lw": 1})
        ax.set_yticks(range(len(stages)), stages)
        ax.invert_yaxis()
        ax.set_xlabel(f"stage latency ({unit}): bar p50, whisker p95")
        title = f"sender {sender}" + (f", pipeline {pipeline}" if len(pipelines) > 1 else "")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(title="series", fontsize=8, title_fontsize=8, loc="best")
    for ax in list(axes.flat)[n_panels:]:
        ax.set_visible(False)
    fig.suptitle(f"e2e latency per stage (p50 and p95), {c_min} concurrent stud{'y' if c_min == 1 else 'ies'}")
    fig.tight_layout()
    return _save(fig, out_dir, "e2e_stages")


def _sortable_size(label: str, results: list[Result]) -> tuple:
    for r in results:
        f = fields(r)
        if series_label(f) == label:
            return (_sortable(_voxels(f)), _sortable(f.get("slices")), label)
    return ((2, 0, ""), (2, 0, ""), label)


def _plot_e2e_stacked(e2e: list[Result], out_dir: Path) -> str:
    staged = sorted([r for r in e2e if r.stages], key=_sort_key)
    if not staged:
        raise _Skip("no e2e result carries per-stage timings")
    stages = _stage_order(staged)
    colors = _colors(len(stages), "tab10" if len(stages) <= 10 else "tab20")
    with_pipeline = len({fields(r).get("pipeline") for r in staged}) > 1
    labels = [_result_label(r, with_pipeline) for r in staged]
    fig, ax = plt.subplots(figsize=(9, max(2.8, 0.38 * len(staged) + 1.6)))
    left = [0.0] * len(staged)
    for s, color in zip(stages, colors):
        widths = [r.stages[s].p50 if s in r.stages else 0.0 for r in staged]
        ax.barh(range(len(staged)), widths, left=left, color=color, label=s, height=0.7)
        left = [a + b for a, b in zip(left, widths)]
    ax.plot([r.stats.p50 for r in staged], range(len(staged)), "kD", ms=5, label="end-to-end p50")
    ax.set_yticks(range(len(staged)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"latency ({staged[0].unit}), stage p50s stacked")
    ax.set_title("e2e: where the time goes (stage p50 per series size, sender, concurrency)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, out_dir, "e2e_stages_stacked")


def _line_with_band(ax, xs, rs: list[Result], color, label: str) -> None:
    p50 = [r.stats.p50 for r in rs]
    p95 = [r.stats.p95 for r in rs]
    mx = [r.stats.max for r in rs]
    ax.plot(xs, p50, "o-", color=color, label=label, lw=1.8, ms=5)
    ax.fill_between(xs, p50, p95, color=color, alpha=0.28, lw=0)
    ax.fill_between(xs, p95, mx, color=color, alpha=0.12, lw=0)


def _band_legend_handles() -> list:
    return [Patch(facecolor="0.5", alpha=0.45, label="p50 – p95"),
            Patch(facecolor="0.5", alpha=0.18, label="p95 – max")]


def _plot_e2e_vs(e2e: list[Result], out_dir: Path, x_key: str) -> str:
    """Latency against slices per series (at the lowest concurrency) or against concurrent
    studies (at the series size(s) run concurrently): p50 line, p50–p95 and p95–max bands, one
    line per sender, one panel per measure."""
    if x_key == "slices":
        c_min = min((_concurrency(r) for r in e2e), default=1)
        chosen = [r for r in e2e if _concurrency(r) == c_min]
        line_key = lambda f: (f.get("pipeline"), f.get("cols"), f.get("rows"), f.get("sender"))  # noqa: E731
        key = "e2e_slices"
        xs_all = {_number(fields(r).get("slices")) for r in chosen} - {None}
        if len(xs_all) < 2:
            raise _Skip("fewer than two series sizes at one concurrency in this run")
        title = f"e2e latency vs slices per series, {c_min} concurrent stud{'y' if c_min == 1 else 'ies'}"
        xlabel = "slices per series"
    else:
        concurrent = [r for r in e2e if _concurrency(r) > 1]
        sizes = {(fields(r).get("pipeline"), series_label(fields(r))) for r in concurrent}
        chosen = [r for r in e2e if (fields(r).get("pipeline"), series_label(fields(r))) in sizes]
        line_key = lambda f: (f.get("pipeline"), series_label(f), f.get("sender"))  # noqa: E731
        key = "e2e_concurrency"
        levels = {_concurrency(r) for r in chosen}
        if not concurrent or len(levels) < 2:
            raise _Skip("no e2e results at more than one level of concurrent studies")
        size_names = sorted({s for _, s in sizes})
        title = f"e2e latency vs concurrent studies ({', '.join(size_names)})"
        xlabel = "concurrent studies"
    measures = _measures(chosen)
    lines_all: dict[tuple, None] = {}
    for r in sorted(chosen, key=_sort_key):
        lines_all.setdefault(line_key(fields(r)), None)
    varying = [i for i in range(len(next(iter(lines_all)))) if len({k[i] for k in lines_all}) > 1]
    colors = dict(zip(lines_all, _colors(len(lines_all))))
    fig, axes = plt.subplots(1, len(measures), figsize=(6.0 * len(measures), 4.4), squeeze=False)
    unit = chosen[0].unit
    for ax, m in zip(axes[0], measures):
        in_m = [r for r in chosen if str(fields(r).get("measure")) == m]
        ticks: set = set()
        for lk in lines_all:
            pts = sorted(((_number(fields(r).get(x_key)), r) for r in in_m if line_key(fields(r)) == lk
                          and _number(fields(r).get(x_key)) is not None), key=lambda p: p[0])
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ticks.update(xs)
            parts = [_text(lk[i]) for i in varying] or [_text(lk[-1])]
            if x_key == "slices" and lk[1] is not None and len({k[1:3] for k in lines_all}) > 1:
                parts.append(f"{lk[1]}×{lk[2]}")
            _line_with_band(ax, xs, [p[1] for p in pts], colors[lk], " · ".join(dict.fromkeys(parts)))
        ax.set_xticks(sorted(ticks))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"latency per study ({unit})")
        ax.set_ylim(bottom=0)
        ax.set_title(measure_label(m) if m != "None" else "latency", fontsize=10)
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=handles + _band_legend_handles(), fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_dir, key)


def _plot_e2e_samples(e2e: list[Result], out_dir: Path) -> str:
    if not e2e:
        raise _Skip("no e2e results")
    measures = _measures(e2e)
    with_pipeline = len({fields(r).get("pipeline") for r in e2e}) > 1
    per = {m: sorted([r for r in e2e if str(fields(r).get("measure")) == m], key=_sort_key) for m in measures}
    tallest = max(len(v) for v in per.values())
    fig, axes = plt.subplots(1, len(measures), figsize=(6.0 * len(measures), max(2.8, 0.36 * tallest + 1.6)),
                             squeeze=False)
    rng = np.random.default_rng(0)  # the jitter is the same on every render
    for ax, m in zip(axes[0], measures):
        rs = per[m]
        data = [r.samples for r in rs]
        ax.boxplot(data, **_HORIZONTAL, widths=0.55, showfliers=False, whis=(0, 100),
                   medianprops={"color": "tab:red"}, boxprops={"color": "0.35"})
        for i, r in enumerate(rs, start=1):
            ys = i + rng.uniform(-0.18, 0.18, len(r.samples))
            ax.plot(r.samples, ys, "o", ms=3, alpha=0.6, color="tab:blue")
        ax.set_yticks(range(1, len(rs) + 1), [f"{_result_label(r, with_pipeline)} (n={r.stats.n})" for r in rs])
        ax.invert_yaxis()
        ax.set_xlabel(f"latency per study ({rs[0].unit})")
        ax.set_title(measure_label(m) if m != "None" else "latency", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("e2e raw samples (box: quartiles, whiskers: min–max, red: median)")
    fig.tight_layout()
    return _save(fig, out_dir, "e2e_samples")


def _grouped_bars(ax, groups: list[str], series: list[str], values: dict[tuple[str, str], Stats], colors: list,
                  notes: dict[tuple[str, str], str] | None = None) -> None:
    """Bars of p50 with min–max whiskers, each labelled above with its p50 (and its note)."""
    notes = notes or {}
    w = 0.8 / max(1, len(series))
    for j, (s, color) in enumerate(zip(series, colors)):
        xs, hs, lo, hi = [], [], [], []
        for i, g in enumerate(groups):
            st = values.get((g, s))
            if st is None:
                continue
            x = i - 0.4 + w * (j + 0.5)
            xs.append(x)
            hs.append(st.p50)
            lo.append(max(0.0, st.p50 - st.min))
            hi.append(max(0.0, st.max - st.p50))
            label = fmt(st.p50, 3) + (f"\n{notes[(g, s)]}" if (g, s) in notes else "")
            ax.annotate(label, (x, max(st.max, st.p50)), textcoords="offset points", xytext=(0, 3),
                        ha="center", va="bottom", fontsize=7)
        if xs:
            ax.bar(xs, hs, width=w * 0.9, color=color, label=s, yerr=[lo, hi],
                   error_kw={"ecolor": "0.25", "capsize": 3, "lw": 1})
    ax.set_xticks(range(len(groups)), groups)


def ingest_bars(ingest: list[Result]) -> tuple[list[str], list[str], dict[tuple[str, str], Stats],
                                                dict[tuple[str, str], str]]:
    """The ingest plot's data: groups (series, and sender when several), receivers (appliance
    first), p50 stats per (group, receiver), and the ratio notes. A peer that is also a result of
    its own is that result's bar (the peer's name may be spelt differently from the receiver);
    a peer that is not gets a bar of its own from the peer's stats."""
    values: dict[tuple[str, str], Stats] = {}
    notes: dict[tuple[str, str], str] = {}
    groups: list[str] = []
    receivers: list[str] = []
    ids = {r.id for r in ingest}
    multi_sender = len({fields(r).get("sender") for r in ingest}) > 1

    def add(g: str, recv: str, stats: Stats) -> None:
        groups.extend([g] if g not in groups else [])
        receivers.extend([recv] if recv not in receivers else [])
        values.setdefault((g, recv), stats)

    for r in sorted(ingest, key=_sort_key):
        f = fields(r)
        g = series_label(f) + (f"\n{f.get('sender')}" if multi_sender else "")
        recv = _text(f.get("receiver")) if f.get("receiver") else r.id
        add(g, recv, r.stats)
        if r.peer is not None:
            notes[(g, recv)] = f"{r.peer.ratio:.2f}× vs\n{r.peer.name}"
            if r.peer.id not in ids:
                m = _ID_PATTERNS["ingest"].match(r.peer.id)
                add(g, m["receiver"] if m else r.peer.name, r.peer.stats)
    receivers.sort(key=lambda s: (_rank(s, _RECEIVERS), s))
    return groups, receivers, values, notes


def _plot_ingest(ingest: list[Result], out_dir: Path) -> str:
    if not ingest:
        raise _Skip("no ingest results")
    groups, receivers, values, notes = ingest_bars(ingest)
    multi_sender = len({fields(r).get("sender") for r in ingest}) > 1
    fig, ax = plt.subplots(figsize=(max(5.5, 1.6 * len(groups) * max(1, len(receivers)) / 2 + 2.5), 4.4))
    _grouped_bars(ax, groups, receivers, values, _colors(len(receivers)), notes)
    top = max((st.max for st in values.values() if math.isfinite(st.max)), default=0.0)
    ax.set_ylim(0, top * 1.25 if top > 0 else 1.0)
    ax.set_xlabel("series (cols×rows×slices)" + (" and sender" if multi_sender else ""))
    ax.set_ylabel(f"instances received per second ({ingest[0].unit})")
    ax.set_title("Ingest throughput: appliance vs dcmtk storescp\n(bar p50, whisker min–max; "
                 "label: p50, ratio of the p50s)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="receiver", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, out_dir, "ingest")


def _denoise_points(r: Result) -> dict[str, float] | None:
    f = fields(r)
    vox = _voxels(f)
    slices = f.get("slices")
    if vox is None or not slices:
        return None
    p50, p95 = r.stats.p50, r.stats.p95
    to_ms = 1000.0 / slices if r.unit == "s" else None
    mvs = vox / 1e6
    return {
        "mvox": mvs,
        "ms": p50 * to_ms if to_ms is not None else r.extra.get("ms_per_slice", math.nan),
        "ms_p95": p95 * to_ms if to_ms is not None else math.nan,
        "mvps": mvs / p50 if (r.unit == "s" and p50 > 0) else r.extra.get("mvoxels_per_s", math.nan),
        "mvps_p95": mvs / p95 if (r.unit == "s" and p95 > 0) else math.nan,
    }


def _plot_denoise(denoise: list[Result], out_dir: Path) -> str:
    pts: dict[str, list[tuple[dict[str, float], Result]]] = {}
    for r in sorted(denoise, key=_sort_key):
        p = _denoise_points(r)
        if p is not None:
            pts.setdefault(str(fields(r).get("backend", "?")), []).append((p, r))
    sizes = {round(p["mvox"], 6) for v in pts.values() for p, _ in v}
    if len(sizes) < 2:
        raise _Skip("fewer than two volume sizes in this run")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    colors = dict(zip(pts, _colors(len(pts))))
    for backend, v in pts.items():
        v.sort(key=lambda p: p[0]["mvox"])
        xs = [p["mvox"] for p, _ in v]
        ms = [p["ms"] for p, _ in v]
        ms_err = [max(0.0, p["ms_p95"] - p["ms"]) if math.isfinite(p["ms_p95"]) else 0.0 for p, _ in v]
        ax1.errorbar(xs, ms, yerr=[[0.0] * len(xs), ms_err], fmt="o-", color=colors[backend], label=backend, capsize=3)
        mv = [p["mvps"] for p, _ in v]
        mv_err = [max(0.0, p["mvps"] - p["mvps_p95"]) if math.isfinite(p["mvps_p95"]) else 0.0 for p, _ in v]
        ax2.errorbar(xs, mv, yerr=[mv_err, [0.0] * len(xs)], fmt="o-", color=colors[backend], label=backend,
                     capsize=3)
    labels = {}
    for v in pts.values():
        for p, r in v:
            labels.setdefault(round(p["mvox"], 6), series_label(fields(r)))
    ticks = sorted(labels)
    span = ticks[-1] / ticks[0] if ticks[0] > 0 else 1
    ax1.set_ylabel("ms per slice (p50, whisker p95)")
    ax1.set_title("Denoise time per slice (lower is better)", fontsize=10)
    ax2.set_ylabel("megavoxels/s (p50, whisker p95)")
    ax2.set_title("Denoise throughput (higher is better)", fontsize=10)
    for ax, key in ((ax1, "ms"), (ax2, "mvps")):
        if span > 8:
            ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{labels[t]}\n{t:.3g} Mvox" for t in ticks], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("volume (cols×rows×slices, megavoxels)")
        if _log_if_wide(ax, [p[key] for v in pts.values() for p, _ in v]):
            ax.set_ylabel(ax.get_ylabel() + ", log")
        else:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(title="backend", fontsize=8, title_fontsize=8)
    fig.suptitle("Denoise throughput vs volume size, per backend")
    fig.tight_layout()
    return _save(fig, out_dir, "denoise")


def _plot_kernels(kernels: list[Result], out_dir: Path) -> str:
    if not kernels:
        raise _Skip("no kernels results")
    multi_n = len({fields(r).get("n") for r in kernels}) > 1
    values: dict[tuple[str, str], Stats] = {}
    groups: list[str] = []
    backends: list[str] = []
    ordered = sorted(kernels, key=lambda r: (_rank(fields(r).get("operation"), _OPERATIONS),
                                             _sortable(fields(r).get("operation")), _sort_key(r)))
    for r in ordered:
        f = fields(r)
        g = str(f.get("operation", r.id)) + (f"\n{cube_label(f)}" if multi_n else "")
        b = str(f.get("backend", "?"))
        groups += [g] if g not in groups else []
        backends += [b] if b not in backends else []
        values[(g, b)] = r.stats
    fig, ax = plt.subplots(figsize=(max(5.5, 1.3 * len(groups) * max(1, len(backends)) / 2 + 3), 4.4))
    _grouped_bars(ax, groups, backends, values, _colors(len(backends)))
    log = _log_if_wide(ax, [st.p50 for st in values.values()])
    if log:  # room for the labels above the tallest bar
        ax.set_ylim(top=ax.get_ylim()[1] * 2.5)
    sizes = sorted({cube_label(fields(r)) for r in kernels})
    ax.set_xlabel("operation" + (" and volume" if multi_n else f" ({', '.join(sizes)} volume)"))
    ax.set_ylabel(f"throughput ({kernels[0].unit}, giga voxel-updates/s)" + (", log scale" if log else ""))
    ax.set_title("Projector throughput per operation and backend\n(bar p50, whisker min–max)", fontsize=10)
    if not log:
        ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="backend", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, out_dir, "kernels")


_PLOTS: dict[str, list[tuple[str, str, Callable[[list[Result], Path], str]]]] = {
    "e2e": [
        ("e2e_stages", "Latency per stage", _plot_e2e_stages),
        ("e2e_stages_stacked", "Where the time goes", _plot_e2e_stacked),
        ("e2e_slices", "Latency vs slices per series", lambda rs, d: _plot_e2e_vs(rs, d, "slices")),
        ("e2e_concurrency", "Latency vs concurrent studies", lambda rs, d: _plot_e2e_vs(rs, d, "concurrency")),
        ("e2e_samples", "Raw samples", _plot_e2e_samples),
    ],
    "ingest": [("ingest", "Ingest throughput", _plot_ingest)],
    "denoise": [("denoise", "Denoise throughput vs volume size", _plot_denoise)],
    "kernels": [("kernels", "Projector throughput", _plot_kernels)],
}


def _draw(key: str, title: str, fn: Callable[[list[Result], Path], str], results: list[Result],
          out_dir: Path) -> Plot:
    plot = Plot(key, title)
    try:
        plot.file = fn(results, out_dir)
    except _Skip as e:
        plot.why_not = str(e)
    except Exception as e:  # noqa: BLE001 - a plot must never cost the QA engineer the report
        plt.close("all")
        print(f"bench.render: plot {key} failed: {type(e).__name__}: {e}", file=sys.stderr)
        plot.why_not = f"drawing it failed ({type(e).__name__}: {e})"
    return plot


def _plot_lines(plot: Plot) -> list[str]:
    if plot.file:
        return [f"![{plot.title}]({plot.file})", ""]
    return [f"*No plot “{plot.title}”: {plot.why_not}.*", ""]


# --------------------------------------------------------------------------------------------
# the report


def _header(doc: Document, results_name: str) -> list[str]:
    m, o = doc.machine, doc.options
    when = doc.started
    when_s = when.isoformat(sep=" ", timespec="seconds")
    if when.tzinfo is None:
        when_s += " (local time of the benchmark machine)"
    rev = f"`{doc.git.revision}`" + (" **dirty** (built with uncommitted changes)" if doc.git.dirty else " (clean)")
    gpu = "none"
    if m.gpu:
        gpu = m.gpu + "".join(f", {k} {v}" for k, v in (("driver", m.gpu_driver), ("compute capability",
                                                                                    m.compute_capability)) if v)
    versions = ", ".join(f"{k} {v}" if v else f"{k} (not installed)" for k, v in doc.versions.items()) or "—"
    mode = "quick (CI smoke run; small sizes, numbers indicative only)" if o.quick else "full"
    options = (f"{mode}; {o.repeats} repeat{'s' if o.repeats != 1 else ''} after {o.warmup} warm-up "
               f"run{'s' if o.warmup != 1 else ''}; scenarios: {', '.join(o.scenarios) or '—'}")
    link = f"<{results_name}>" if any(c.isspace() for c in results_name) else results_name
    rows = [
        ["Started", f"{when_s}; the run took {fmt_duration(doc.wall_s)}"],
        ["Git revision", rev],
        ["Machine", f"{m.hostname} ({m.os})"],
        ["CPU", f"{m.cpu}, {m.cores} cores, {fmt(m.memory_gib, 3)} GiB memory"],
        ["GPU", gpu],
        ["Versions", versions],
        ["Options", options],
        ["Command", f"`{o.command}`" if o.command else "—"],
        ["Results", f"[{results_name}]({link}) (schema {doc.schema_id}, {len(doc.results)} results)"],
    ]
    lines = ["# appliance bench report", ""] + _table(["Run", ""], rows) + [""]
    if o.quick:
        lines += ["> **Quick run.** Sizes and repeats are cut down for CI; do not sign off on these numbers.", ""]
    if doc.skipped:
        lines += ["**Not run:**", ""] + [f"- `{k}`: {_cell(v)}" for k, v in doc.skipped.items()] + [""]
    return lines


HOW_TO_READ = """\
## How to read this report

- Every number comes from **n samples** taken after the warm-up runs; each table states n per row.
  min, p50 (median), p95, p99 and max are order statistics of those samples; percentiles
  interpolate linearly between neighbouring samples.
- With few samples the tail percentiles say little: below n = 20, p95 and p99 lie between the
  two largest samples (with n = 5, p95 is 80 % of the way from the second largest to the max),
  and p99 is only meaningful with n of 100 and more. Judge tails with n in mind, and prefer max
  when n is small.
- *lower is better* for latencies (s), *higher is better* for throughputs (1/s, GUPS).
- A **ratio** compares this result's p50 with a named peer's p50 measured in the same run on the
  same machine (e.g. the appliance's SCP against dcmtk `storescp`).
- Each result's `id` is what budgets and baselines refer to (`appliance bench --check`).
"""


def render_report(doc: Document, out_dir: Path, results_name: str = "results.json") -> Path:
    """Write ``out_dir/report.md`` and its PNG plots for ``doc``; return the report's path.

    Plots have fixed names (``PLOT_FILES``); one whose data the document lacks is not drawn (the
    report says why) and a stale copy from an earlier render is removed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PLOT_FILES.values():
        (out_dir / name).unlink(missing_ok=True)

    by_scenario: dict[str, list[Result]] = {}
    for r in doc.results:
        by_scenario.setdefault(r.scenario, []).append(r)
    for rs in by_scenario.values():
        rs.sort(key=_sort_key)

    lines = _header(doc, results_name) + [HOW_TO_READ]
    absent = [s for s in doc.options.scenarios if s not in by_scenario and s not in doc.skipped]
    if absent:
        lines += [f"*Requested but without results: {', '.join(absent)}.*", ""]

    for scenario in SCENARIOS:
        rs = by_scenario.get(scenario)
        if not rs:
            continue
        lines += [f"## {SCENARIO_TITLES[scenario]}", "", SCENARIO_NOTES[scenario], ""]
        if scenario == "e2e":  # one table per measure: they answer different questions
            for m in _measures(rs):
                in_m = [r for r in rs if str(fields(r).get("measure")) == m]
                lines += [f"### {measure_label(m) if m != 'None' else 'Latency'}", ""]
                lines += result_table(in_m, exclude=["Measure"]) + [""]
        else:
            lines += result_table(rs) + [""]
        plots = {key: _draw(key, title, fn, rs, out_dir) for key, title, fn in _PLOTS.get(scenario, [])}
        if scenario == "e2e":
            by_pipeline: dict[str, list[Result]] = {}
            for r in rs:
                if r.stages:
                    by_pipeline.setdefault(str(fields(r).get("pipeline", "—")), []).append(r)
            if by_pipeline:
                lines += ["### Per-stage breakdown", ""]
                for pipeline, staged in by_pipeline.items():
                    if len(by_pipeline) > 1:
                        lines += [f"Pipeline `{pipeline}`:", ""]
                    lines += stage_table(staged) + [""]
                lines += _plot_lines(plots["e2e_stages"]) + _plot_lines(plots["e2e_stages_stacked"])
            lines += ["### Scaling", ""]
            lines += _plot_lines(plots["e2e_slices"]) + _plot_lines(plots["e2e_concurrency"])
            lines += ["### Raw samples", ""] + _plot_lines(plots["e2e_samples"])
        else:
            for plot in plots.values():
                lines += _plot_lines(plot)
    others = [s for s in by_scenario if s not in SCENARIOS]
    for scenario in others:  # the schema's Literal keeps this empty; kept for a future scenario
        lines += [f"## {scenario}", ""] + result_table(by_scenario[scenario]) + [""]
    if doc.config:
        lines += ["## Daemon configuration", "", "<details><summary>effective configuration (e2e, ingest)"
                  "</summary>", "", "```json", json.dumps(doc.config, indent=2, default=str, sort_keys=True),
                  "```", "", "</details>", ""]
    while lines and lines[-1] == "":
        lines.pop()
    report = out_dir / REPORT_NAME
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="the results JSON of an appliance bench run")
    ap.add_argument("--out", type=Path, default=None, help="where report.md and the plots go "
                    "(default: the results file's folder)")
    args = ap.parse_args(argv)
    doc = load(args.results)
    out = args.out if args.out is not None else args.results.resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    name = Path(os.path.relpath(args.results.resolve(), out.resolve())).as_posix()
    print(render_report(doc, out, results_name=name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
