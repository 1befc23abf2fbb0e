"""Filtered backprojection: FBP for fan beams and FDK for cone beams, flat or curved detector.

    f(x) = sum_views  dbeta * W(x) * [ (w_pre * p) (*) ramp ](u(x), v(x))

Full scan (2 pi): each ray is measured twice, hence the 1/2 in the taps (Kak & Slaney,
ch. 3.4: equispaced fan, eq. 3.115-3.118 for a flat detector, equiangular eq. 3.98-3.101 for a
curved one; Feldkamp-Davis-Kress for the cone with the extra axial cosine weight).
Short scan (at least pi plus the fan angle): Parker's weights take the place of the 1/2.
Returns attenuation in 1/mm on the operator's grid.
"""

from __future__ import annotations

import numpy as np

from kernels.filters import equiangular_taps, parker_weights, ramp_taps


def fbp(proj: np.ndarray, op, window: str = "hann") -> np.ndarray:
    """Reconstruct ``proj`` (views, rows, columns) of line integrals with operator ``op``
    (its ``geom``, ``weight``, ``filter_rows`` and ``backproject``); full or short scans
    (views equally spaced, the span being n_views times the step)."""
    geom = op.geom
    det = geom.detector
    n_views, n_v, n_u = geom.shape
    u0, v0 = det.centre
    sod, sdd = geom.sod, geom.sdd
    iu = (np.arange(n_u) - u0) * det.du  # mm on the detector (arc length if curved)
    iv = (np.arange(n_v) - v0) * det.dv
    dbeta = float(np.median(np.diff(geom.angles))) if n_views > 1 else 2 * np.pi
    span = dbeta * n_views
    gamma = iu / sdd if det.shape == "curved" else np.arctan(iu / sdd)  # fan angle of each column
    short = span < 2 * np.pi * (1 - 1e-6)
    if short:
        fan_half = float(np.max(np.abs(gamma)))
        if span < np.pi + 2 * fan_half - 2 * dbeta:
            raise ValueError(f"a short scan needs pi + fan angle ({np.degrees(np.pi + 2 * fan_half):.1f} deg), "
                             f"this one spans {np.degrees(span):.1f} deg")
        # Our columns' fan angle is positive along u, the direction of rotation; Parker's is
        # positive against it (checked: the other sign loses 6 % of a disc's attenuation).
        redundancy = parker_weights(geom.angles, -gamma, fan_half)
        scale = 2.0  # Parker's weights replace the full scan's 1/2 in the taps
    else:
        redundancy, scale = None, 1.0
    if det.shape == "flat":
        pre = sdd / np.sqrt(sdd**2 + iu[None, :] ** 2 + iv[:, None] ** 2)
        ds = det.du * sod / sdd  # sampling at the isocentre (virtual detector)
        taps = 0.5 * ramp_taps(n_u, ds, window)
        view_weight = dbeta
    else:
        pre = np.cos(gamma)[None, :] * sdd / np.sqrt(sdd**2 + iv[:, None] ** 2)
        taps = 0.5 * equiangular_taps(n_u, det.du / sdd, window)
        view_weight = dbeta / sod  # the kernel weights sod^2 / L^2; the formula has sod / L^2
    weighted = op.weight(proj, pre.astype(np.float32), redundancy)
    filtered = op.filter_rows(weighted, (taps * scale).astype(np.float32))
    return op.backproject(filtered, np.full(n_views, view_weight, dtype=np.float32))
