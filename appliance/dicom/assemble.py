"""Series assembly: the instances of a complete series become one or more `Volume`s.

Frames are grouped by what must never share a volume (echo, temporal position, stack); frames
that share a position are split further (by acquisition number, else by their order at that
position) so nothing is silently dropped. Each group is sorted along the normal of its image plane
and checked: positions present, orientation/size/pixel format/pixel spacing consistent, positions
on one line, spacing uniform across **all** slices, gantry tilt within the configured limit.
Stored values become HU (or the modality's native unit) through each frame's own rescale.

A group that fails a check becomes a `Rejection` with a coded reason; the series is rejected when
no group could be assembled.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import RawDataStorage

from appliance.config import AssemblyConfig
from appliance.dicom.frames import Frame, frames_of
from appliance.logging import get_logger
from appliance.volume import Geometry, SeriesRef, Volume
from kernels.ctpd import CtpdError, is_ctpd, read_ctpd

log = get_logger(__name__)


class AssemblyError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Rejection:
    reason: str  # coded, e.g. "non_uniform_spacing", "missing_position"
    detail: str  # for a field engineer
    label: str  # which part of the series ("" for all of it)
    frames: int


@dataclass
class Assembly:
    volumes: list[Volume] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    projections: list = field(default_factory=list)  # kernels.ctpd.Projections (CT projection data)

    @property
    def rejected(self) -> bool:
        return not self.volumes and not self.projections


def _join(*labels: str) -> str:
    return ",".join(lbl for lbl in labels if lbl)


def _read_headers(
    paths: list[Path], known: dict[Path, pydicom.Dataset] | None = None,
) -> tuple[list[Frame], dict[Path, pydicom.Dataset], list[Rejection], list[Path]]:
    """Frames of the image instances, their headers, rejections, and the projection-data files.
    ``known``: headers already parsed (by the SCP, as the instances arrived); only the others are read."""
    frames: list[Frame] = []
    headers: dict[Path, pydicom.Dataset] = {}
    rejections: list[Rejection] = []
    projection_paths: list[Path] = []
    for path in paths:
        ds = known.get(path) if known else None
        if ds is None:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as exc:
                rejections.append(Rejection("unreadable", f"{path.name}: {type(exc).__name__}: {exc}", "", 1))
                continue
        if is_ctpd(ds):
            projection_paths.append(path)
            continue
        if str(ds.get("SOPClassUID", "")) == RawDataStorage:
            rejections.append(Rejection("unsupported_raw_data", "Raw Data without DICOM-CT-PD geometry", "", 1))
            continue
        headers[path] = ds
        frames.extend(frames_of(ds, path))
    return frames, headers, rejections, projection_paths


def _read_projections(paths: list[Path], result: Assembly) -> None:
    try:
        result.projections.append(read_ctpd(paths))
    except CtpdError as exc:
        result.rejections.append(Rejection(exc.reason, exc.detail, "projections", len(paths)))


@dataclass
class Planned:
    """A volume the assembler will build: its frames in slice order, checked, not yet decoded."""

    label: str
    order: list[Frame]


@dataclass
class SeriesPlan:
    planned: list[Planned] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    projection_paths: list[Path] = field(default_factory=list)
    headers: dict[Path, pydicom.Dataset] = field(default_factory=dict)


def plan_series(paths: list[Path], cfg: AssemblyConfig,
                headers: dict[Path, pydicom.Dataset] | None = None) -> SeriesPlan:
    """Every check of the assembly on the headers alone (no pixel data is read): how the instances
    at ``paths`` (one series) split into volumes, each in slice order, and what is rejected."""
    frames, hdrs, rejections, projection_paths = _read_headers(paths, headers)
    plan = SeriesPlan(rejections=rejections, projection_paths=projection_paths, headers=hdrs)
    if not frames:
        return plan
    groups: dict[tuple, list[Frame]] = defaultdict(list)
    for f in frames:
        groups[(f.echo, f.temporal, f.stack)].append(f)
    keyed = len(groups) > 1
    for (echo, temporal, stack), members in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        label = ""
        if keyed:
            label = _join(
                f"echo={echo}" if echo is not None else "",
                f"temporal={temporal}" if temporal is not None else "",
                f"stack={stack}" if stack is not None else "",
            )
        _plan_group(members, label, cfg, plan)
    return plan


def assemble_series(paths: list[Path], cfg: AssemblyConfig,
                    headers: dict[Path, pydicom.Dataset] | None = None) -> Assembly:
    """Assemble the instances at ``paths`` (one series) into volumes and rejections.
    ``headers``: those already parsed, by path (the rest are read from the files)."""
    plan = plan_series(paths, cfg, headers)
    result = Assembly(rejections=list(plan.rejections))
    if plan.projection_paths:
        _read_projections(plan.projection_paths, result)
    if not plan.planned and not plan.projection_paths:
        if not result.rejections:
            result.rejections.append(Rejection("no_images", "the series holds no image frames", "", 0))
        return result
    for item in plan.planned:
        try:
            result.volumes.append(build_volume(item.order, item.label, cfg, plan.headers))
        except AssemblyError as exc:
            result.rejections.append(Rejection(exc.reason, exc.detail, item.label, len(item.order)))
    for r in result.rejections:
        log.warning("assembly.rejected", reason=r.reason, detail=r.detail, label=r.label, frames=r.frames)
    return result


def _plan_group(frames: list[Frame], label: str, cfg: AssemblyConfig, out: SeriesPlan) -> None:
    try:
        _check_consistent(frames, cfg)
        normal = _normal(frames[0].orientation)
        order = sorted(frames, key=lambda f: (float(f.position @ normal), f.instance_number or 0, f.frame_index))
        clusters = _position_clusters(order, cfg.spacing_tolerance_mm)
        if any(len(c) > 1 for c in clusters):
            for sub_label, sub in _split_duplicates(order, clusters):
                _plan_group(sub, _join(label, sub_label), cfg, out)
            return
        _slice_axis(order, normal, cfg)  # geometry checks: raise before anything is decoded
        out.planned.append(Planned(label, order))
    except AssemblyError as exc:
        out.rejections.append(Rejection(exc.reason, exc.detail, label, len(frames)))


def _check_consistent(frames: list[Frame], cfg: AssemblyConfig) -> None:
    n = len(frames)
    for attr, reason, what in (
        ("position", "missing_position", "ImagePositionPatient"),
        ("orientation", "missing_orientation", "ImageOrientationPatient"),
        ("pixel_spacing", "missing_pixel_spacing", "PixelSpacing"),
    ):
        missing = sum(getattr(f, attr) is None for f in frames)
        if missing:
            raise AssemblyError(reason, f"{missing} of {n} frames have no (valid) {what}")
    if any(f.samples_per_pixel != 1 for f in frames):
        raise AssemblyError("unsupported_pixel_format", "only single-sample (greyscale) images form volumes")
    sizes = {(f.rows, f.columns) for f in frames}
    if len(sizes) > 1 or 0 in next(iter(sizes)):
        raise AssemblyError("inconsistent_size", f"image sizes (rows, columns): {sorted(sizes, key=repr)}")
    formats = {(f.pixel_format[0], f.pixel_format[2], f.pixel_format[4]) for f in frames}
    if len(formats) > 1:
        raise AssemblyError(
            "inconsistent_pixel_format",
            f"(bits allocated, pixel representation, photometric): {sorted(formats, key=repr)}"
        )
    o = np.stack([f.orientation for f in frames])
    if np.max(np.abs(o - o[0])) > cfg.orientation_tolerance:
        raise AssemblyError(
            "inconsistent_orientation", f"direction cosines differ by up to {np.max(np.abs(o - o[0])):.2g}"
        )
    row, col = o[0, :3], o[0, 3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise AssemblyError("invalid_orientation", "ImageOrientationPatient is not two orthogonal unit vectors")
    ps = np.array([f.pixel_spacing for f in frames])
    if np.any(ps <= 0):
        raise AssemblyError("missing_pixel_spacing", "PixelSpacing must be positive")
    if np.max(np.abs(ps - ps[0])) > cfg.spacing_tolerance_mm:
        raise AssemblyError("inconsistent_pixel_spacing", f"PixelSpacing varies up to {np.ptp(ps, axis=0)} mm")


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _normal(orientation: np.ndarray) -> np.ndarray:
    return _unit(np.cross(_unit(orientation[:3]), _unit(orientation[3:])))


def _position_clusters(order: list[Frame], tol_mm: float) -> list[list[Frame]]:
    """Consecutive frames (sorted along the normal) within ``tol_mm`` of each other share a position."""
    clusters: list[list[Frame]] = []
    for f in order:
        if clusters and np.linalg.norm(f.position - clusters[-1][0].position) <= tol_mm:
            clusters[-1].append(f)
        else:
            clusters.append([f])
    return clusters


def _split_duplicates(order: list[Frame], clusters: list[list[Frame]]) -> list[tuple[str, list[Frame]]]:
    """Frames sharing positions: split by acquisition number when that separates them, else by the
    order in which they were acquired at each position (1st, 2nd, ...)."""
    by_acq: dict[str | None, list[Frame]] = defaultdict(list)
    for f in order:
        by_acq[f.acquisition].append(f)
    if len(by_acq) > 1 and all(
        len({tuple(np.round(f.position, 3)) for f in fs}) == len(fs) for fs in by_acq.values()
    ):
        log.info("assembly.split", by="acquisition", volumes=len(by_acq))
        return [(f"acquisition={k}", fs) for k, fs in sorted(by_acq.items(), key=lambda kv: str(kv[0]))]
    ranked: dict[int, list[Frame]] = defaultdict(list)
    for cluster in clusters:
        cluster = sorted(
            cluster,
            key=lambda f: (
                f.trigger_time if f.trigger_time is not None else -np.inf,
                f.acquisition_time or "",
                f.instance_number or 0,
                f.sop_instance_uid,
                f.frame_index,
            ),
        )
        for rank, f in enumerate(cluster, start=1):
            ranked[rank].append(f)
    log.info("assembly.split", by="repeat_at_position", volumes=len(ranked))
    return [(f"repeat={k}", fs) for k, fs in sorted(ranked.items())]


def _slice_axis(order: list[Frame], normal: np.ndarray, cfg: AssemblyConfig) -> tuple[np.ndarray, float]:
    """Unit slice direction and spacing (mm) from the sorted positions; raises on bad geometry."""
    if len(order) == 1:
        f = order[0]
        return normal, float(f.slice_thickness or 1.0)
    pos = np.stack([f.position for f in order])
    total = pos[-1] - pos[0]
    axis = _unit(total)
    deltas = np.diff(pos, axis=0)
    steps = deltas @ axis
    off_line = np.linalg.norm(deltas - steps[:, None] * axis, axis=1)
    median = float(np.median(steps))
    tol = max(cfg.spacing_tolerance_mm, cfg.spacing_tolerance_fraction * median)
    if np.max(off_line) > tol:
        raise AssemblyError(
            "non_collinear_positions", f"slice positions leave the slice axis by up to {np.max(off_line):.3f} mm"
        )
    bad = np.abs(steps - median) > tol
    if bad.any():
        multiples = steps / median
        gaps = np.abs(multiples - np.round(multiples)) * median <= tol
        if gaps.all() and np.all(np.round(multiples) >= 1):
            missing = int(np.sum(np.round(multiples) - 1))
            where = [float(order[i].position @ normal) for i in np.flatnonzero(bad)]
            raise AssemblyError(
                "missing_slice",
                f"{missing} slice(s) missing at spacing {median:.3f} mm, after position(s) "
                + ", ".join(f"{w:.2f}" for w in where[:5])
                + " mm along the normal",
            )
        raise AssemblyError(
            "non_uniform_spacing",
            f"slice spacing varies from {steps.min():.3f} to {steps.max():.3f} mm "
            f"({int(bad.sum())} of {len(steps)} gaps off by more than {tol:.3f} mm)",
        )
    spacing = float(np.linalg.norm(total)) / (len(order) - 1)
    tilt = float(np.degrees(np.arccos(np.clip(axis @ normal, -1.0, 1.0))))
    if tilt > cfg.max_gantry_tilt_deg:
        raise AssemblyError(
            "gantry_tilt", f"slices are tilted {tilt:.2f} deg from the image normal (limit {cfg.max_gantry_tilt_deg})"
        )
    return axis, spacing


def build_volume(
    order: list[Frame], label: str, cfg: AssemblyConfig, headers: dict[Path, pydicom.Dataset],
    geometry_frames: list[Frame] | None = None,
) -> Volume:
    """The volume of ``order`` (frames in slice order, checked by `plan_series`), pixels decoded
    and rescaled. ``geometry_frames``: the frames the geometry is taken from when ``order`` is a
    slab of a larger volume (default: ``order``)."""
    first = order[0]
    row_dir, col_dir = _unit(first.orientation[:3]), _unit(first.orientation[3:])
    normal = _normal(first.orientation)
    axis, dz = _slice_axis(geometry_frames or order, normal, cfg)
    geometry = Geometry(
        origin=first.position.astype(np.float64),
        axes=np.stack([axis, col_dir, row_dir]),
        spacing_zyx=(dz, float(first.pixel_spacing[0]), float(first.pixel_spacing[1])),
    )
    voxels = _load_voxels(order)
    header = headers[first.path].copy()
    modality = str(header.get("Modality", ""))
    rescale_types = {f.rescale_type for f in order}
    rescale_type = rescale_types.pop() if len(rescale_types) == 1 else None
    if modality == "CT" and rescale_type in (None, "HU"):
        units = "HU"
    else:
        units = rescale_type or "native"
    multiframe = any(f.number_of_frames > 1 for f in order)
    source = SeriesRef(
        study_uid=str(header.StudyInstanceUID),
        series_uid=str(header.SeriesInstanceUID),
        modality=modality,
        sop_class_uid=str(header.SOPClassUID),
        sop_instance_uids=tuple(f.sop_instance_uid for f in order),
        frame_numbers=tuple(f.frame_index + 1 for f in order) if multiframe else (),
    )
    provenance = [f"assembled {len(order)} frames from {len({f.path for f in order})} instances"]
    if geometry.tilt_deg > 0.01:
        provenance.append(f"gantry tilt {geometry.tilt_deg:.2f} deg")
    log.info("assembly.volume", series_uid=source.series_uid, label=label, shape=list(voxels.shape),
             spacing_mm=[round(s, 4) for s in geometry.spacing_zyx], tilt_deg=round(geometry.tilt_deg, 3))
    return Volume(voxels, geometry, units, source, header=header, label=label, provenance=provenance,
                  slice_headers=[headers[f.path] for f in order],
                  slice_positions=np.stack([f.position for f in order]).astype(np.float64))


def _load_voxels(order: list[Frame]) -> np.ndarray:
    first = order[0]
    voxels = np.empty((len(order), first.rows, first.columns), dtype=np.float32)
    slots: dict[Path, list[tuple[int, Frame]]] = defaultdict(list)
    for k, f in enumerate(order):
        slots[f.path].append((k, f))
    for path, members in slots.items():
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as exc:
            raise AssemblyError("undecodable", f"{path.name}: {type(exc).__name__}: {exc}") from exc
        for k, f in members:
            stored = pixels[f.frame_index] if f.number_of_frames > 1 else pixels
            if stored.shape != (f.rows, f.columns):
                raise AssemblyError("undecodable", f"{path.name}: decoded shape {stored.shape}")
            voxels[k] = stored.astype(np.float64) * f.slope + f.intercept
    return voxels
