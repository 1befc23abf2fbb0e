"""The host twin: the `.cu` kernels compiled for the CPU (kernels/build.py) and launched through
ctypes with the same grid/block shapes the GPU uses. This is the CPU backend and what CI runs.

`HostProjector` is the `Operator` of this backend: ``forward`` (A x), ``adjoint`` (A^T y) and the
FBP/FDK helpers, all on float32 numpy arrays.
"""

from __future__ import annotations

import ctypes
import threading
from functools import lru_cache

import numpy as np

from kernels.build import build_host
from kernels.geometry import ProjectionGeometry, VolumeGrid
from kernels.operator import Projector

_F = ctypes.POINTER(ctypes.c_float)
_U, _I, _R, _L = ctypes.c_uint, ctypes.c_int, ctypes.c_float, ctypes.c_long
_GRID = [_U] * 6

_SIGNATURES = {
    "joseph_forward": [_F, _F, _F, _F, _I, _I, _I, _I, _I, _I, _R, _R, _R, _R, _R, _I],
    "joseph_adjoint": [_F, _F, _F, _F, _I, _I, _I, _I, _I, _I, _R, _R, _R, _R, _R, _I],
    "backproject_fdk": [_F, _F, _F, _F, _F, _I, _I, _I, _I, _I, _I, _R, _R, _R, _R, _R, _R, _I],
    "filter_rows": [_F, _F, _F, _I, _I],
    "weight_projections": [_F, _F, _F, _I, _I, _I],
    "tv_gradient": [_F, _F, _I, _I, _I, _R],
    "tv_terms": [_F, _F, _I, _I, _I, _R],
    "hu_to_network": [_F, _F, _L, _R, _R, _R, _R],
    "network_to_hu": [_F, _F, _F, _L, _R, _R, _I],
    "hu_to_network_plugin": [_F, _F, _I, _F],
    "network_to_hu_plugin": [_F, _F, _F, _I, _I, _I, _I, _I, _F],
}
_lock = threading.Lock()


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """Build (if needed) and load the host twin; each kernel is ``host_<name>``."""
    with _lock:
        lib = ctypes.CDLL(str(build_host()))
    for name, params in _SIGNATURES.items():
        fn = getattr(lib, f"host_{name}")
        fn.argtypes = [*_GRID, *params]
        fn.restype = None
    return lib


def _ptr(a: np.ndarray | None):
    if a is None:
        return None
    if a.dtype != np.float32 or not a.flags.c_contiguous:
        raise TypeError("kernels take C-contiguous float32 arrays")
    return a.ctypes.data_as(_F)


def _blocks(n: int, b: int) -> int:
    return (n + b - 1) // b


def launch(name: str, grid: tuple[int, int, int], block: tuple[int, int, int], *args) -> None:
    conv = [_ptr(a) if isinstance(a, np.ndarray) or a is None else a for a in args]
    getattr(library(), f"host_{name}")(*grid, *block, *conv)


class HostProjector(Projector):
    """A (Joseph projector) and its exact adjoint on ``grid`` for ``geom``, on the CPU."""

    BLOCK_PROJ = (32, 4, 1)  # (detector column, row, view)
    BLOCK_VOL = (32, 4, 1)  # (x, y, z)

    def __init__(self, geom: ProjectionGeometry, grid: VolumeGrid) -> None:
        super().__init__(geom, grid)
        self.views = geom.view_vectors()
        self.grid_params = grid.kernel_params()
        self._det = self.detector_params

    # Arrays of this backend are numpy arrays: conversions are identities (the GPU backend copies).
    @staticmethod
    def asarray(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32)

    @staticmethod
    def to_host(a: np.ndarray) -> np.ndarray:
        return a

    def _proj_grid(self) -> tuple[int, int, int]:
        n_views, n_v, n_u = self.geom.shape
        b = self.BLOCK_PROJ
        return _blocks(n_u, b[0]), _blocks(n_v, b[1]), _blocks(n_views, b[2])

    def forward(self, volume: np.ndarray) -> np.ndarray:
        """A x: line integrals (views, rows, columns) of ``volume`` (z, y, x), 1/mm * mm."""
        volume = np.ascontiguousarray(volume, dtype=np.float32)
        if volume.shape != self.grid.shape_zyx:
            raise ValueError(f"volume shape {volume.shape} != grid {self.grid.shape_zyx}")
        proj = np.empty(self.geom.shape, dtype=np.float32)
        n_u, n_v, sdd, du, dv, u0, v0, curved = self._det
        launch("joseph_forward", self._proj_grid(), self.BLOCK_PROJ, volume, proj, self.views, self.grid_params,
               *self.volume_dims, self.geom.n_views, n_u, n_v, sdd, du, dv, u0, v0, curved)
        return proj

    def adjoint(self, proj: np.ndarray) -> np.ndarray:
        """A^T y: the exact transpose of `forward`."""
        proj = np.ascontiguousarray(proj, dtype=np.float32)
        if proj.shape != self.geom.shape:
            raise ValueError(f"projection shape {proj.shape} != geometry {self.geom.shape}")
        volume = np.zeros(self.grid.shape_zyx, dtype=np.float32)
        n_u, n_v, sdd, du, dv, u0, v0, curved = self._det
        launch("joseph_adjoint", self._proj_grid(), self.BLOCK_PROJ, proj, volume, self.views, self.grid_params,
               *self.volume_dims, self.geom.n_views, n_u, n_v, sdd, du, dv, u0, v0, curved)
        return volume

    def backproject(self, filtered: np.ndarray, view_weights: np.ndarray) -> np.ndarray:
        """Voxel-driven, distance-weighted backprojection of filtered projections (FBP/FDK)."""
        filtered = np.ascontiguousarray(filtered, dtype=np.float32)
        view_weights = np.ascontiguousarray(view_weights, dtype=np.float32)
        nx, ny, nz = self.volume_dims
        volume = np.empty(self.grid.shape_zyx, dtype=np.float32)
        b = self.BLOCK_VOL
        n_u, n_v, sdd, du, dv, u0, v0, curved = self._det
        launch("backproject_fdk", (_blocks(nx, b[0]), _blocks(ny, b[1]), _blocks(nz, b[2])), b, filtered, volume,
               self.views, self.grid_params, view_weights, nx, ny, nz, self.geom.n_views, n_u, n_v, sdd,
               float(self.geom.sod), du, dv, u0, v0, curved)
        return volume

    def filter_rows(self, proj: np.ndarray, taps: np.ndarray) -> np.ndarray:
        """Convolve every detector row with ``taps`` (2*n_u - 1 values, centre at n_u - 1)."""
        proj = np.ascontiguousarray(proj, dtype=np.float32)
        n_u = proj.shape[-1]
        rows = proj.size // n_u
        out = np.empty_like(proj)
        launch("filter_rows", (_blocks(n_u, 64), _blocks(rows, 4), 1), (64, 4, 1), proj, out,
               np.ascontiguousarray(taps, dtype=np.float32), rows, n_u)
        return out

    def tv_gradient(self, volume: np.ndarray, eps: float) -> np.ndarray:
        """Gradient of the smoothed isotropic TV of ``volume`` (kernels/src/tv.cu)."""
        return self._volume_kernel("tv_gradient", volume, eps)

    def tv(self, volume: np.ndarray, eps: float) -> float:
        """The smoothed isotropic TV of ``volume``."""
        return float(self._volume_kernel("tv_terms", volume, eps).sum(dtype=np.float64))

    def _volume_kernel(self, name: str, volume: np.ndarray, eps: float) -> np.ndarray:
        volume = np.ascontiguousarray(volume, dtype=np.float32)
        nz, ny, nx = volume.shape
        out = np.empty_like(volume)
        b = self.BLOCK_VOL
        launch(name, (_blocks(nx, b[0]), _blocks(ny, b[1]), _blocks(nz, b[2])), b, volume, out, nx, ny, nz,
               float(eps))
        return out

    def weight(self, proj: np.ndarray, w_vu: np.ndarray | None, w_ku: np.ndarray | None) -> np.ndarray:
        """proj * w_vu[v, u] * w_ku[k, u] (in place on a copy)."""
        out = np.array(proj, dtype=np.float32, order="C", copy=True)
        n_views, n_v, n_u = out.shape
        b = self.BLOCK_PROJ
        launch("weight_projections", (_blocks(n_u, b[0]), _blocks(n_v, b[1]), _blocks(n_views, b[2])), b, out,
               None if w_vu is None else np.ascontiguousarray(w_vu, np.float32),
               None if w_ku is None else np.ascontiguousarray(w_ku, np.float32), n_views, n_v, n_u)
        return out


def hu_to_network(hu: np.ndarray, center: float, scale: float, clip_min: float, clip_max: float) -> np.ndarray:
    """The denoiser's input normalisation (kernels/src/hu.cu) on the host twin."""
    hu = np.ascontiguousarray(hu, dtype=np.float32)
    out = np.empty_like(hu)
    launch("hu_to_network", (_blocks(hu.size, 256), 1, 1), (256, 1, 1), hu, out, hu.size, float(center),
           float(scale), float(clip_min), float(clip_max))
    return out


def network_to_hu(hu_in: np.ndarray, y: np.ndarray, center: float, scale: float, residual: bool) -> np.ndarray:
    """The denoiser's output mapping back to HU (kernels/src/hu.cu) on the host twin."""
    hu_in = np.ascontiguousarray(hu_in, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.float32)
    out = np.empty_like(hu_in)
    launch("network_to_hu", (_blocks(hu_in.size, 256), 1, 1), (256, 1, 1), hu_in, y, out, hu_in.size,
           float(center), float(scale), int(residual))
    return out


def hu_to_network_plugin(hu: np.ndarray, params: np.ndarray) -> np.ndarray:
    """The plugin-convention normalisation (kernels/src/hu.cu) on the host twin: ``hu`` (N, C, H, W) in HU,
    ``params`` float32 (center_hu, scale_hu, clip_min_hu, clip_max_hu); returns the network input."""
    hu = np.ascontiguousarray(hu, dtype=np.float32)
    out = np.empty_like(hu)
    launch("hu_to_network_plugin", (_blocks(hu.size, 256), 1, 1), (256, 1, 1), hu,
           np.ascontiguousarray(params, dtype=np.float32), hu.size, out)
    return out


def network_to_hu_plugin(hu: np.ndarray, y: np.ndarray, params: np.ndarray, centre: int, residual: bool) -> np.ndarray:
    """The plugin-convention output mapping (kernels/src/hu.cu) on the host twin: ``hu`` (N, C, H, W) the
    network's input in HU (channel ``centre`` is the output's slice), ``y`` (N, 1, H, W) the network output;
    returns (N, 1, H, W) HU."""
    hu = np.ascontiguousarray(hu, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.float32)
    n, c, h, w = hu.shape
    if y.shape != (n, 1, h, w) or not 0 <= centre < c:
        raise ValueError(f"y {y.shape} must be {(n, 1, h, w)} and centre {centre} a channel of {hu.shape}")
    out = np.empty_like(y)
    launch("network_to_hu_plugin", (_blocks(y.size, 256), 1, 1), (256, 1, 1), hu, y,
           np.ascontiguousarray(params, dtype=np.float32), y.size, h * w, c, int(centre), int(residual), out)
    return out
