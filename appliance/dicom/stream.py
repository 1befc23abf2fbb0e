"""Streaming by slab: the instances of a series become slabs of consecutive slices while the rest
of the series is still arriving.

The SCP hands every stored instance over with the header it already parsed (no file is read a
second time). Per series, the streamer keeps the frames sorted along the slice normal and watches
what only consecutive slices can tell: same orientation, size, pixel format, pixel spacing and
rescale type as the first, one position per slice, steps of one spacing. A slice is *ready* when
its ``c`` neighbours on both sides are present at one step each (``c`` = the pipeline's context
slices, at least 1, so the first and last slices of the series always wait for completion: only
then is it known that nothing lies beyond them). Ready slices leave as a slab, with their context
slices, once ``slab_slices`` of them are waiting.

When the series is complete, the whole-series checks of the assembler (`assemble.plan_series`) run
on the headers in memory. If the series is the one volume the streamer saw, what is left (the ends
and any slice that waited) goes as the last slab, its context clamped at the ends exactly as the
batch path clamps it: every derived instance depends only on its own slice and context
(`derive.derive_datasets`), so the streamed series is identical to the batch one. Anything else - a
gap that stayed, non-uniform spacing, a second echo or phase, mixed orientation, a duplicate
position or a new version of an instance, an instance without InstanceNumber, a multi-frame
instance, a restart - ends streaming for the series (``stream.fallback`` with the reason) and the
series goes the batch way: assembled whole, processed whole, and only derived instances whose
bytes differ from what was already streamed are sent again. What the batch path rejects after
slabs were streamed stays at the destination (DICOM has no way to take an instance back); the
``series.rejected`` event then says how many were streamed.

Owned by the assembler thread: no locking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import RawDataStorage

from appliance.config import AssemblyConfig
from appliance.dicom.assemble import AssemblyError, build_volume
from appliance.dicom.frames import Frame, frames_of
from appliance.logging import get_logger
from appliance.volume import Volume
from kernels.ctpd import is_ctpd

log = get_logger(__name__)

_MAX_SUBDIVISION = 8  # steps seen may be up to this many spacings before the neighbours arrive


@dataclass
class Slab:
    """Slices ``order[lo:hi]`` of a series (in slice order) to process, with their context:
    ``volume`` holds ``order[a:b]`` (a <= lo, hi <= b) and ``crop`` = (lo - a, hi - a)."""

    volume: Volume
    crop: tuple[int, int]
    sop_instance_uids: tuple[str, ...]  # of the slices kept (order[lo:hi])
    index: int = 0  # 0-based, in the order the series' slabs were made


@dataclass
class SeriesStream:
    series_uid: str
    generation: int
    calling_ae: str
    context: int  # neighbours each side a slice needs before it is ready (>= 1)
    context_model: int = 0  # neighbours each side the pipeline reads (its context slices)
    frames: dict[str, Frame] = field(default_factory=dict)  # by SOP Instance UID
    headers: dict[Path, pydicom.Dataset] = field(default_factory=dict)
    emitted: set[str] = field(default_factory=set)
    fallback: str | None = None  # why streaming ended for this series
    fallback_detail: str = ""
    job_id: int | None = None
    job: object = None  # the Job snapshot slabs are submitted with
    rule: object = None  # the routing rule chosen at the first instance
    pipeline: object = None  # its pipeline then: every slab of the series goes through the same model
    slabs: int = 0

    @property
    def streaming(self) -> bool:
        return self.fallback is None


def _stop(stream: SeriesStream, reason: str, detail: str) -> None:
    if stream.fallback is None:
        stream.fallback, stream.fallback_detail = reason, detail
        log.info("stream.fallback", series_uid=stream.series_uid, reason=reason, detail=detail,
                 streamed_slices=len(stream.emitted))


def _normal(orientation: np.ndarray) -> np.ndarray:
    row, col = orientation[:3], orientation[3:]
    n = np.cross(row / np.linalg.norm(row), col / np.linalg.norm(col))
    return n / np.linalg.norm(n)


def add_instance(stream: SeriesStream, ds: pydicom.Dataset, path: Path, kind: str, cfg: AssemblyConfig) -> None:
    """Take one stored instance (its parsed header and spool path) into the stream."""
    if kind == "duplicate":
        return
    stream.headers[path] = ds
    if not stream.streaming:
        return
    if kind == "new_version":
        return _stop(stream, "new_version", "an instance was sent again with other bytes")
    if is_ctpd(ds) or str(ds.get("SOPClassUID", "")) == RawDataStorage:
        return _stop(stream, "not_images", "projection or raw data")
    try:
        frames = frames_of(ds, path)
    except Exception as exc:
        return _stop(stream, "unreadable", f"{type(exc).__name__}: {exc}")
    if len(frames) != 1:
        return _stop(stream, "multi_frame", "multi-frame instances are assembled whole")
    f = frames[0]
    if f.echo is not None or f.temporal is not None or f.stack is not None:
        return _stop(stream, "echo_or_phase", "echo, temporal position or stack: the split needs the whole series")
    if f.instance_number is None:
        return _stop(stream, "no_instance_number", "InstanceNumber missing")
    if f.position is None or f.orientation is None or f.pixel_spacing is None:
        return _stop(stream, "missing_geometry", "position, orientation or pixel spacing missing")
    if stream.frames:
        first = next(iter(stream.frames.values()))
        if np.max(np.abs(f.orientation - first.orientation)) > cfg.orientation_tolerance:
            return _stop(stream, "inconsistent_orientation", "orientation differs from the first instance")
        if ((f.rows, f.columns, f.pixel_format, f.rescale_type) !=
                (first.rows, first.columns, first.pixel_format, first.rescale_type)):
            return _stop(stream, "inconsistent_format", "size, pixel format or rescale type differs")
        if np.max(np.abs(np.subtract(f.pixel_spacing, first.pixel_spacing))) > cfg.spacing_tolerance_mm:
            return _stop(stream, "inconsistent_pixel_spacing", "pixel spacing differs from the first instance")
    stream.frames[f.sop_instance_uid] = f


def _sorted(stream: SeriesStream) -> list[Frame]:
    frames = list(stream.frames.values())
    normal = _normal(frames[0].orientation)
    return sorted(frames, key=lambda f: (float(f.position @ normal), f.instance_number or 0))


def _steps(order: list[Frame]) -> np.ndarray:
    """Distance (mm) between each pair of sorted neighbours."""
    pos = np.stack([f.position for f in order])
    return np.linalg.norm(np.diff(pos, axis=0), axis=1)


def ready_slabs(stream: SeriesStream, cfg: AssemblyConfig, slab_slices: int) -> list[Slab]:
    """The slabs that can go now (none until ``slab_slices`` slices are ready)."""
    if not stream.streaming or len(stream.frames) < 2 * stream.context + 1:
        return []
    order = _sorted(stream)  # at least three frames (2 * context + 1)
    steps = _steps(order)
    smallest = float(np.min(steps))
    tol = max(cfg.spacing_tolerance_mm, cfg.spacing_tolerance_fraction * smallest)
    if smallest <= tol:
        _stop(stream, "duplicate_position", "two instances share a slice position")
        return []
    # The spacing: the largest smallest/m (m = 1, 2, ...) of which every step is a multiple. With
    # shuffled arrival the smallest step seen may still span a missing slice or two.
    for m in range(1, _MAX_SUBDIVISION + 1):
        spacing = smallest / m
        tol = max(cfg.spacing_tolerance_mm, cfg.spacing_tolerance_fraction * spacing)
        multiples = steps / spacing
        if np.all(np.abs(multiples - np.round(multiples)) * spacing <= tol):
            break
    else:
        _stop(stream, "non_uniform_spacing", f"slice steps from {steps.min():.3f} to {steps.max():.3f} mm")
        return []
    unit = np.abs(steps - spacing) <= tol  # unit[i]: order[i] and order[i+1] are neighbours
    c = stream.context
    n = len(order)
    ready = np.zeros(n, dtype=bool)
    for i in range(c, n - c):
        ready[i] = bool(unit[i - c:i + c].all())
    ready &= np.array([f.sop_instance_uid not in stream.emitted for f in order])
    if int(ready.sum()) < slab_slices:
        return []
    return _slabs(stream, order, np.flatnonzero(ready), cfg, clamp=False)


def final_slabs(stream: SeriesStream, order: list[Frame], cfg: AssemblyConfig) -> list[Slab]:
    """Everything of ``order`` (the whole series, as the batch path orders it) not yet emitted,
    context clamped at the ends of the series."""
    left = np.flatnonzero([f.sop_instance_uid not in stream.emitted for f in order])
    return _slabs(stream, order, left, cfg, clamp=True)


def _slabs(stream: SeriesStream, order: list[Frame], indices: np.ndarray, cfg: AssemblyConfig,
           clamp: bool) -> list[Slab]:
    """One slab per run of consecutive indices, with ``context`` slices around it (fewer at the
    ends of ``order`` when ``clamp``, where the stage repeats the end slice as the batch does)."""
    out: list[Slab] = []
    if len(indices) == 0:
        return out
    runs = np.split(indices, np.flatnonzero(np.diff(indices) != 1) + 1)
    k = stream.context_model
    for run in runs:
        lo, hi = int(run[0]), int(run[-1]) + 1
        a, b = max(0, lo - k), min(len(order), hi + k)
        if not clamp and (a != lo - k or b != hi + k):
            continue  # cannot happen for ready slices (they have >= context neighbours); be safe
        frames = order[a:b]
        try:
            volume = build_volume(frames, "", cfg, stream.headers)
        except AssemblyError as exc:
            _stop(stream, exc.reason, exc.detail)
            return []
        kept = tuple(f.sop_instance_uid for f in order[lo:hi])
        stream.emitted.update(kept)
        out.append(Slab(volume, (lo - a, hi - a), kept, stream.slabs))
        stream.slabs += 1
    return out


def crop(volume: Volume, lo: int, hi: int) -> Volume:
    """Slices lo:hi of a processed slab volume (its context removed), as a Volume of their own."""
    from dataclasses import replace

    src = volume.source
    return replace(
        volume,
        voxels=volume.voxels[lo:hi],
        source=replace(src, sop_instance_uids=src.sop_instance_uids[lo:hi],
                       frame_numbers=src.frame_numbers[lo:hi] if src.frame_numbers else ()),
        slice_headers=volume.slice_headers[lo:hi] if volume.slice_headers is not None else None,
        slice_positions=volume.slice_positions[lo:hi] if volume.slice_positions is not None else None,
        provenance=list(volume.provenance),
    )
