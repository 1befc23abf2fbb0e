"""What every plot of the report shares: the fixed file names, saving a figure, colours, a log
scale when values span orders of magnitude, and `Skip` for a plot the document has no data for."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

DPI = 110

#: Every plot the report can have, by a fixed file name (stale copies are removed on re-render).
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

# matplotlib 3.10 added ``orientation`` and deprecated ``vert`` (removed in 3.13)
HORIZONTAL = ({"orientation": "horizontal"}
              if tuple(int(x) for x in re.findall(r"\d+", matplotlib.__version__)[:2]) >= (3, 10) else {"vert": False})


class Skip(Exception):
    """A plot not drawn for want of data; the message says why (it goes into the report)."""


def save(fig, out_dir: Path, key: str) -> str:
    """Write ``fig`` as ``out_dir / PLOT_FILES[key]`` and close it; return the file name."""
    name = PLOT_FILES[key]
    try:
        fig.savefig(out_dir / name, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return name


def colors(n: int, cmap: str = "tab10") -> list:
    cm = plt.get_cmap(cmap)
    if cmap in ("tab10", "tab20"):
        return [cm(i % cm.N) for i in range(n)]
    return [cm(0.15 + 0.7 * i / max(1, n - 1)) for i in range(n)]


def log_if_wide(ax, values: Iterable[float], axis: str = "y", span: float = 30.0) -> bool:
    """A log scale when the values (all positive) span more than ``span``×: a GPU backend next to the
    host twin would otherwise flatten the host's bars to nothing."""
    vs = [v for v in values if math.isfinite(v)]
    if not vs or min(vs) <= 0 or max(vs) / min(vs) <= span:
        return False
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    return True
