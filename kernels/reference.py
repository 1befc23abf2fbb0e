"""NumPy reference projector (Joseph's method) and its exact adjoint: slow, obviously correct, for tests.

The CUDA kernels implement the same definition and are checked against these functions, so the
definition below is the contract, not an implementation detail:

- the ray of view k, detector element (iv, iu) runs from the focal spot s (``view_vectors()[k][0:3]``)
  to the element centre p (``geom.pixel_positions(k)[iv, iu]``); r = p - s, L = |r| (mm);
- continuous voxel-index coordinates (x, y, z order): idx(q) = (q - grid.origin) / (dx, dy, dz), so
  voxel [k, j, i] of the (z, y, x) array has its centre at (i, j, k); a = idx(s), b = idx(p) - a;
- dominant axis m = argmax |b| (ties: the first of x, y, z); for every integer t = 0 .. n_m - 1,
  lam = (t - a_m) / b_m, and the sample is kept only if 0 <= lam <= 1; the two other axes (in x, y, z
  order) sit at c1 = a_1 + lam*b_1, c2 = a_2 + lam*b_2;
- the sample is the bilinear interpolation of slice t at (c1, c2) over floor(c) and floor(c)+1 with
  weights 1-f and f, voxels outside the grid counting as zero;
- each sample is weighted by delta = L / |b_m| (mm of ray per unit index step along m); the line
  integral is sum(delta * sample).  ``back_project`` scatters with the same weights (the transpose).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from kernels.geometry import ProjectionGeometry, VolumeGrid

_XYZ = (0, 1, 2)


def ray_endpoints(geom: ProjectionGeometry, view: int) -> tuple[np.ndarray, np.ndarray]:
    """Focal spot (3,) and detector element centres (n_v, n_u, 3) of one view, mm, scanner frame."""
    source = geom.view_vectors()[view, 0:3].astype(np.float64)
    return source, geom.pixel_positions(view).astype(np.float64)


def _grid_index_frame(grid: VolumeGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin mm, spacing mm, size) each in x, y, z order."""
    nz, ny, nx = (int(n) for n in grid.shape_zyx)
    dz, dy, dx = (float(d) for d in grid.spacing_zyx)
    return grid.origin.astype(np.float64), np.array([dx, dy, dz]), np.array([nx, ny, nz])


def _view_matrix_entries(grid: VolumeGrid, geom: ProjectionGeometry,
                         view: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-zero pattern of the system-matrix block of one view: (ray, voxel, weight mm) triplets.

    ray = iv * n_u + iu, voxel = flat index into the C-ordered (z, y, x) volume.  Forward and back
    projection both read these triplets, which is what makes one the exact transpose of the other.
    """
    rays, voxels, weights = [], [], []
    for chunk in _iter_entries(grid, geom, view):
        rays.append(chunk[0])
        voxels.append(chunk[1])
        weights.append(chunk[2])
    if not rays:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    return np.concatenate(rays), np.concatenate(voxels), np.concatenate(weights)


def _iter_entries(grid: VolumeGrid, geom: ProjectionGeometry,
                  view: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    source, pixels = ray_endpoints(geom, view)
    pixels = pixels.reshape(-1, 3)
    length = np.linalg.norm(pixels - source, axis=1)
    origin, spacing, size = _grid_index_frame(grid)
    a = (source - origin) / spacing
    b = (pixels - origin) / spacing - a
    dominant = np.argmax(np.abs(b), axis=1)  # argmax returns the first maximum: x before y before z
    strides = np.array([1, size[0], size[0] * size[1]])  # flat index = x + nx*y + nx*ny*z
    for m in _XYZ:
        ray_ids = np.flatnonzero(dominant == m)
        if ray_ids.size == 0:
            continue
        ax1, ax2 = (ax for ax in _XYZ if ax != m)
        b_m = b[ray_ids, m]
        delta = length[ray_ids] / np.abs(b_m)
        for t in range(size[m]):
            lam = (t - a[m]) / b_m
            keep = (lam >= 0.0) & (lam <= 1.0)
            if not keep.any():
                continue
            r, lam_k, delta_k = ray_ids[keep], lam[keep], delta[keep]
            c1 = a[ax1] + lam_k * b[r, ax1]
            c2 = a[ax2] + lam_k * b[r, ax2]
            i1, i2 = np.floor(c1), np.floor(c2)
            f1, f2 = c1 - i1, c2 - i2
            i1, i2 = i1.astype(np.int64), i2.astype(np.int64)
            for j1, w1 in ((i1, 1.0 - f1), (i1 + 1, f1)):
                in1 = (j1 >= 0) & (j1 < size[ax1])
                for j2, w2 in ((i2, 1.0 - f2), (i2 + 1, f2)):
                    inside = in1 & (j2 >= 0) & (j2 < size[ax2])
                    if not inside.any():
                        continue
                    voxel = t * strides[m] + j1[inside] * strides[ax1] + j2[inside] * strides[ax2]
                    yield r[inside], voxel, (delta_k * w1 * w2)[inside]


def _check_shape(name: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
    if tuple(array.shape) != tuple(int(n) for n in expected):
        raise ValueError(f"{name} has shape {array.shape}, the geometry expects {tuple(expected)}")


def forward_project(volume: np.ndarray, grid: VolumeGrid, geom: ProjectionGeometry) -> np.ndarray:
    """Line integrals (views, rows, cols) float64 of ``volume`` (z, y, x), in 1/mm, by Joseph's method.

    Units: volume values in 1/mm (linear attenuation), results dimensionless (1/mm * mm).
    """
    volume = np.asarray(volume, dtype=np.float64)
    _check_shape("volume", volume, grid.shape_zyx)
    flat = volume.ravel()
    n_views, n_v, n_u = geom.shape
    proj = np.zeros((n_views, n_v * n_u))
    for k in range(n_views):
        ray, voxel, weight = _view_matrix_entries(grid, geom, k)
        proj[k] = np.bincount(ray, weights=weight * flat[voxel], minlength=n_v * n_u)
    return proj.reshape(n_views, n_v, n_u)


def back_project(proj: np.ndarray, grid: VolumeGrid, geom: ProjectionGeometry) -> np.ndarray:
    """The exact adjoint of `forward_project`: (views, rows, cols) -> volume (z, y, x) float64.

    Each projection value is scattered with the forward weights (mm), so
    <forward_project(x), y> == <x, back_project(y)> to rounding.
    """
    proj = np.asarray(proj, dtype=np.float64)
    _check_shape("proj", proj, geom.shape)
    n_views, n_v, n_u = geom.shape
    n_voxels = int(np.prod(grid.shape_zyx))
    volume = np.zeros(n_voxels)
    for k in range(n_views):
        ray, voxel, weight = _view_matrix_entries(grid, geom, k)
        volume += np.bincount(voxel, weights=weight * proj[k].ravel()[ray], minlength=n_voxels)
    return volume.reshape(tuple(int(n) for n in grid.shape_zyx))
