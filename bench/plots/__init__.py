"""The report's PNG plots, per scenario: `draw` writes those a scenario has and says why any other
was not drawn. ``figures``: what every plot shares (file names, saving, colours); ``e2e``: the
end-to-end plots; ``throughput``: ingest, denoise and projector throughput."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before any submodule imports pyplot: the report is drawn on headless machines
import matplotlib.pyplot as plt  # noqa: E402

from bench.plots import e2e, throughput  # noqa: E402
from bench.plots.figures import PLOT_FILES, Skip  # noqa: E402
from bench.schema import Result  # noqa: E402

__all__ = ["PLOT_FILES", "Plot", "draw"]


@dataclass
class Plot:
    key: str
    title: str
    file: str | None = None  # set when written
    why_not: str | None = None  # set when skipped


#: per scenario, its plots in report order: (key in PLOT_FILES, title, the function drawing it)
_PLOTS: dict[str, list[tuple[str, str, Callable[[list[Result], Path], str]]]] = {
    "e2e": [
        ("e2e_stages", "Latency per stage", e2e.plot_stages),
        ("e2e_stages_stacked", "Where the time goes", e2e.plot_stacked),
        ("e2e_slices", "Latency vs slices per series", lambda rs, d: e2e.plot_against(rs, d, "slices")),
        ("e2e_concurrency", "Latency vs concurrent studies", lambda rs, d: e2e.plot_against(rs, d, "concurrency")),
        ("e2e_samples", "Raw samples", e2e.plot_samples),
    ],
    "ingest": [("ingest", "Ingest throughput", throughput.plot_ingest)],
    "denoise": [("denoise", "Denoise throughput vs volume size", throughput.plot_denoise)],
    "kernels": [("kernels", "Projector throughput", throughput.plot_kernels)],
}


def _draw_one(key: str, title: str, fn: Callable[[list[Result], Path], str], results: list[Result],
              out_dir: Path) -> Plot:
    plot = Plot(key, title)
    try:
        plot.file = fn(results, out_dir)
    except Skip as e:
        plot.why_not = str(e)
    except Exception as e:  # noqa: BLE001 - a plot must never cost the QA engineer the report
        plt.close("all")
        print(f"bench.plots: plot {key} failed: {type(e).__name__}: {e}", file=sys.stderr)
        plot.why_not = f"drawing it failed ({type(e).__name__}: {e})"
    return plot


def draw(scenario: str, results: list[Result], out_dir: Path) -> dict[str, Plot]:
    """Every plot of ``scenario`` from its ``results`` (sorted as the report lists them), written
    into ``out_dir``; by key, in report order. A plot without data has ``why_not`` instead of a file."""
    return {key: _draw_one(key, title, fn, results, out_dir) for key, title, fn in _PLOTS.get(scenario, [])}
