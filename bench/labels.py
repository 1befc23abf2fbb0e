"""How a result reads to a person: what it is about (the parts of its id and its params), its
numbers as a table shows them, the names of series sizes and measures, and the order results are
listed in. Shared by the Markdown report (bench/report.py) and the plots (bench/plots/)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from bench.schema import Result

FIRST_BYTE = "first_byte_to_last_response"
LAST_IMAGE = "last_image_to_last_response"
WIRE = "wire_floor"
MEASURES = {
    FIRST_BYTE: "first byte → last response",
    LAST_IMAGE: "added latency: last image → last response",
    WIRE: "wire's floor: dcmtk storescu → storescp, one way",
}

_NUM = r"(?P<cols>\d+)x(?P<rows>\d+)x(?P<slices>\d+)"
#: result ids by the conventions in bench/schema.py, per scenario
ID_PATTERNS = {
    "e2e": re.compile(rf"^e2e/(?P<pipeline>[^/]+)/{_NUM}/(?P<sender>[^/]+)/c(?P<concurrency>\d+)/(?P<measure>[^/]+)$"),
    "ingest": re.compile(rf"^ingest/(?P<receiver>[^/]+)/{_NUM}/(?P<sender>[^/]+)$"),
    "denoise": re.compile(rf"^denoise/(?P<backend>[^/]+)/{_NUM}$"),
    "recon": re.compile(r"^recon/(?P<backend>[^/]+)/(?P<algorithm>[^/]+)/(?P<n>\d+)\^3$"),
    "kernels": re.compile(r"^kernels/(?P<backend>[^/]+)/(?P<operation>[^/]+)/(?P<n>\d+)\^3$"),
}
OPERATIONS = ("forward_joseph", "adjoint_joseph", "backproject_fdk")
RECEIVERS = ("appliance", "dcmtk-storescp")
SENDERS = ("appliance-scu", "dcmtk-storescu", "appliance-exporter")


# --------------------------------------------------------------------------------------------
# numbers


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


def finite_number(v: Any) -> float | None:
    """``v`` when it is a finite int or float (not a bool), else None."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return v
    return None


def as_text(v: Any) -> str:
    """Any param value as a table cell or a plot label shows it (None and "" as an em dash)."""
    if v is None or v == "":
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return fmt(v)
    if isinstance(v, (list, tuple)):
        return "×".join(as_text(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k} {as_text(x)}" for k, x in v.items())
    return str(v)


# --------------------------------------------------------------------------------------------
# what a result is about


def fields(r: Result) -> dict[str, Any]:
    """What a result is about: the parts of its id (by the conventions in bench/schema.py), with
    its params on top (params win; either alone is enough)."""
    out: dict[str, Any] = {}
    pattern = ID_PATTERNS.get(r.scenario)
    m = pattern.match(r.id) if pattern else None
    if m:
        out.update({k: (int(v) if v.isdigit() else v) for k, v in m.groupdict().items()})
    out.update({k: v for k, v in r.params.items() if v is not None})
    for k in ("cols", "rows", "slices", "concurrency", "n", "views", "iterations", "slab", "bytes"):
        if k in out and _int(out[k]) is not None:
            out[k] = _int(out[k])
    return out


def concurrency(r: Result) -> int:
    """Concurrent studies of an e2e result; 1 where the result does not say."""
    c = _int(fields(r).get("concurrency"))
    return c if c is not None and c >= 1 else 1


def voxels(f: dict[str, Any]) -> int | None:
    """cols × rows × slices of a result's `fields`, None unless all three are known."""
    c, r, s = f.get("cols"), f.get("rows"), f.get("slices")
    if isinstance(c, int) and isinstance(r, int) and isinstance(s, int):
        return c * r * s
    return None


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


def result_label(r: Result, with_pipeline: bool = False) -> str:
    """A short name of an e2e result for a plot axis: slices · sender · concurrency."""
    f = fields(r)
    parts = []
    if with_pipeline and f.get("pipeline"):
        parts.append(str(f["pipeline"]))
    parts += [f"{f['slices']} sl" if f.get("slices") is not None else series_label(f),
              str(f.get("sender", "?")), f"c{f.get('concurrency', '?')}"]
    return " · ".join(parts)


# --------------------------------------------------------------------------------------------
# order


def measure_rank(m: Any) -> int:
    return {FIRST_BYTE: 0, LAST_IMAGE: 1, WIRE: 2}.get(str(m), 3)


def rank(value: Any, order: tuple[str, ...]) -> int:
    """``value``'s place in ``order``; anything else after it."""
    return order.index(value) if value in order else len(order)


def sortable(v: Any) -> tuple:
    """A sort key for values of mixed types: numbers (by value), then text, then None."""
    if v is None:
        return (2, 0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0, str(v))


def sort_key(r: Result) -> tuple:
    """The order of a scenario's results in tables and plots (e2e: pipeline, measure,
    concurrency, series size, sender; and so on)."""
    f = fields(r)
    keys: dict[str, list] = {
        "e2e": [f.get("pipeline"), measure_rank(f.get("measure")), f.get("concurrency"), f.get("slices"),
                voxels(f), rank(f.get("sender"), SENDERS), f.get("sender")],
        "ingest": [voxels(f), f.get("slices"), rank(f.get("sender"), SENDERS), f.get("sender"),
                   rank(f.get("receiver"), RECEIVERS), f.get("receiver")],
        "denoise": [f.get("backend"), voxels(f)],
        "recon": [f.get("backend"), f.get("algorithm"), f.get("n")],
        "kernels": [f.get("backend"), rank(f.get("operation"), OPERATIONS), f.get("operation"), f.get("n")],
    }
    return tuple(sortable(v) for v in keys.get(r.scenario, [])) + (sortable(r.id),)


def measures(results: list[Result]) -> list[str]:
    """The e2e measures among ``results`` (as text; "None" for results without one), first byte first."""
    return sorted({str(fields(r).get("measure")) for r in results}, key=lambda m: (measure_rank(m), m))


def stage_order(results: Iterable[Result]) -> list[str]:
    """The stages of ``results`` in pipeline order (the order the results list them)."""
    order: list[str] = []
    for r in results:
        for s in r.stages:
            if s not in order:
                order.append(s)
    return order
