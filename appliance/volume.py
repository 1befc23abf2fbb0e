"""Core image type: a `Volume` is voxels plus where they sit in the patient.

Conventions, used everywhere in the project:
- voxels are a numpy array indexed (z, y, x) = (slice, row, column);
- positions are in mm in the DICOM patient coordinate system (LPS: +x to the patient's left,
  +y to the posterior, +z to the head);
- ``axes`` is a 3x3 array whose row k is the unit vector (LPS) along array axis k:
  row 0 the slice direction, row 1 down the rows (DICOM column cosines), row 2 along a row
  (DICOM row cosines);
- ``spacing_zyx`` is the distance in mm between neighbouring voxel centres along each array axis;
- the centre of voxel (k, j, i) is at ``origin + k*dz*axes[0] + j*dy*axes[1] + i*dx*axes[2]``.

With gantry tilt the slice direction is not perpendicular to the image plane; ``axes[0]`` then
points from one slice position to the next, and ``tilt_deg`` records the angle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Geometry:
    origin: np.ndarray  # (3,) mm, LPS: centre of voxel (0, 0, 0)
    axes: np.ndarray  # (3, 3) unit vectors, rows = array axes z, y, x
    spacing_zyx: tuple[float, float, float]  # mm

    @property
    def normal(self) -> np.ndarray:
        """Unit normal of the image plane (row cosines x column cosines)."""
        n = np.cross(self.axes[2], self.axes[1])
        return n / np.linalg.norm(n)

    @property
    def tilt_deg(self) -> float:
        """Angle between the slice direction and the image-plane normal, degrees."""
        c = float(np.clip(abs(np.dot(self.axes[0], self.normal)), 0.0, 1.0))
        return float(np.degrees(np.arccos(c)))

    def slice_position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice k, mm."""
        return self.origin + k * self.spacing_zyx[0] * self.axes[0]

    @property
    def image_orientation(self) -> list[float]:
        """DICOM ImageOrientationPatient: row cosines then column cosines."""
        return [float(v) for v in (*self.axes[2], *self.axes[1])]


@dataclass(frozen=True)
class SeriesRef:
    """The source series a volume came from: what a derived series must point back to."""

    study_uid: str
    series_uid: str
    modality: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]  # one per slice, in volume order (frame-level for multi-frame)
    frame_numbers: tuple[int, ...] = ()  # 1-based frame per slice for multi-frame sources; () otherwise


@dataclass
class Volume:
    """Voxels (z, y, x) float32 in ``units`` (HU for CT) with geometry and provenance."""

    voxels: np.ndarray
    geometry: Geometry
    units: str  # "HU" for CT; the rescale type (or "native") otherwise
    source: SeriesRef
    header: Any = None  # pydicom Dataset: the first slice's attributes, pixel data removed
    label: str = ""  # how it was split from its series, e.g. "echo=2"; "" when the series is one volume
    provenance: list[str] = field(default_factory=list)
    # Set by the assembler, one per slice: each slice's own source header (pixel data removed) and
    # ImagePositionPatient (mm). A stage that keeps the slices (denoise, passthrough) keeps them; one
    # that resamples makes a new Volume without them. They let each derived instance depend on its
    # own slice only (`derive.derive_datasets`).
    slice_headers: list[Any] | None = None
    slice_positions: np.ndarray | None = None  # (z, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.voxels.shape)  # type: ignore[return-value]
