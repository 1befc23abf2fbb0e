"""PWLS-TV: penalised weighted least squares with a total-variation penalty,

    minimise  1/2 sum_i w_i ([A x]_i - y_i)^2  +  beta * TV_eps(x)    subject to x >= 0,

with statistical weights w_i proportional to the detected photon counts (the inverse variance of
a log-transformed measurement). Solved by ordered-subsets separable quadratic surrogates with
Nesterov momentum (Kim, Ramani & Fessler, IEEE TMI 2015) and adaptive restart when the cost
rises (O'Donoghue & Candes 2015):

    D   = A^T (w * A 1) + beta * 4 * n_dims / eps           (diagonal majoriser)
    g   = M * A_s^T (w_s * (A_s z - y_s)) + beta * grad TV(z)
    x+  = max(0, z - g / D);   z = x+ + (t_k - 1) / t_k+1 * (x+ - x)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kernels.recon import arrays
from kernels.recon.sart import subsets


def pwls_tv(y: np.ndarray, weights: np.ndarray, op, beta: float, eps: float, n_iter: int = 20,
            n_subsets: int = 4, x0: np.ndarray | None = None,
            on_iteration: Callable[[int, np.ndarray, float], None] | None = None) -> tuple[np.ndarray, list[float]]:
    """``y`` line integrals, ``weights`` w_i (same shape, e.g. counts / I0), ``beta`` the TV
    strength in (weight * (1/mm)^2) per (1/mm), ``eps`` the TV smoothing in 1/mm. Returns
    (volume in 1/mm, cost after each iteration)."""
    y = np.ascontiguousarray(y, dtype=np.float32)
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    n_dims = sum(n > 1 for n in op.volume_shape)
    w_all, y_all = op.asarray(weights), op.asarray(y)
    d = op.adjoint(w_all * op.forward(op.asarray(np.ones(op.volume_shape, dtype=np.float32))))
    d_inv = arrays.safe_inverse(d + np.float32(beta * 4 * n_dims / eps), 1e-12)
    parts = []
    for idx in subsets(op.geom.n_views, n_subsets):
        sub = op.subset(idx)  # once per subset: on the GPU it uploads the subset's view vectors
        parts.append((sub, sub.asarray(y[idx]), sub.asarray(weights[idx])))
    m = len(parts)

    def cost(x) -> float:
        r = op.forward(x) - y_all
        return 0.5 * arrays.vdot(w_all * r, r) + beta * op.tv(x, eps)

    x = op.asarray(np.zeros(op.volume_shape, dtype=np.float32) if x0 is None else x0)
    arrays.clamp_nonnegative(x)
    z, t = arrays.copy(x), 1.0
    history = [cost(x)]
    for it in range(n_iter):
        x_prev = x
        for sub, y_s, w_s in parts:
            grad = m * sub.adjoint(w_s * (sub.forward(z) - y_s)) + beta * op.tv_gradient(z, eps)
            x_new = arrays.clamp_nonnegative(z - d_inv * grad)
            t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
            z = x_new + np.float32((t - 1) / t_next) * (x_new - x)
            x, t = x_new, t_next
        history.append(cost(x))
        if history[-1] > history[-2]:  # adaptive restart: momentum overshot
            z, t = arrays.copy(x_prev), 1.0
            x = x_prev
            history[-1] = history[-2]
        if on_iteration is not None:
            on_iteration(it, x, history[-1])
    return x, history[1:]
