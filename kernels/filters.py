"""Ramp filters for FBP/FDK: spatial taps for the `filter_rows` kernel, with the usual windows."""

from __future__ import annotations

import numpy as np

WINDOWS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")


def ramp_taps(n: int, spacing: float, window: str = "ram-lak") -> np.ndarray:
    """2n-1 taps (centre at n-1) of the band-limited ramp filter for samples ``spacing`` apart,
    already multiplied by the integration step: ``sum_j p[j] * taps[i - j + n - 1]`` approximates
    the ramp-filtered projection. Windows apodise the ramp in frequency (cut-off at Nyquist)."""
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; choose one of {WINDOWS}")
    k = np.arange(-(n - 1), n)
    h = np.zeros(2 * n - 1)
    h[k == 0] = 1.0 / (4 * spacing**2)  # Ram-Lak in space (Kak & Slaney 3.61)
    odd = k % 2 == 1
    h[odd] = -1.0 / (np.pi * k[odd] * spacing) ** 2
    if window != "ram-lak":
        size = int(2 ** np.ceil(np.log2(4 * n)))
        padded = np.zeros(size)
        padded[: n] = h[n - 1 :]
        padded[-(n - 1) :] = h[: n - 1] if n > 1 else []
        f = np.fft.fftfreq(size) * 2  # 1.0 at Nyquist
        w = {
            "shepp-logan": np.sinc(f / 2),
            "cosine": np.cos(np.pi * f / 2),
            "hamming": 0.54 + 0.46 * np.cos(np.pi * f),
            "hann": 0.5 + 0.5 * np.cos(np.pi * f),
        }[window]
        filtered = np.real(np.fft.ifft(np.fft.fft(padded) * w))
        h = np.concatenate([filtered[-(n - 1) :] if n > 1 else [], filtered[:n]])
    return (h * spacing).astype(np.float32)


def equiangular_taps(n: int, dgamma: float, window: str = "ram-lak") -> np.ndarray:
    """Taps for an equiangular (curved) detector: the ramp in angle units times (g/sin g)^2."""
    taps = ramp_taps(n, dgamma, window).astype(np.float64)
    g = np.arange(-(n - 1), n) * dgamma
    with np.errstate(invalid="ignore", divide="ignore"):
        factor = np.where(g == 0, 1.0, (g / np.sin(g)) ** 2)
    return (taps * factor).astype(np.float32)


def parker_weights(angles: np.ndarray, gamma: np.ndarray, fan_half_angle: float) -> np.ndarray:
    """Short-scan redundancy weights (Parker 1982) for views at ``angles`` (radians, from the
    first) and detector columns at fan angles ``gamma`` (radians, Parker's convention: positive
    against the direction of rotation):
    (n_views, n_columns), each pair of conjugate rays sums to 1. Needs a scan of at least
    pi + 2 * fan_half_angle."""
    beta = (angles - angles[0])[:, None]
    g = gamma[None, :]
    d = fan_half_angle
    w = np.ones((len(angles), len(gamma)))
    with np.errstate(divide="ignore", invalid="ignore"):
        rise = beta < 2 * (d - g)
        w = np.where(rise, np.sin(np.pi / 4 * beta / (d - g)) ** 2, w)
        fall = beta > np.pi - 2 * g
        w = np.where(fall, np.sin(np.pi / 4 * (np.pi + 2 * d - beta) / (d + g)) ** 2, w)
    w = np.where(beta > np.pi + 2 * d, 0.0, w)
    return np.nan_to_num(w, nan=0.0).astype(np.float32)
