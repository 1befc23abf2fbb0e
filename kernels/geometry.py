"""CT acquisition geometry: fan beam (2-D) and cone beam (3-D), flat or curved detector.

Frame and units (used by the kernels, the NumPy reference and the DICOM-CT-PD reader alike):
- scanner frame, mm: isocentre at the origin, z along the rotation axis, (x, y) the gantry plane;
- the focal spot of view k sits at cylindrical (phi_k, z_k, rho_k):
  ``s = (rho cos phi, rho sin phi, z)``, with flying-focal-spot offsets added per view;
- the detector faces the source through the isocentre: central direction ``d = -(cos phi, sin phi, 0)``,
  transverse axis ``u = (-sin phi, cos phi, 0)`` (the direction of increasing phi), axial axis
  ``v = (0, 0, 1)``; the nominal (offset-free) focal spot defines where the detector is;
- detector element (iu, iv), 0-based, columns iu along u, rows iv along v, central element
  (u0, v0) where the ray through the isocentre lands:
  flat:   ``p = s0 + sdd*d + (iu - u0)*du*u + (iv - v0)*dv*v``
  curved (cylinder around the focal spot, DICOM-CT-PD "CYLINDRICAL"):
          ``gamma = (iu - u0)*du/sdd``, ``p = s0 + sdd*(cos(gamma)*d + sin(gamma)*u) + (iv - v0)*dv*v``
  where s0 is the nominal focal spot; du is the element pitch at the detector (arc length for curved);
- projections are arrays (view, row, column) = (n_views, n_v, n_u) of line integrals (1/mm * mm);
- volumes are arrays (z, y, x) on a `VolumeGrid`.

Per-view vectors (`view_vectors`) are what the kernels take, so any trajectory (circular,
helical, flying focal spot) is the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

VIEW_VECTOR_LEN = 15  # floats per view, see `view_vectors`


@dataclass(frozen=True)
class Detector:
    n_u: int  # columns (transverse)
    n_v: int  # rows (axial); 1 for a fan beam
    du: float  # mm at the detector (arc length for curved)
    dv: float  # mm
    u0: float | None = None  # central column (fractional); None: the middle
    v0: float | None = None  # central row; None: the middle
    shape: Literal["flat", "curved"] = "flat"

    @property
    def centre(self) -> tuple[float, float]:
        u0 = (self.n_u - 1) / 2 if self.u0 is None else self.u0
        v0 = (self.n_v - 1) / 2 if self.v0 is None else self.v0
        return u0, v0


def _zeros(n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.float64)


@dataclass(frozen=True)
class ProjectionGeometry:
    detector: Detector
    sod: float  # focal spot to isocentre (rho0), mm
    sdd: float  # focal spot to detector, mm
    angles: np.ndarray  # (n_views,) radians, phi of the nominal focal spot
    source_z: np.ndarray = field(default=None)  # (n_views,) mm; zeros for a circular orbit
    ffs_dphi: np.ndarray = field(default=None)  # flying focal spot offsets per view: radians
    ffs_dz: np.ndarray = field(default=None)  # mm
    ffs_drho: np.ndarray = field(default=None)  # mm

    def __post_init__(self) -> None:
        n = len(self.angles)
        object.__setattr__(self, "angles", np.asarray(self.angles, dtype=np.float64))
        for name in ("source_z", "ffs_dphi", "ffs_dz", "ffs_drho"):
            value = getattr(self, name)
            arr = _zeros(n) if value is None else np.asarray(value, dtype=np.float64)
            if arr.shape != (n,):
                raise ValueError(f"{name} must have one value per view ({n}), got shape {arr.shape}")
            object.__setattr__(self, name, arr)
        if not (0 < self.sod < self.sdd):
            raise ValueError(f"need 0 < sod < sdd, got sod={self.sod}, sdd={self.sdd}")

    @property
    def n_views(self) -> int:
        return len(self.angles)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Projection array shape (views, rows, columns)."""
        return self.n_views, self.detector.n_v, self.detector.n_u

    @property
    def is_fan(self) -> bool:
        return self.detector.n_v == 1

    @classmethod
    def fan(cls, n_views: int, n_u: int, du: float, sod: float, sdd: float,
            shape: Literal["flat", "curved"] = "flat", span: float = 2 * np.pi, start: float = 0.0,
            u0: float | None = None) -> ProjectionGeometry:
        """A 2-D fan beam on a full (or ``span``) circle; one detector row of height 1 mm."""
        angles = start + np.arange(n_views) * span / n_views
        return cls(Detector(n_u, 1, du, 1.0, u0, 0.0, shape), sod, sdd, angles)

    @classmethod
    def cone(cls, n_views: int, n_u: int, n_v: int, du: float, dv: float, sod: float, sdd: float,
             shape: Literal["flat", "curved"] = "flat", span: float = 2 * np.pi, start: float = 0.0,
             pitch_mm_per_turn: float = 0.0) -> ProjectionGeometry:
        """A cone beam on a circular orbit (or helical with ``pitch_mm_per_turn`` of table feed)."""
        angles = start + np.arange(n_views) * span / n_views
        z = pitch_mm_per_turn * (angles - angles[0]) / (2 * np.pi)
        return cls(Detector(n_u, n_v, du, dv, None, None, shape), sod, sdd, angles, source_z=z)

    def subset(self, views: np.ndarray) -> ProjectionGeometry:
        """The same acquisition restricted to ``views`` (indices), e.g. one ordered subset."""
        idx = np.asarray(views)
        return ProjectionGeometry(self.detector, self.sod, self.sdd, self.angles[idx], self.source_z[idx],
                                  self.ffs_dphi[idx], self.ffs_dz[idx], self.ffs_drho[idx])

    def view_vectors(self) -> np.ndarray:
        """(n_views, 15) float32 per view: focal spot s (3), unit central direction d (3), unit
        detector axes u (3) and v (3), and the nominal focal spot s0 (3) the detector hangs from."""
        phi = self.angles
        d = np.stack([-np.cos(phi), -np.sin(phi), np.zeros_like(phi)], axis=1)
        u = np.stack([-np.sin(phi), np.cos(phi), np.zeros_like(phi)], axis=1)
        v = np.tile([0.0, 0.0, 1.0], (len(phi), 1))
        s0 = np.stack([self.sod * np.cos(phi), self.sod * np.sin(phi), self.source_z], axis=1)
        phi_f, rho_f = phi + self.ffs_dphi, self.sod + self.ffs_drho
        s = np.stack([rho_f * np.cos(phi_f), rho_f * np.sin(phi_f), self.source_z + self.ffs_dz], axis=1)
        return np.ascontiguousarray(np.concatenate([s, d, u, v, s0], axis=1), dtype=np.float32)

    def pixel_positions(self, view: int) -> np.ndarray:
        """(n_v, n_u, 3) mm: centres of the detector elements of one view (NumPy, for tests)."""
        vec = self.view_vectors()[view].astype(np.float64)
        d, u, v, s0 = vec[3:6], vec[6:9], vec[9:12], vec[12:15]
        u0, v0 = self.detector.centre
        iu = np.arange(self.detector.n_u) - u0
        iv = np.arange(self.detector.n_v) - v0
        if self.detector.shape == "flat":
            pu = iu[None, :, None] * self.detector.du * u
        else:
            gamma = iu * self.detector.du / self.sdd
            pu = self.sdd * (np.cos(gamma)[:, None] * d + np.sin(gamma)[:, None] * u)[None] - self.sdd * d
        return s0 + self.sdd * d + pu + iv[:, None, None] * self.detector.dv * v


@dataclass(frozen=True)
class VolumeGrid:
    """Reconstruction grid in the scanner frame: array (z, y, x), voxel centres
    ``origin + (i*dx, j*dy, k*dz)``; by default centred on the isocentre."""

    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    origin_xyz: tuple[float, float, float] | None = None

    @property
    def origin(self) -> np.ndarray:
        if self.origin_xyz is not None:
            return np.asarray(self.origin_xyz, dtype=np.float64)
        nz, ny, nx = self.shape_zyx
        dz, dy, dx = self.spacing_zyx
        return -np.array([(nx - 1) * dx, (ny - 1) * dy, (nz - 1) * dz]) / 2

    def kernel_params(self) -> np.ndarray:
        """float32 [ox, oy, oz, dx, dy, dz] as the kernels take them."""
        dz, dy, dx = self.spacing_zyx
        return np.array([*self.origin, dx, dy, dz], dtype=np.float32)
