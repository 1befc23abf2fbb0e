"""The end-to-end plots: latency per stage (the distribution of each stage's seconds), where the
time goes (stage p50s stacked), latency against slices per series and against concurrent
studies, and every raw sample."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.patches import Patch

from bench.labels import (as_text, concurrency, fields, finite_number, measure_label, measures, result_label,
                          series_label, sort_key, sortable, stage_order, voxels)
from bench.plots.figures import HORIZONTAL, Skip, colors, save
from bench.schema import Result


def has_stage_samples(results: list[Result]) -> bool:
    """Whether every stage of every result comes with its raw samples (documents written before
    ``stage_samples`` have none): the stage plot then shows distributions, else p50/p95 bars."""
    return all(r.stage_samples.get(s) for r in results for s in r.stages)


def _size_key(label: str, results: list[Result]) -> tuple:
    for r in results:
        f = fields(r)
        if series_label(f) == label:
            return (sortable(voxels(f)), sortable(f.get("slices")), label)
    return ((2, 0, ""), (2, 0, ""), label)


def _stage_bars(ax, r: Result, stages: list[str], ys: list[float], h: float, color) -> None:
    """Bar p50, whisker p95: what a document without per-stage samples can show."""
    p50 = [r.stages[s].p50 if s in r.stages else math.nan for s in stages]
    p95 = [r.stages[s].p95 if s in r.stages else math.nan for s in stages]
    err = [[0.0] * len(stages), [max(0.0, b - a) if math.isfinite(b - a) else 0.0 for a, b in zip(p50, p95)]]
    ax.barh(ys, p50, height=h * 0.9, color=color, label=series_label(fields(r)),
            xerr=err, error_kw={"ecolor": "0.25", "capsize": 2, "lw": 1})


def _stage_boxes(ax, r: Result, stages: list[str], ys: list[float], h: float, color,
                 rng: np.random.Generator) -> None:
    """A box (quartiles, whiskers min–max) per stage with every sample on it as a point: with
    the handful of studies a run measures, the points say more than the box."""
    present = [(y, r.stage_samples[s]) for y, s in zip(ys, stages) if r.stage_samples.get(s)]
    if not present:
        return
    positions, data = [y for y, _ in present], [v for _, v in present]
    edge = "0.3"
    ax.boxplot(data, positions=positions, widths=h * 0.8, **HORIZONTAL, whis=(0, 100), showfliers=False,
               patch_artist=True, manage_ticks=False,
               boxprops={"facecolor": to_rgba(color, 0.35), "edgecolor": edge},
               whiskerprops={"color": edge}, capprops={"color": edge}, medianprops={"color": "tab:red", "lw": 1.5})
    for y, v in present:
        ax.plot(v, y + rng.uniform(-0.3 * h, 0.3 * h, len(v)), "o", ms=2.5, color=color, mec="0.2", mew=0.3,
                alpha=0.85, zorder=3)


def plot_stages(e2e: list[Result], out_dir: Path) -> str:
    """Per stage, the seconds of the reference configurations (the lowest concurrency): one panel
    per sender (and pipeline), one colour per series size. A box and its samples per stage when
    the results carry ``stage_samples``; bars of p50 with a p95 whisker when they do not."""
    staged = [r for r in e2e if r.stages]
    if not staged:
        raise Skip("no e2e result carries per-stage timings")
    c_min = min(concurrency(r) for r in staged)
    base = [r for r in staged if concurrency(r) == c_min]
    panels: dict[tuple, list[Result]] = {}
    for r in sorted(base, key=sort_key):
        f = fields(r)
        panels.setdefault((as_text(f.get("pipeline")), as_text(f.get("sender"))), []).append(r)
    pipelines = {p for p, _ in panels}
    sizes = sorted({series_label(fields(r)) for r in base}, key=lambda s: _size_key(s, base))
    size_colors = dict(zip(sizes, colors(len(sizes), "viridis")))
    distribution = has_stage_samples(base)
    n_panels = len(panels)
    n_cols = min(n_panels, 2)
    n_rows = math.ceil(n_panels / n_cols)
    stages_all = stage_order(base)
    height = max(3.0, 0.2 * len(stages_all) * max(1, len(sizes)) + 1.5)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(6.5 * n_cols, height * n_rows), squeeze=False, sharex=True)
    unit = base[0].unit
    rng = np.random.default_rng(0)  # the jitter is the same on every render
    for ax, ((pipeline, sender), rs) in zip(axes.flat, panels.items()):
        stages = stage_order(rs)
        h = 0.8 / len(rs)
        for j, r in enumerate(rs):
            ys = [i - 0.4 + h * (j + 0.5) for i in range(len(stages))]
            color = size_colors.get(series_label(fields(r)))
            if distribution:
                _stage_boxes(ax, r, stages, ys, h, color, rng)
            else:
                _stage_bars(ax, r, stages, ys, h, color)
        ax.set_yticks(range(len(stages)), stages)
        ax.invert_yaxis()
        title = f"sender {sender}" + (f", pipeline {pipeline}" if len(pipelines) > 1 else "")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        if distribution:
            ax.set_xlabel(f"stage latency ({unit}): box quartiles, red median, whiskers min–max, points the samples")
            labels = dict.fromkeys(series_label(fields(r)) for r in rs)
            handles = [Patch(facecolor=to_rgba(size_colors[s], 0.35), edgecolor="0.3", label=s) for s in labels]
            ax.legend(handles=handles, title="series", fontsize=8, title_fontsize=8, loc="best")
        else:
            ax.set_xlabel(f"stage latency ({unit}): bar p50, whisker p95")
            ax.legend(title="series", fontsize=8, title_fontsize=8, loc="best")
    for ax in list(axes.flat)[n_panels:]:
        ax.set_visible(False)
    if distribution:  # bars start at zero by themselves; boxes would not (after every panel: x is shared)
        axes.flat[0].set_xlim(left=0)
    what = "distribution of the samples" if distribution else "p50 and p95"
    fig.suptitle(f"e2e latency per stage ({what}), {c_min} concurrent stud{'y' if c_min == 1 else 'ies'}")
    fig.tight_layout()
    return save(fig, out_dir, "e2e_stages")


def plot_stacked(e2e: list[Result], out_dir: Path) -> str:
    staged = sorted([r for r in e2e if r.stages], key=sort_key)
    if not staged:
        raise Skip("no e2e result carries per-stage timings")
    stages = stage_order(staged)
    stage_colors = colors(len(stages), "tab10" if len(stages) <= 10 else "tab20")
    with_pipeline = len({fields(r).get("pipeline") for r in staged}) > 1
    labels = [result_label(r, with_pipeline) for r in staged]
    fig, ax = plt.subplots(figsize=(9, max(2.8, 0.38 * len(staged) + 1.6)))
    left = [0.0] * len(staged)
    for s, color in zip(stages, stage_colors):
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
    return save(fig, out_dir, "e2e_stages_stacked")


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


def plot_against(e2e: list[Result], out_dir: Path, x_key: str) -> str:
    """Latency against slices per series (at the lowest concurrency) or against concurrent
    studies (at the series size(s) run concurrently): p50 line, p50–p95 and p95–max bands, one
    line per sender, one panel per measure."""
    if x_key == "slices":
        c_min = min((concurrency(r) for r in e2e), default=1)
        chosen = [r for r in e2e if concurrency(r) == c_min]
        line_key = lambda f: (f.get("pipeline"), f.get("cols"), f.get("rows"), f.get("sender"))  # noqa: E731
        key = "e2e_slices"
        xs_all = {finite_number(fields(r).get("slices")) for r in chosen} - {None}
        if len(xs_all) < 2:
            raise Skip("fewer than two series sizes at one concurrency in this run")
        title = f"e2e latency vs slices per series, {c_min} concurrent stud{'y' if c_min == 1 else 'ies'}"
        xlabel = "slices per series"
    else:
        concurrent = [r for r in e2e if concurrency(r) > 1]
        sizes = {(fields(r).get("pipeline"), series_label(fields(r))) for r in concurrent}
        chosen = [r for r in e2e if (fields(r).get("pipeline"), series_label(fields(r))) in sizes]
        line_key = lambda f: (f.get("pipeline"), series_label(f), f.get("sender"))  # noqa: E731
        key = "e2e_concurrency"
        levels = {concurrency(r) for r in chosen}
        if not concurrent or len(levels) < 2:
            raise Skip("no e2e results at more than one level of concurrent studies")
        size_names = sorted({s for _, s in sizes})
        title = f"e2e latency vs concurrent studies ({', '.join(size_names)})"
        xlabel = "concurrent studies"
    in_measures = measures(chosen)
    lines_all: dict[tuple, None] = {}
    for r in sorted(chosen, key=sort_key):
        lines_all.setdefault(line_key(fields(r)), None)
    varying = [i for i in range(len(next(iter(lines_all)))) if len({k[i] for k in lines_all}) > 1]
    line_colors = dict(zip(lines_all, colors(len(lines_all))))
    fig, axes = plt.subplots(1, len(in_measures), figsize=(6.0 * len(in_measures), 4.4), squeeze=False)
    unit = chosen[0].unit
    for ax, m in zip(axes[0], in_measures):
        in_m = [r for r in chosen if str(fields(r).get("measure")) == m]
        ticks: set = set()
        for lk in lines_all:
            pts = sorted(((finite_number(fields(r).get(x_key)), r) for r in in_m if line_key(fields(r)) == lk
                          and finite_number(fields(r).get(x_key)) is not None), key=lambda p: p[0])
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ticks.update(xs)
            parts = [as_text(lk[i]) for i in varying] or [as_text(lk[-1])]
            if x_key == "slices" and lk[1] is not None and len({k[1:3] for k in lines_all}) > 1:
                parts.append(f"{lk[1]}×{lk[2]}")
            _line_with_band(ax, xs, [p[1] for p in pts], line_colors[lk], " · ".join(dict.fromkeys(parts)))
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
    return save(fig, out_dir, key)


def plot_samples(e2e: list[Result], out_dir: Path) -> str:
    if not e2e:
        raise Skip("no e2e results")
    in_measures = measures(e2e)
    with_pipeline = len({fields(r).get("pipeline") for r in e2e}) > 1
    per = {m: sorted([r for r in e2e if str(fields(r).get("measure")) == m], key=sort_key) for m in in_measures}
    tallest = max(len(v) for v in per.values())
    fig, axes = plt.subplots(1, len(in_measures), figsize=(6.0 * len(in_measures), max(2.8, 0.36 * tallest + 1.6)),
                             squeeze=False)
    rng = np.random.default_rng(0)  # the jitter is the same on every render
    for ax, m in zip(axes[0], in_measures):
        rs = per[m]
        data = [r.samples for r in rs]
        ax.boxplot(data, **HORIZONTAL, widths=0.55, showfliers=False, whis=(0, 100),
                   medianprops={"color": "tab:red"}, boxprops={"color": "0.35"})
        for i, r in enumerate(rs, start=1):
            ys = i + rng.uniform(-0.18, 0.18, len(r.samples))
            ax.plot(r.samples, ys, "o", ms=3, alpha=0.6, color="tab:blue")
        ax.set_yticks(range(1, len(rs) + 1), [f"{result_label(r, with_pipeline)} (n={r.stats.n})" for r in rs])
        ax.invert_yaxis()
        ax.set_xlabel(f"latency per study ({rs[0].unit})")
        ax.set_title(measure_label(m) if m != "None" else "latency", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("e2e raw samples (box: quartiles, whiskers: min–max, red: median)")
    fig.tight_layout()
    return save(fig, out_dir, "e2e_samples")
