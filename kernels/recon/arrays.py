"""The few array operations the algorithms need beyond arithmetic operators, for NumPy arrays
(host twin) and pycuda GPUArrays (GPU) alike, so each algorithm is written once and the GPU
path keeps volumes and projections on the device across iterations."""

from __future__ import annotations

import numpy as np


def on_device(a) -> bool:
    return type(a).__module__.startswith("pycuda")


def clamp_nonnegative(x):
    """x = max(x, 0), in place; returns x."""
    if on_device(x):
        from pycuda import gpuarray

        return gpuarray.maximum(x, np.float32(0), out=x)
    return np.maximum(x, 0, out=x)


def vdot(a, b) -> float:
    """sum(a * b), accumulated in float64."""
    if on_device(a):
        from pycuda import gpuarray

        return float(gpuarray.dot(a, b, dtype=np.float64).get())
    return float(np.dot(a.ravel().astype(np.float64), b.ravel().astype(np.float64)))


def copy(a):
    return a.copy()


def safe_inverse(a, floor: float):
    """1/a where a > floor, else 0 (rays missing the grid, voxels no ray reaches)."""
    if on_device(a):
        from pycuda import gpuarray

        safe = gpuarray.maximum(a, np.float32(floor))
        inverse = 1.0 / safe
        return gpuarray.if_positive(a - np.float32(floor), inverse, gpuarray.zeros_like(a))
    return np.where(a > floor, 1.0 / np.maximum(a, floor), 0.0).astype(np.float32)
