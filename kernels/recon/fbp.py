"""Filtered backprojection: FBP for fan beams and FDK for cone beams, flat or curved detector.

    f(x) = sum_views  dbeta * W(x) * [ (w_pre * p) (*) ramp ](u(x), v(x))

Full-scan (2 pi) weighting: each ray is measured twice, hence the 1/2 in the taps (Kak & Slaney,
ch. 3.4: equispaced fan, eq. 3.115-3.118 for a flat detector, equiangular eq. 3.98-3.101 for a
curved one; Feldkamp-Davis-Kress for the cone with the extra axial cosine weight).
Returns attenuation in 1/mm on the operator's grid.
"""

from __future__ import annotations

import numpy as np

from kernels.filters import equiangular_taps, ramp_taps


def fbp(proj: np.ndarray, op, window: str = "hann") -> np.ndarray:
    """Reconstruct ``proj`` (views, rows, columns) of line integrals with operator ``op``
    (its ``geom``, ``weight``, ``filter_rows`` and ``backproject``). Full-circle scans."""
    geom = op.geom
    det = geom.detector
    n_views, n_v, n_u = geom.shape
    u0, v0 = det.centre
    sod, sdd = geom.sod, geom.sdd
    iu = (np.arange(n_u) - u0) * det.du  # mm on the detector (arc length if curved)
    iv = (np.arange(n_v) - v0) * det.dv
    span = 2 * np.pi
    dbeta = span / n_views
    if det.shape == "flat":
        pre = sdd / np.sqrt(sdd**2 + iu[None, :] ** 2 + iv[:, None] ** 2)
        ds = det.du * sod / sdd  # sampling at the isocentre (virtual detector)
        taps = 0.5 * ramp_taps(n_u, ds, window)
        view_weight = dbeta
    else:
        gamma = iu / sdd
        pre = np.cos(gamma)[None, :] * sdd / np.sqrt(sdd**2 + iv[:, None] ** 2)
        taps = 0.5 * equiangular_taps(n_u, det.du / sdd, window)
        view_weight = dbeta / sod  # the kernel weights sod^2 / L^2; the formula has sod / L^2
    weighted = op.weight(proj, pre.astype(np.float32), None)
    filtered = op.filter_rows(weighted, taps)
    return op.backproject(filtered, np.full(n_views, view_weight, dtype=np.float32))
