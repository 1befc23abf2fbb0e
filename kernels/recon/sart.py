"""OS-SART: simultaneous algebraic reconstruction over ordered subsets of views.

    for each subset s:   x <- max(0, x + lambda * C_s^-1 A_s^T ( R_s^-1 (y_s - A_s x) ))

with R_s = A_s 1 (ray lengths through the grid) and C_s = A_s^T 1 (Andersen & Kak 1984; Censor &
Elfving 2002 for the ordered-subsets form). Subsets interleave the views (0, M, 2M, ...).
Written against the operator interface: ``op.forward``, ``op.adjoint``, ``op.subset``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kernels.recon import arrays


def subsets(n_views: int, n_subsets: int) -> list[np.ndarray]:
    return [np.arange(s, n_views, n_subsets) for s in range(min(n_subsets, n_views))]


def os_sart(y: np.ndarray, op, n_iter: int = 10, n_subsets: int = 10, relaxation: float = 1.0,
            x0: np.ndarray | None = None, nonnegative: bool = True,
            on_iteration: Callable[[int, np.ndarray, float], None] | None = None) -> tuple[np.ndarray, list[float]]:
    """Reconstruct line integrals ``y`` (views, rows, columns; host array); returns (volume in
    the operator's array type, data misfit ||y - A x||^2 after each iteration)."""
    y = np.ascontiguousarray(y, dtype=np.float32)
    parts = []
    ones = op.asarray(np.ones(op.volume_shape, dtype=np.float32))
    for idx in subsets(op.geom.n_views, n_subsets):
        sub = op.subset(idx)
        row = sub.forward(ones)
        col = sub.adjoint(sub.asarray(np.ones(sub.projection_shape, dtype=np.float32)))
        parts.append((sub, sub.asarray(y[idx]), arrays.safe_inverse(row, 1e-6), arrays.safe_inverse(col, 1e-6)))
    y_all = op.asarray(y)
    x = op.asarray(np.zeros(op.volume_shape, dtype=np.float32) if x0 is None else x0)
    misfit = []
    for it in range(n_iter):
        for sub, y_s, r_inv, c_inv in parts:
            x += relaxation * c_inv * sub.adjoint(r_inv * (y_s - sub.forward(x)))
            if nonnegative:
                arrays.clamp_nonnegative(x)
        residual = y_all - op.forward(x)
        misfit.append(arrays.vdot(residual, residual))
        if on_iteration is not None:
            on_iteration(it, x, misfit[-1])
    return x, misfit
