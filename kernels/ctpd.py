"""Read and write DICOM-CT-PD projection data (one DICOM instance per view) as `Projections`.

DICOM-CT-PD (Chen et al., Med Phys 42:6964, 2015; User Manual v3, 2020; the TCIA
"LDCT-and-Projection-data" collection) stores one view per instance: uint16 pixels that
RescaleSlope/RescaleIntercept map to line integrals, and the scanner geometry in private tags
(`TAGS`). This module maps that geometry onto `kernels.geometry.ProjectionGeometry`.

Conventions, and why (sources: the User Manual v3 as summarised in public notes, the v8 MATLAB
dictionary shipped with the data, and the open readers helix2fan, FreeCT and ODL's Mayo loader):
- Private blocks: written with the creator `PRIVATE_CREATOR` at (gggg,0010) in every group used;
  read by tag number inside whichever block (gggg,00xx) holds an accepted creator (any string
  starting "DICOM-CT-PD", or one the caller names). Without an accepted creator a dataset is not
  DICOM-CT-PD. Values are decoded whether typed (explicit VR) or raw bytes (implicit VR / UN).
- Angles: phi of this project's frame *is* the format's phi0 (so our x = format y, our y = -format
  x: a rotation about z, not a mirror). Angles are written wrapped to [0, 2 pi) as float32, like the
  published files, and come back unwrapped (`np.unwrap`), starting in [0, 2 pi).
- Detector element order: the format numbers columns from the left and rows from the far end
  when the detector, at 6 o'clock, is seen from the table (User Manual v3). With phi increasing
  anticlockwise in that view, file columns run along -u and file rows along -z of our frame, so
  both axes are reversed on reading and writing (`_to_file_order`).
- Central element (7031,1033) = (column, row) is **1-based** (MATLAB-style): the manual's example
  (369.625, 32.5) on a 736 x 64 detector is 1.125 columns off the 1-based middle 368.5 (the quarter
  offset) and exactly on the 1-based row middle 32.5. In our 0-based reversed order
  ``u0 = n_cols - column``, ``v0 = n_rows - row``.
- Pixel layout: written Rows = detector rows, Columns = detector columns. The published files are
  stored transposed (Rows = detector columns); read either, told apart by (7029,1010/1011).
- Flying focal spot: the manual defines (7033,100B) = delta phi, (7033,100C) = delta z; the v8
  dictionary shipped with the data names them the other way round, and open readers split.
  ``ffs_order="phi_z_rho"`` (default: the manual, helix2fan, FreeCT) or ``"z_phi_rho"`` (the v8
  dictionary, ODL's Mayo loader). Writing always follows the manual.
- Water attenuation: (7041,1001), else (0018,0061) (older files); a value above 0.1 is taken as
  1/cm (water is 0.015-0.035 /mm at CT energies) and converted to 1/mm.
- SOP class: written as CT Image Storage, as the published files are, so ordinary DICOM nodes
  store and forward it; Raw Data Storage (no image pixel module) is read as well.

Not yet checked against a real TCIA file: the creator string those files carry (an unexpected one
reads as "not DICOM-CT-PD": pass it in ``extra_creators``), and the row direction (ODL's loader
takes file rows along +z, the manual's wording gives -z). Reconstruct one published case and compare
it with the collection's own images before trusting helical results.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import pydicom
import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.datadict import tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from kernels.geometry import Detector, ProjectionGeometry

log = structlog.get_logger(__name__)

PRIVATE_CREATOR = "DICOM-CT-PD dict_v8"
CREATOR_PREFIX = "DICOM-CT-PD"  # accepted on reading: any dictionary version, hyphen or space
FfsOrder = Literal["phi_z_rho", "z_phi_rho"]
FFS_ORDERS: tuple[str, ...] = ("phi_z_rho", "z_phi_rho")


@dataclass(frozen=True)
class PrivateTag:
    group: int
    element: int  # as published, i.e. in block 0x10; the low byte is the offset in any block
    vr: str
    name: str  # the DICOM-CT-PD dictionary's keyword
    meaning: str

    @property
    def offset(self) -> int:
        return self.element & 0xFF


TAGS: Mapping[str, PrivateTag] = MappingProxyType({t.name: t for t in (
    PrivateTag(0x7029, 0x1010, "US", "NumberofDetectorRows", "detector rows"),
    PrivateTag(0x7029, 0x1011, "US", "NumberofDetectorColumns", "detector columns"),
    PrivateTag(0x7029, 0x1002, "FL", "DetectorElementTransverseSpacing", "column pitch at the detector, mm"),
    PrivateTag(0x7029, 0x1006, "FL", "DetectorElementAxialSpacing", "row pitch at the detector, mm"),
    PrivateTag(0x7029, 0x100B, "CS", "DetectorShape", "CYLINDRICAL, SPHERICAL or FLAT"),
    PrivateTag(0x7031, 0x1001, "FL", "DetectorFocalCenterAngularPosition", "phi0 per view, rad"),
    PrivateTag(0x7031, 0x1002, "FL", "DetectorFocalCenterAxialPosition", "z0 per view, mm"),
    PrivateTag(0x7031, 0x1003, "FL", "DetectorFocalCenterRadialDistance", "rho0, focal centre to isocentre, mm"),
    PrivateTag(0x7031, 0x1031, "FL", "ConstantRadialDistance", "d0, focal centre to detector, mm"),
    PrivateTag(0x7031, 0x1033, "FL", "DetectorCentralElement", "(column, row), 1-based, of the isocentre ray"),
    PrivateTag(0x7033, 0x100B, "FL", "SourceAngularPositionShift", "FFS delta phi, rad (manual; v8 dict: delta z)"),
    PrivateTag(0x7033, 0x100C, "FL", "SourceAxialPositionShift", "FFS delta z, mm (manual; v8 dict: delta phi)"),
    PrivateTag(0x7033, 0x100D, "FL", "SourceRadialDistanceShift", "FFS delta rho, mm"),
    PrivateTag(0x7033, 0x100E, "CS", "FlyingFocalSpotMode", "FFSNONE, FFSZ, FFSXY or FFSXYZ"),
    PrivateTag(0x7033, 0x1013, "US", "NumberofSourceAngularSteps", "views per rotation"),
    PrivateTag(0x7033, 0x1061, "US", "NumberofSources", "sources (spectra) in the acquisition"),
    PrivateTag(0x7033, 0x1063, "US", "SourceIndex", "source (spectrum) of this view"),
    PrivateTag(0x7033, 0x1065, "FL", "PhotonStatistics", "incident photons per column, this view"),
    PrivateTag(0x7033, 0x1067, "FL", "Timestamp", "acquisition time of the view, ms"),
    PrivateTag(0x7037, 0x1009, "CS", "TypeofProjectionData", "AXIAL or HELICAL"),
    PrivateTag(0x7037, 0x100A, "CS", "TypeofProjectionGeometry", "FANBEAM (third generation, any rows)"),
    PrivateTag(0x7039, 0x1009, "CS", "LogFlag", "YES: pixels are line integrals"),
    PrivateTag(0x7041, 0x1001, "DS", "WaterAttenuationCoefficient", "mu of water for HU, 1/mm"),
)})
HU_CALIBRATION_FACTOR = Tag(0x0018, 0x0061)  # older files' water mu; in no current DICOM dictionary

REQUIRED = (
    "NumberofDetectorRows", "NumberofDetectorColumns", "DetectorElementTransverseSpacing",
    "DetectorElementAxialSpacing", "DetectorShape", "DetectorFocalCenterAngularPosition",
    "DetectorFocalCenterAxialPosition", "DetectorFocalCenterRadialDistance", "ConstantRadialDistance",
    "DetectorCentralElement",
)
_SHAPES = {"CYLINDRICAL": "curved", "FLAT": "flat"}
_GROUPS = sorted({t.group for t in TAGS.values()})
_WRITER_OWNED = {
    "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "PixelData", "RescaleSlope",
    "RescaleIntercept", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "SamplesPerPixel", "PhotometricInterpretation",
}
MAX_QUANTISATION = 1e-4  # largest line-integral rounding error the writer accepts
_MAX_STORED = 65000  # headroom below 65535: slope/intercept printed as DS never push a value out
_FFS_PLAUSIBLE_DPHI = 0.01  # rad; real in-plane focal-spot deflections are ~1e-3 rad


class CtpdError(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # coded, e.g. "missing_geometry", "inconsistent_detector"
        self.detail = detail  # for a field engineer


@dataclass(frozen=True, eq=False)
class Projections:
    data: np.ndarray  # (views, rows, cols) float32 line integrals, our detector order
    geometry: ProjectionGeometry
    counts: np.ndarray | None  # (views, n) photon statistics (n = cols, our order) if present
    water_mu: float | None  # 1/mm
    header: Dataset | None  # first view without pixel data: patient/study for the recon output
    source_sop_uids: tuple[str, ...]


# --- private blocks and value decoding -------------------------------------------------------

def _accepted(value: Any, extra: frozenset[str]) -> bool:
    text = value.decode("ascii", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
    text = text.strip("\x00 ").upper()
    return text.startswith(CREATOR_PREFIX) or text in extra


def _blocks(ds: Dataset, extra_creators: Iterable[str] = ()) -> dict[int, int]:
    """group -> block byte (0x10-0xFF) of the first accepted private creator in that group."""
    extra = frozenset(c.strip().upper() for c in extra_creators)
    found: dict[int, int] = {}
    for tag in sorted(t for t in ds.keys() if t.group in _GROUPS and 0x10 <= t.element <= 0xFF):
        if tag.group not in found and _accepted(ds[tag].value, extra):
            found[tag.group] = tag.element
    return found


def _element(ds: Dataset, blocks: dict[int, int], name: str):
    spec = TAGS[name]
    block = blocks.get(spec.group)
    return None if block is None else ds.get(Tag(spec.group, (block << 8) | spec.offset))


def _numbers(elem, vr: str) -> np.ndarray:
    value = elem.value
    if isinstance(value, (bytes, bytearray)):  # implicit VR or UN: the VR is ours to know
        raw = bytes(value)
        size = {"FL": 4, "US": 2}.get(vr)
        if size and raw and len(raw) % size == 0:
            return np.frombuffer(raw, "<f4" if vr == "FL" else "<u2").astype(np.float64)
        try:
            return np.array([float(v) for v in raw.decode("ascii").strip("\x00 ").split("\\")])
        except (UnicodeDecodeError, ValueError):
            if len(raw) % 4 == 0:  # a DS tag written as binary float32 by some writer
                return np.frombuffer(raw, "<f4").astype(np.float64)
            raise CtpdError("unreadable_value", f"{elem.tag}: {len(raw)} bytes are neither float32 nor text")
    if value is None or value == "":
        return np.empty(0)
    values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    return np.array([float(v) for v in values], dtype=np.float64)


def _text(elem) -> str:
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "replace")
    elif isinstance(value, MultiValue):
        value = "\\".join(map(str, value))
    return str(value).strip("\x00 ").upper()


def _water_per_mm(value: float) -> float:
    return value / 10.0 if value > 0.1 else value  # > 0.1 can only be 1/cm


def is_ctpd(ds: Dataset, extra_creators: Iterable[str] = ()) -> bool:
    """True when ``ds`` carries the DICOM-CT-PD geometry tags inside a block with an accepted creator."""
    blocks = _blocks(ds, extra_creators)
    return all(_element(ds, blocks, name) is not None for name in REQUIRED)


# --- reading -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _View:
    path: Path
    sort_key: tuple
    sop_uid: str
    series_uid: str
    rows: int  # DICOM Rows / Columns of the pixel matrix
    columns: int
    values: dict[str, Any]  # by TAGS name: np.ndarray (numbers) or str (CS)


def _read_view(path: Path, extra_creators: Iterable[str]) -> _View:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise CtpdError("unreadable", f"{Path(path).name}: {type(exc).__name__}: {exc}") from exc
    blocks = _blocks(ds, extra_creators)
    values: dict[str, Any] = {}
    for name, spec in TAGS.items():
        elem = _element(ds, blocks, name)
        if elem is not None and elem.value not in (None, b"", ""):
            values[name] = _text(elem) if spec.vr == "CS" else _numbers(elem, spec.vr)
    missing = [n for n in REQUIRED if n not in values]
    if missing:
        raise CtpdError("missing_geometry", f"{Path(path).name}: no {', '.join(missing)} in a DICOM-CT-PD block "
                        f"(creators found in groups {sorted(hex(g) for g in blocks)})")
    if "WaterAttenuationCoefficient" not in values and HU_CALIBRATION_FACTOR in ds:
        values["WaterAttenuationCoefficient"] = _numbers(ds[HU_CALIBRATION_FACTOR], "DS")
    instance = ds.get("InstanceNumber")
    stamp = values.get("Timestamp", np.empty(0))
    sort_key = (
        instance is None or instance == "", int(instance) if instance not in (None, "") else 0,
        float(stamp[0]) if len(stamp) else float("inf"),
        str(ds.get("AcquisitionDateTime", "")) + str(ds.get("AcquisitionTime", "")) + str(ds.get("ContentTime", "")),
        str(ds.get("SOPInstanceUID", "")), str(path),
    )
    return _View(Path(path), sort_key, str(ds.get("SOPInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
                 int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0), values)


def _scalar(views: list[_View], name: str, reason: str, rtol: float = 1e-5) -> np.ndarray:
    """The value of ``name`` shared by all views (a 1-D array); raises ``reason`` when they differ."""
    first = views[0].values[name]
    for v in views[1:]:
        other = v.values[name]
        if isinstance(first, str):
            same = other == first
        else:
            same = other.shape == first.shape and np.allclose(other, first, rtol=rtol, atol=1e-6)
        if not same:
            raise CtpdError(reason, f"{name} is {first!r} in {views[0].path.name} but {other!r} in {v.path.name}")
    return first


def _per_view(views: list[_View], name: str, default: float | None = None) -> np.ndarray:
    out = []
    for v in views:
        value = v.values.get(name)
        if value is None or len(value) == 0:
            if default is None:
                raise CtpdError("missing_geometry", f"{v.path.name}: no {name}")
            out.append(default)
        else:
            out.append(float(value[0]))
    return np.asarray(out, dtype=np.float64)


def _detector(views: list[_View]) -> Detector:
    shapes = sorted({v.values["DetectorShape"] for v in views})
    if len(shapes) > 1:
        raise CtpdError("inconsistent_detector", f"mixed detector shapes {shapes}")
    if shapes[0] not in _SHAPES:
        raise CtpdError("unsupported_detector_shape",
                        f"DetectorShape {shapes[0]!r}: only CYLINDRICAL (curved) and FLAT are reconstructed here")
    n_v = int(_scalar(views, "NumberofDetectorRows", "inconsistent_detector")[0])
    n_u = int(_scalar(views, "NumberofDetectorColumns", "inconsistent_detector")[0])
    for v in views:
        if (v.rows, v.columns) not in {(n_v, n_u), (n_u, n_v)}:
            raise CtpdError("inconsistent_detector", f"{v.path.name}: pixel matrix {v.rows}x{v.columns} is not the "
                            f"{n_v} rows x {n_u} columns of the detector tags")
    du = float(_scalar(views, "DetectorElementTransverseSpacing", "inconsistent_detector")[0])
    dv = float(_scalar(views, "DetectorElementAxialSpacing", "inconsistent_detector")[0])
    centre = _scalar(views, "DetectorCentralElement", "inconsistent_detector")
    if len(centre) != 2 or min(n_u, n_v) < 1 or du <= 0 or dv <= 0:
        raise CtpdError("missing_geometry", f"implausible detector: {n_v}x{n_u}, pitch {du}x{dv} mm, "
                        f"central element {centre.tolist()}")
    return Detector(n_u, n_v, du, dv, n_u - float(centre[0]), n_v - float(centre[1]), _SHAPES[shapes[0]])


def _check_single_acquisition(views: list[_View]) -> None:
    series = sorted({v.series_uid for v in views})
    if len(series) > 1:
        raise CtpdError("mixed_series", f"{len(series)} SeriesInstanceUIDs among {len(views)} views")
    sources = sorted({float(v.values["SourceIndex"][0]) for v in views if len(v.values.get("SourceIndex", ()))})
    if len(sources) > 1:
        raise CtpdError("mixed_sources", f"views of sources {sources}: split per source before reconstruction")


def _pixels(view: _View, det: Detector) -> np.ndarray:
    ds = pydicom.dcmread(view.path)
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise CtpdError("unsupported_pixel_data", f"{view.path.name}: one greyscale frame per view expected")
    try:
        stored = np.asarray(ds.pixel_array, dtype=np.float64)
    except Exception as exc:  # no pixel data, or a transfer syntax without a decoder here
        raise CtpdError("unsupported_pixel_data", f"{view.path.name}: {type(exc).__name__}: {exc}") from exc
    if stored.shape != (det.n_v, det.n_u):  # the published files' transposed layout
        stored = stored.T
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return _to_file_order(stored * slope + intercept).astype(np.float32)


def _photon_statistics(views: list[_View], det: Detector) -> np.ndarray | None:
    """(views, n) float32 when every view has (7033,1065); per-column values come in our column order."""
    stats = [v.values.get("PhotonStatistics") for v in views]
    if any(s is None or len(s) == 0 for s in stats):
        return None
    if len({len(s) for s in stats}) > 1:
        raise CtpdError("inconsistent_detector", "PhotonStatistics has a different length in some views")
    counts = np.stack(stats)
    return (counts[:, ::-1] if counts.shape[1] == det.n_u else counts).astype(np.float32)


def _to_file_order(view: np.ndarray) -> np.ndarray:
    """Our (row, column) order <-> the format's: both axes reversed (an involution)."""
    return view[..., ::-1, ::-1]


def read_ctpd(paths: Iterable[Path], ffs_order: FfsOrder = "phi_z_rho",
              extra_creators: Iterable[str] = ()) -> Projections:
    """Read one DICOM-CT-PD series (any file order) into `Projections`.

    Views are sorted by InstanceNumber, then Timestamp (7033,1067), acquisition/content time and
    SOPInstanceUID. ``data`` is (views, rows, cols) float32 line integrals; angles in rad, lengths in
    mm; ``ffs_order`` picks the reading of (7033,100B/100C) (see the module docstring).
    Raises `CtpdError` with a coded reason.
    """
    if ffs_order not in FFS_ORDERS:
        raise ValueError(f"ffs_order must be one of {FFS_ORDERS}, got {ffs_order!r}")
    extra_creators = tuple(extra_creators)
    views = sorted((_read_view(Path(p), extra_creators) for p in paths), key=lambda v: v.sort_key)
    if not views:
        raise CtpdError("no_views", "no DICOM-CT-PD instances given")
    _check_single_acquisition(views)
    det = _detector(views)
    sod = float(_scalar(views, "DetectorFocalCenterRadialDistance", "inconsistent_geometry")[0])
    sdd = float(_scalar(views, "ConstantRadialDistance", "inconsistent_geometry")[0])
    shifts = [_per_view(views, n, 0.0) for n in
              ("SourceAngularPositionShift", "SourceAxialPositionShift", "SourceRadialDistanceShift")]
    dphi, dz = (shifts[0], shifts[1]) if ffs_order == "phi_z_rho" else (shifts[1], shifts[0])
    if np.max(np.abs(dphi), initial=0.0) > _FFS_PLAUSIBLE_DPHI:
        log.warning("ctpd.ffs_order_suspect", ffs_order=ffs_order, max_dphi_rad=float(np.max(np.abs(dphi))),
                    hint="in-plane focal-spot deflections are ~1e-3 rad; try the other ffs_order")
    try:
        geometry = ProjectionGeometry(det, sod, sdd, np.unwrap(_per_view(views, "DetectorFocalCenterAngularPosition")),
                                      source_z=_per_view(views, "DetectorFocalCenterAxialPosition"),
                                      ffs_dphi=dphi, ffs_dz=dz, ffs_drho=shifts[2])
    except ValueError as exc:
        raise CtpdError("invalid_geometry", str(exc)) from exc
    counts = _photon_statistics(views, det)
    water = views[0].values.get("WaterAttenuationCoefficient")
    data = np.empty((len(views), det.n_v, det.n_u), dtype=np.float32)
    for k, view in enumerate(views):
        data[k] = _pixels(view, det)
    header = pydicom.dcmread(views[0].path, stop_before_pixels=True)
    log.info("ctpd.read", views=len(views), rows=det.n_v, columns=det.n_u, shape=det.shape, ffs_order=ffs_order)
    return Projections(data, geometry, counts, _water_per_mm(float(water[0])) if water is not None and len(water)
                       else None, header, tuple(v.sop_uid for v in views))


# --- writing -----------------------------------------------------------------------------------

def _ds_text(value: float) -> str:
    return f"{value:.10g}"  # at most 16 characters, the DS limit


def _rescale(data: np.ndarray) -> tuple[str, str]:
    """(slope, intercept) as written; the rounding error is at most slope/2 <= MAX_QUANTISATION."""
    lo, hi = float(data.min()), float(data.max())
    intercept = _ds_text(lo)
    slope = _ds_text(max((hi - float(intercept)) / _MAX_STORED, 1e-9))
    if float(slope) / 2 > MAX_QUANTISATION:
        raise CtpdError("data_range", f"line integrals span {lo:.4g}..{hi:.4g}: 16 bits hold at most "
                        f"{2 * MAX_QUANTISATION * _MAX_STORED:.3g} at {MAX_QUANTISATION} precision")
    return slope, intercept


def _uid(uid_root: str, seed_text: str, *parts: object) -> str:
    return str(generate_uid(prefix=uid_root, entropy_srcs=[seed_text, *map(str, parts)]))


def _series_dataset(geom: ProjectionGeometry, uid_root: str, seed_text: str, study: Mapping[str, Any],
                    slope: str, intercept: str) -> Dataset:
    det = geom.detector
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "PROJECTION DATA"]
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.Manufacturer = "appliance"
    ds.SeriesDescription = "DICOM-CT-PD projection data"
    ds.PatientName = "ANONYMOUS"
    ds.PatientID = "CTPD-" + hashlib.sha256(seed_text.encode()).hexdigest()[:10]
    for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
                    "StudyID", "AccessionNumber", "KVP", "PositionReferenceIndicator"):
        setattr(ds, keyword, "")
    ds.StudyInstanceUID = _uid(uid_root, seed_text, "study")
    ds.SeriesInstanceUID = _uid(uid_root, seed_text, "series")
    ds.FrameOfReferenceUID = _uid(uid_root, seed_text, "frame-of-reference")
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    for keyword, value in study.items():
        if keyword in _WRITER_OWNED or tag_for_keyword(keyword) is None:
            raise ValueError(f"study[{keyword!r}]: not a DICOM keyword the caller may set")
        setattr(ds, keyword, value)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = det.n_v, det.n_u
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    for group in _GROUPS:
        ds.add_new(Tag(group, 0x0010), "LO", PRIVATE_CREATOR)
    u0, v0 = det.centre
    z_moves = geom.n_views > 1 and np.ptp(geom.source_z) > 0
    xy = bool(np.any(geom.ffs_dphi) or np.any(geom.ffs_drho))
    constant = {
        "NumberofDetectorRows": det.n_v, "NumberofDetectorColumns": det.n_u,
        "DetectorElementTransverseSpacing": float(det.du), "DetectorElementAxialSpacing": float(det.dv),
        "DetectorShape": "CYLINDRICAL" if det.shape == "curved" else "FLAT",
        "DetectorFocalCenterRadialDistance": float(geom.sod), "ConstantRadialDistance": float(geom.sdd),
        "DetectorCentralElement": [float(det.n_u - u0), float(det.n_v - v0)],  # 1-based, file order
        "FlyingFocalSpotMode": {(False, False): "FFSNONE", (False, True): "FFSZ", (True, False): "FFSXY",
                                (True, True): "FFSXYZ"}[(xy, bool(np.any(geom.ffs_dz)))],
        "NumberofSources": 1, "SourceIndex": 1,
        "TypeofProjectionData": "HELICAL" if z_moves else "AXIAL", "TypeofProjectionGeometry": "FANBEAM",
        "LogFlag": "YES",
    }
    steps = np.abs(np.diff(geom.angles))
    if len(steps) and np.median(steps) > 0:
        constant["NumberofSourceAngularSteps"] = int(min(round(2 * np.pi / np.median(steps)), 65535))
    for name, value in constant.items():
        _put(ds, name, value)
    return ds


def _put(ds: Dataset, name: str, value: Any) -> None:
    spec = TAGS[name]
    ds.add_new(Tag(spec.group, spec.element), spec.vr, value)


def write_ctpd(out_dir: Path, data: np.ndarray, geom: ProjectionGeometry, *, uid_root: str, seed_text: str,
               study: Mapping[str, Any] | None = None, water_mu: float | None = 0.0192,
               counts: np.ndarray | None = None) -> list[Path]:
    """Write ``data`` (views, rows, cols) line integrals on ``geom`` as one DICOM-CT-PD instance per view
    (CT Image Storage, Explicit VR Little Endian) under ``out_dir``; returns the paths in view order.

    Deterministic: the same inputs give the same bytes; UIDs come from ``uid_root`` + ``seed_text``.
    ``study``: DICOM keywords (patient, study, series attributes) overriding the generated ones.
    ``water_mu`` in 1/mm (None: not written). ``counts``: photon statistics, (views, cols) or (views,).
    Pixels are uint16 with one RescaleSlope/Intercept for the series, rounding error <= 1e-4.
    """
    data = np.asarray(data)
    if data.shape != geom.shape:
        raise ValueError(f"data shape {data.shape} does not match the geometry {geom.shape}")
    if not np.all(np.isfinite(data)):
        raise CtpdError("invalid_data", "line integrals contain NaN or infinity")
    if counts is not None:
        counts = np.asarray(counts, dtype=np.float64).reshape(geom.n_views, -1)
        if counts.shape[1] not in (1, geom.detector.n_u):
            raise ValueError(f"counts must be (views,) or (views, {geom.detector.n_u}), got {counts.shape}")
    slope, intercept = _rescale(data)
    stored = np.clip(np.rint((data.astype(np.float64) - float(intercept)) / float(slope)), 0, 65535)
    stored = _to_file_order(stored).astype("<u2")
    base = _series_dataset(geom, uid_root, seed_text, study or {}, slope, intercept)
    if water_mu is not None:
        _put(base, "WaterAttenuationCoefficient", f"{water_mu:.8g}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    angles = np.mod(geom.angles, 2 * np.pi)
    paths = []
    for k in range(geom.n_views):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = _uid(uid_root, seed_text, "view", k)
        ds.InstanceNumber = k + 1
        for name, value in (("DetectorFocalCenterAngularPosition", angles[k]),
                            ("DetectorFocalCenterAxialPosition", geom.source_z[k]),
                            ("SourceAngularPositionShift", geom.ffs_dphi[k]),
                            ("SourceAxialPositionShift", geom.ffs_dz[k]),
                            ("SourceRadialDistanceShift", geom.ffs_drho[k])):
            _put(ds, name, float(value))
        if counts is not None:
            _put(ds, "PhotonStatistics", [float(c) for c in counts[k, ::-1]])
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out_dir / f"PD{k + 1:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
