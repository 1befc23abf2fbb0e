"""Test helpers: small series of any geometry, written with the project's own series writer."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np

from appliance.synth.series import SeriesSpec, write_ct_series
from appliance.volume import Geometry


def ramp_volume(shape_zyx: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Integer HU in [-1000, 2000] with structure along every axis (so any flip or shift shows)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape_zyx), indexing="ij")
    hu = -1000 + 7 * z + 3 * y + 2 * x + rng.integers(0, 50, size=shape_zyx)
    return np.clip(hu, -1000, 2000).astype(np.float32)


def rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(angle_deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def oblique_geometry(shape_zyx, spacing_zyx=(2.0, 0.7, 0.8), angle_deg=23.0, flip_slices=False, tilt_deg=0.0):
    """An oblique geometry: the axial frame rotated about a skew axis; optional gantry tilt."""
    r = rotation([1.0, 2.0, 0.5], angle_deg)
    row_dir, col_dir = r @ [1.0, 0, 0], r @ [0, 1.0, 0]
    normal = np.cross(row_dir, col_dir)
    slice_dir = -normal if flip_slices else normal
    if tilt_deg:
        # Gantry tilt: the slice direction leans toward the column direction.
        slice_dir = np.cos(np.radians(tilt_deg)) * slice_dir + np.sin(np.radians(tilt_deg)) * col_dir
    axes = np.stack([slice_dir, col_dir, row_dir])
    return Geometry(origin=np.array([-120.5, 33.25, 410.0]), axes=axes, spacing_zyx=tuple(spacing_zyx))


def write_series(out: Path, hu: np.ndarray, geometry: Geometry, **spec_kw) -> list[Path]:
    spec_kw.setdefault("seed_text", f"test/{out}")
    return write_ct_series(hu, out, geometry, SeriesSpec(**spec_kw))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
