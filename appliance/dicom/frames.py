"""One `Frame` record per 2-D image, whether it came from a classic single-frame instance or from a
frame of an enhanced multi-frame instance (functional groups). The assembler works on frames only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset


@dataclass(frozen=True)
class Frame:
    path: Path
    sop_instance_uid: str
    frame_index: int  # 0-based frame within its instance
    number_of_frames: int
    position: np.ndarray | None  # ImagePositionPatient, mm (3,)
    orientation: np.ndarray | None  # ImageOrientationPatient (6,): row cosines, column cosines
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns), mm
    slice_thickness: float | None
    rows: int
    columns: int
    pixel_format: tuple  # (bits allocated, bits stored, pixel representation, samples, photometric)
    slope: float
    intercept: float
    rescale_type: str | None
    echo: str | None  # split keys: different values never share a volume
    temporal: str | None
    stack: str | None
    acquisition: str | None  # tie-breakers for instances at the same position
    trigger_time: float | None
    acquisition_time: str | None
    instance_number: int | None

    @property
    def samples_per_pixel(self) -> int:
        return int(self.pixel_format[3])


def _first(seq_owner: Dataset | None, sequence: str) -> Dataset | None:
    if seq_owner is None:
        return None
    seq = seq_owner.get(sequence)
    return seq[0] if seq else None


def _lookup(per_frame: Dataset | None, shared: Dataset | None, sequence: str, keyword: str) -> Any:
    """A functional-group attribute: the per-frame group wins over the shared one."""
    for group in (per_frame, shared):
        item = _first(group, sequence)
        if item is not None and keyword in item and item.get(keyword) not in (None, ""):
            return item.get(keyword)
    return None


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str):
        return "\\".join(str(v) for v in value)
    return str(value)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def frames_of(ds: Dataset, path: Path) -> list[Frame]:
    """The frames of one instance (header only; pixels are read later by the assembler)."""
    n_frames = _int(ds.get("NumberOfFrames")) or 1
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence")
    enhanced = shared is not None or per_frame_seq is not None
    pixel_format = (
        _int(ds.get("BitsAllocated")),
        _int(ds.get("BitsStored")),
        _int(ds.get("PixelRepresentation")),
        _int(ds.get("SamplesPerPixel")) or 1,
        str(ds.get("PhotometricInterpretation", "")),
    )
    common = dict(
        path=path,
        sop_instance_uid=str(ds.SOPInstanceUID),
        number_of_frames=n_frames,
        rows=_int(ds.get("Rows")) or 0,
        columns=_int(ds.get("Columns")) or 0,
        pixel_format=pixel_format,
        acquisition=_text(ds.get("AcquisitionNumber")),
        acquisition_time=_text(ds.get("AcquisitionTime")) or _text(ds.get("ContentTime")),
        instance_number=_int(ds.get("InstanceNumber")),
    )
    if not enhanced:
        slope = _float(ds.get("RescaleSlope"))
        intercept = _float(ds.get("RescaleIntercept"))
        spacing = _floats(ds.get("PixelSpacing"), 2) if "PixelSpacing" in ds else None
        base = Frame(
            frame_index=0,
            position=_floats(ds.get("ImagePositionPatient"), 3) if "ImagePositionPatient" in ds else None,
            orientation=_floats(ds.get("ImageOrientationPatient"), 6) if "ImageOrientationPatient" in ds else None,
            pixel_spacing=tuple(spacing) if spacing is not None else None,
            slice_thickness=_float(ds.get("SliceThickness")),
            slope=1.0 if slope is None or slope == 0 else slope,
            intercept=intercept or 0.0,
            rescale_type=_text(ds.get("RescaleType")),
            echo=_text(ds.get("EchoNumbers")),
            temporal=_text(ds.get("TemporalPositionIdentifier")),
            stack=None,
            trigger_time=_float(ds.get("TriggerTime")),
            **common,
        )
        if n_frames == 1:
            return [base]
        # A classic multi-frame without functional groups has one position for all its frames:
        # they cannot be placed in space, so they carry none and the assembler says so.
        return [replace(base, frame_index=i, position=None) for i in range(n_frames)]

    frames = []
    if per_frame_seq is not None:
        # Never trust NumberOfFrames beyond the per-frame groups actually present.
        n_frames = min(n_frames, len(per_frame_seq))
    for i in range(n_frames):
        pf = per_frame_seq[i] if per_frame_seq is not None else None
        spacing = _floats(_lookup(pf, shared, "PixelMeasuresSequence", "PixelSpacing"), 2)
        slope = _float(_lookup(pf, shared, "PixelValueTransformationSequence", "RescaleSlope"))
        if slope is None:
            slope = _float(ds.get("RescaleSlope"))
        intercept = _float(_lookup(pf, shared, "PixelValueTransformationSequence", "RescaleIntercept"))
        if intercept is None:
            intercept = _float(ds.get("RescaleIntercept"))
        frame_content = _first(pf, "FrameContentSequence")
        echo_time = _lookup(pf, shared, "MREchoSequence", "EffectiveEchoTime")
        frames.append(
            Frame(
                frame_index=i,
                position=_floats(_lookup(pf, shared, "PlanePositionSequence", "ImagePositionPatient"), 3),
                orientation=_floats(_lookup(pf, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                pixel_spacing=tuple(spacing) if spacing is not None else None,
                slice_thickness=_float(_lookup(pf, shared, "PixelMeasuresSequence", "SliceThickness")),
                slope=1.0 if slope is None or slope == 0 else slope,
                intercept=intercept or 0.0,
                rescale_type=_text(_lookup(pf, shared, "PixelValueTransformationSequence", "RescaleType")),
                echo=_text(echo_time),
                temporal=_text(frame_content.get("TemporalPositionIndex")) if frame_content else None,
                stack=_text(frame_content.get("StackID")) if frame_content else None,
                trigger_time=_float(_lookup(pf, shared, "CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime")),
                **common,
            )
        )
    return frames

