"""The GPU backend: the same kernels, from the nvcc fatbins (kernels/build.py), launched with
pycuda on device arrays (``pycuda.gpuarray.GPUArray``), so an algorithm's volumes and projections
stay on the device across iterations.

Imported only on a GPU code path: without a driver ``import pycuda.driver`` fails
(../shared/TRAPS.md). Uses the primary context (``pycuda.autoprimaryctx``), which TensorRT shares.
`GpuProjector` has the interface of `kernels.host.HostProjector`.

Status: written for the first session with a GPU; the ``gpu``-marked tests compare it with the
host twin (relative error <= 1e-4).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from kernels.build import build_all_fatbins
from kernels.geometry import ProjectionGeometry, VolumeGrid
from kernels.operator import Projector

_KERNELS = {  # kernel -> source file stem
    "joseph_forward": "projector",
    "joseph_adjoint": "projector",
    "backproject_fdk": "projector",
    "filter_rows": "filter",
    "weight_projections": "filter",
    "tv_gradient": "tv",
    "tv_terms": "tv",
    "hu_to_network": "hu",
    "network_to_hu": "hu",
}


def available() -> bool:
    """True when pycuda imports and a CUDA device is present."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:
        return False


@lru_cache(maxsize=1)
def _functions() -> dict:
    import pycuda.autoprimaryctx  # noqa: F401  (the primary context, shared with TensorRT)
    import pycuda.driver as cuda

    modules = {stem: cuda.module_from_file(str(path)) for stem, path in build_all_fatbins().items()}
    return {name: modules[stem].get_function(name) for name, stem in _KERNELS.items()}


def _blocks(n: int, b: int) -> int:
    return (n + b - 1) // b


class GpuProjector(Projector):
    BLOCK_PROJ = (32, 4, 1)
    BLOCK_VOL = (32, 4, 1)

    def __init__(self, geom: ProjectionGeometry, grid: VolumeGrid) -> None:
        from pycuda import gpuarray

        super().__init__(geom, grid)
        self._ga = gpuarray
        self.fn = _functions()
        self.views = gpuarray.to_gpu(geom.view_vectors())
        self.grid_params = gpuarray.to_gpu(grid.kernel_params())
        # pycuda needs sized numpy scalars for kernel arguments
        types = (np.int32, np.int32, np.float32, np.float32, np.float32, np.float32, np.float32, np.int32)
        self._det = tuple(t(v) for t, v in zip(types, self.detector_params))

    # ---- arrays ----------------------------------------------------------------------------
    def asarray(self, a):
        """A device copy of a host array (device arrays are returned as they are)."""
        if isinstance(a, self._ga.GPUArray):
            return a
        return self._ga.to_gpu(np.ascontiguousarray(a, dtype=np.float32))

    @staticmethod
    def to_host(a) -> np.ndarray:
        return a.get() if hasattr(a, "get") else np.asarray(a)

    def _vol(self) -> tuple:
        return tuple(np.int32(n) for n in self.volume_dims)

    def _proj_launch(self) -> dict:
        n_views, n_v, n_u = self.geom.shape
        b = self.BLOCK_PROJ
        return {"block": b, "grid": (_blocks(n_u, b[0]), _blocks(n_v, b[1]), _blocks(n_views, b[2]))}

    def _vol_launch(self, shape_zyx) -> dict:
        nz, ny, nx = shape_zyx
        b = self.BLOCK_VOL
        return {"block": b, "grid": (_blocks(nx, b[0]), _blocks(ny, b[1]), _blocks(nz, b[2]))}

    # ---- operators -------------------------------------------------------------------------
    def forward(self, volume):
        volume = self.asarray(volume)
        proj = self._ga.empty(self.geom.shape, np.float32)
        n_u, n_v, sdd, du, dv, u0, v0, curved = self._det
        self.fn["joseph_forward"](volume.gpudata, proj.gpudata, self.views.gpudata, self.grid_params.gpudata,
                                  *self._vol(), np.int32(self.geom.n_views), n_u, n_v, sdd, du, dv, u0, v0, curved,
                                  **self._proj_launch())
        return proj

    def adjoint(self, proj):
        proj = self.asarray(proj)
        volume = self._ga.zeros(self.grid.shape_zyx, np.float32)
        n_u, n_v, sdd, du, dv, u0, v0, curved = self._det
        self.fn["joseph_adjoint"](proj.gpudata, volume.gpudata, self.views.gpudata, self.grid_params.gpudata,
                                  *self._vol(), np.int32(self.geom.n_views), n_u, n_v, sdd, du, dv, u0, v0, curved,
                                  **self._proj_launch())
        return volume

    def backproject(self, filtered, view_weights):
        filtered, weights = self.asarray(filtered), self.asarray(view_weights)
        volume = self._ga.empty(self.grid.shape_zyx, np.float32)
        n_u, n_v, sdd, du, dv, u0, v0, curved = self._det
        self.fn["backproject_fdk"](filtered.gpudata, volume.gpudata, self.views.gpudata, self.grid_params.gpudata,
                                   weights.gpudata, *self._vol(), np.int32(self.geom.n_views), n_u, n_v, sdd,
                                   np.float32(self.geom.sod), du, dv, u0, v0, curved,
                                   **self._vol_launch(self.grid.shape_zyx))
        return volume

    def filter_rows(self, proj, taps):
        proj, taps = self.asarray(proj), self.asarray(taps)
        n_u = proj.shape[-1]
        rows = proj.size // n_u
        out = self._ga.empty_like(proj)
        self.fn["filter_rows"](proj.gpudata, out.gpudata, taps.gpudata, np.int32(rows), np.int32(n_u),
                               block=(64, 4, 1), grid=(_blocks(n_u, 64), _blocks(rows, 4), 1))
        return out

    def weight(self, proj, w_vu, w_ku):
        out = self.asarray(proj).copy()
        n_views, n_v, n_u = out.shape
        vu = self.asarray(w_vu).gpudata if w_vu is not None else np.intp(0)
        ku = self.asarray(w_ku).gpudata if w_ku is not None else np.intp(0)
        self.fn["weight_projections"](out.gpudata, vu, ku, np.int32(n_views), np.int32(n_v), np.int32(n_u),
                                      **self._proj_launch())
        return out

    def tv_gradient(self, volume, eps: float):
        return self._volume_kernel("tv_gradient", volume, eps)

    def tv(self, volume, eps: float) -> float:
        terms = self._volume_kernel("tv_terms", volume, eps)
        return float(self._ga.sum(terms, dtype=np.float64).get())

    def _volume_kernel(self, name: str, volume, eps: float):
        volume = self.asarray(volume)
        out = self._ga.empty_like(volume)
        nz, ny, nx = volume.shape
        self.fn[name](volume.gpudata, out.gpudata, np.int32(nx), np.int32(ny), np.int32(nz), np.float32(eps),
                      **self._vol_launch(volume.shape))
        return out
