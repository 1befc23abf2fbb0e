"""The throughput plots: ingest (the appliance's SCP against dcmtk storescp), denoise against
volume size per backend, and projector GUPS per operation and backend."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt

from bench.labels import (ID_PATTERNS, OPERATIONS, RECEIVERS, as_text, cube_label, fields, fmt, rank, series_label,
                          sort_key, sortable, voxels)
from bench.plots.figures import Skip, colors, log_if_wide, save
from bench.schema import Result, Stats


def grouped_bars(ax, groups: list[str], series: list[str], values: dict[tuple[str, str], Stats], bar_colors: list,
                 notes: dict[tuple[str, str], str] | None = None) -> None:
    """Bars of p50 with min–max whiskers, each labelled above with its p50 (and its note)."""
    notes = notes or {}
    w = 0.8 / max(1, len(series))
    for j, (s, color) in enumerate(zip(series, bar_colors)):
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

    for r in sorted(ingest, key=sort_key):
        f = fields(r)
        g = series_label(f) + (f"\n{f.get('sender')}" if multi_sender else "")
        recv = as_text(f.get("receiver")) if f.get("receiver") else r.id
        add(g, recv, r.stats)
        if r.peer is not None:
            notes[(g, recv)] = f"{r.peer.ratio:.2f}× vs\n{r.peer.name}"
            if r.peer.id not in ids:
                m = ID_PATTERNS["ingest"].match(r.peer.id)
                add(g, m["receiver"] if m else r.peer.name, r.peer.stats)
    receivers.sort(key=lambda s: (rank(s, RECEIVERS), s))
    return groups, receivers, values, notes


def plot_ingest(ingest: list[Result], out_dir: Path) -> str:
    if not ingest:
        raise Skip("no ingest results")
    groups, receivers, values, notes = ingest_bars(ingest)
    multi_sender = len({fields(r).get("sender") for r in ingest}) > 1
    fig, ax = plt.subplots(figsize=(max(5.5, 1.6 * len(groups) * max(1, len(receivers)) / 2 + 2.5), 4.4))
    grouped_bars(ax, groups, receivers, values, colors(len(receivers)), notes)
    top = max((st.max for st in values.values() if math.isfinite(st.max)), default=0.0)
    ax.set_ylim(0, top * 1.25 if top > 0 else 1.0)
    ax.set_xlabel("series (cols×rows×slices)" + (" and sender" if multi_sender else ""))
    ax.set_ylabel(f"instances received per second ({ingest[0].unit})")
    ax.set_title("Ingest throughput: appliance vs dcmtk storescp\n(bar p50, whisker min–max; "
                 "label: p50, ratio of the p50s)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="receiver", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save(fig, out_dir, "ingest")


def _denoise_points(r: Result) -> dict[str, float] | None:
    f = fields(r)
    vox = voxels(f)
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


def plot_denoise(denoise: list[Result], out_dir: Path) -> str:
    pts: dict[str, list[tuple[dict[str, float], Result]]] = {}
    for r in sorted(denoise, key=sort_key):
        p = _denoise_points(r)
        if p is not None:
            pts.setdefault(str(fields(r).get("backend", "?")), []).append((p, r))
    sizes = {round(p["mvox"], 6) for v in pts.values() for p, _ in v}
    if len(sizes) < 2:
        raise Skip("fewer than two volume sizes in this run")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    backend_colors = dict(zip(pts, colors(len(pts))))
    for backend, v in pts.items():
        v.sort(key=lambda p: p[0]["mvox"])
        xs = [p["mvox"] for p, _ in v]
        ms = [p["ms"] for p, _ in v]
        ms_err = [max(0.0, p["ms_p95"] - p["ms"]) if math.isfinite(p["ms_p95"]) else 0.0 for p, _ in v]
        ax1.errorbar(xs, ms, yerr=[[0.0] * len(xs), ms_err], fmt="o-", color=backend_colors[backend], label=backend,
                     capsize=3)
        mv = [p["mvps"] for p, _ in v]
        mv_err = [max(0.0, p["mvps"] - p["mvps_p95"]) if math.isfinite(p["mvps_p95"]) else 0.0 for p, _ in v]
        ax2.errorbar(xs, mv, yerr=[mv_err, [0.0] * len(xs)], fmt="o-", color=backend_colors[backend], label=backend,
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
        if log_if_wide(ax, [p[key] for v in pts.values() for p, _ in v]):
            ax.set_ylabel(ax.get_ylabel() + ", log")
        else:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(title="backend", fontsize=8, title_fontsize=8)
    fig.suptitle("Denoise throughput vs volume size, per backend")
    fig.tight_layout()
    return save(fig, out_dir, "denoise")


def plot_kernels(kernels: list[Result], out_dir: Path) -> str:
    if not kernels:
        raise Skip("no kernels results")
    multi_n = len({fields(r).get("n") for r in kernels}) > 1
    values: dict[tuple[str, str], Stats] = {}
    groups: list[str] = []
    backends: list[str] = []
    ordered = sorted(kernels, key=lambda r: (rank(fields(r).get("operation"), OPERATIONS),
                                             sortable(fields(r).get("operation")), sort_key(r)))
    for r in ordered:
        f = fields(r)
        g = str(f.get("operation", r.id)) + (f"\n{cube_label(f)}" if multi_n else "")
        b = str(f.get("backend", "?"))
        groups += [g] if g not in groups else []
        backends += [b] if b not in backends else []
        values[(g, b)] = r.stats
    fig, ax = plt.subplots(figsize=(max(5.5, 1.3 * len(groups) * max(1, len(backends)) / 2 + 3), 4.4))
    grouped_bars(ax, groups, backends, values, colors(len(backends)))
    log = log_if_wide(ax, [st.p50 for st in values.values()])
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
    return save(fig, out_dir, "kernels")
