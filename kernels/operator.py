"""What every projector backend shares: the `Operator` of DESIGN.md (``forward`` A x, ``adjoint``
A^T y, plus the FBP/FDK helpers) is implemented by `kernels.host.HostProjector` (host twin) and
`kernels.gpu.GpuProjector` (pycuda) on top of this base."""

from __future__ import annotations

import numpy as np

from kernels.geometry import ProjectionGeometry, VolumeGrid


class Projector:
    def __init__(self, geom: ProjectionGeometry, grid: VolumeGrid) -> None:
        self.geom = geom
        self.grid = grid
        det = geom.detector
        u0, v0 = det.centre
        # (n_u, n_v, sdd, du, dv, u0, v0, curved) in the order the kernels take them
        self.detector_params = (det.n_u, det.n_v, float(geom.sdd), float(det.du), float(det.dv), float(u0),
                                float(v0), int(det.shape == "curved"))

    def subset(self, views: np.ndarray):
        """The operator of the views ``views`` only (ordered subsets), same backend."""
        return type(self)(self.geom.subset(views), self.grid)

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        return self.grid.shape_zyx

    @property
    def projection_shape(self) -> tuple[int, int, int]:
        return self.geom.shape

    @property
    def volume_dims(self) -> tuple[int, int, int]:
        """(nx, ny, nz) as the kernels take them."""
        nz, ny, nx = self.grid.shape_zyx
        return nx, ny, nz
