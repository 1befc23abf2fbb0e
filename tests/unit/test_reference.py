"""Unit tests for the NumPy reference projector (kernels.reference): Joseph's method and its adjoint."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.geometry import Detector, ProjectionGeometry, VolumeGrid
from kernels.reference import back_project, forward_project, ray_endpoints

MU = 0.02  # 1/mm, about water


def _ball_volume(grid: VolumeGrid, centre_xyz, radius_mm: float, mu: float, sub: int = 4) -> np.ndarray:
    """mu times the fraction of each voxel inside the ball (sub^3 point samples; sub^2 in-plane for nz=1,
    where the slice is the plane z=0 and the ball is a disc)."""
    nz, ny, nx = grid.shape_zyx
    dz, dy, dx = grid.spacing_zyx
    o = grid.origin
    off = (np.arange(sub) + 0.5) / sub - 0.5
    z_off = off * dz if nz > 1 else np.zeros(1)
    zs, ys, xs = (o[2] + np.arange(nz) * dz - centre_xyz[2], o[1] + np.arange(ny) * dy - centre_xyz[1],
                  o[0] + np.arange(nx) * dx - centre_xyz[0])
    inside = np.zeros(grid.shape_zyx)
    for oz in z_off:
        for oy in off * dy:
            for ox in off * dx:
                inside += (((zs + oz) ** 2)[:, None, None] + ((ys + oy) ** 2)[None, :, None]
                           + ((xs + ox) ** 2)[None, None, :]) <= radius_mm ** 2
    return mu * inside / (len(z_off) * sub * sub)


def _ray_distance_to(geom: ProjectionGeometry, point_xyz) -> np.ndarray:
    """(views, rows, cols) distance mm from ``point_xyz`` to every ray's line."""
    out = np.empty(geom.shape)
    for k in range(geom.n_views):
        s, p = ray_endpoints(geom, k)
        e = (p - s) / np.linalg.norm(p - s, axis=-1, keepdims=True)
        w = np.asarray(point_xyz, dtype=np.float64) - s
        out[k] = np.sqrt(np.maximum((w ** 2).sum() - (e @ w) ** 2, 0.0))
    return out


@pytest.mark.parametrize("geom, grid, centre, radius", [
    (ProjectionGeometry.fan(12, 101, 1.5, 200.0, 400.0, shape="flat", start=0.1),
     VolumeGrid((1, 64, 64), (1.0, 1.0, 1.0)), (3.0, -2.0, 0.0), 25.0),
    (ProjectionGeometry.fan(12, 101, 1.5, 200.0, 400.0, shape="curved", start=0.1),
     VolumeGrid((1, 64, 64), (1.0, 1.0, 1.0)), (3.0, -2.0, 0.0), 25.0),
    (ProjectionGeometry.cone(6, 48, 48, 1.5, 1.5, 200.0, 400.0, shape="flat", start=0.3),
     VolumeGrid((32, 40, 40), (0.9, 0.75, 0.75)), (1.0, -1.5, 0.5), 12.0),
    (ProjectionGeometry.cone(6, 48, 48, 1.5, 1.5, 200.0, 400.0, shape="curved", start=0.3),
     VolumeGrid((32, 40, 40), (0.9, 0.75, 0.75)), (1.0, -1.5, 0.5), 12.0),
], ids=["fan-flat", "fan-curved", "cone-flat", "cone-curved"])
def test_line_integrals_of_uniform_ball_match_analytic_chords(geom, grid, centre, radius):
    proj = forward_project(_ball_volume(grid, centre, radius, MU), grid, geom)
    dist = _ray_distance_to(geom, centre)
    analytic = MU * 2 * np.sqrt(np.maximum(radius ** 2 - dist ** 2, 0.0))
    interior = dist < radius - 2.0  # 2 mm (>= 2 voxels in-plane) away from the rim: partial volume there
    assert interior.sum() > 50
    # within 2 % of the central line integral (mu * diameter) for every interior ray
    assert np.abs(proj - analytic)[interior].max() < 0.02 * MU * 2 * radius
    # rays passing 3 mm outside the ball see nothing of it
    assert np.all(proj[dist > radius + 3.0] == 0.0)


def _random_adjoint_mismatch(geom: ProjectionGeometry, grid: VolumeGrid, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(grid.shape_zyx)
    y = rng.standard_normal(geom.shape)
    ax_y = float(np.vdot(forward_project(x, grid, geom), y))
    x_aty = float(np.vdot(x, back_project(y, grid, geom)))
    return abs(ax_y - x_aty) / abs(ax_y)


_ANISO_FAN_GRID = VolumeGrid((1, 20, 24), (1.0, 1.3, 0.9), origin_xyz=(-8.0, -14.0, 0.0))
_ANISO_CONE_GRID = VolumeGrid((8, 14, 16), (2.0, 1.7, 1.2), origin_xyz=(-7.0, -12.0, -5.0))


@pytest.mark.parametrize("geom, grid", [
    (ProjectionGeometry.fan(9, 41, 1.2, 150.0, 300.0, shape="flat", start=0.2), _ANISO_FAN_GRID),
    (ProjectionGeometry.fan(9, 41, 1.2, 150.0, 300.0, shape="curved", start=0.2, u0=19.3), _ANISO_FAN_GRID),
    (ProjectionGeometry.cone(7, 24, 12, 1.6, 2.0, 150.0, 300.0, shape="flat", start=0.4,
                             pitch_mm_per_turn=10.0), _ANISO_CONE_GRID),
    (ProjectionGeometry.cone(7, 24, 12, 1.6, 2.0, 150.0, 300.0, shape="curved", start=0.4), _ANISO_CONE_GRID),
], ids=["fan-flat", "fan-curved", "helix-flat", "cone-curved"])
def test_back_project_is_the_exact_adjoint_of_forward_project(geom, grid):
    assert _random_adjoint_mismatch(geom, grid) < 1e-10


def test_adjoint_holds_with_flying_focal_spot_and_steep_cone():
    """Rays with z as the dominant index axis (steep cone on a fine-z grid) and per-view focal-spot offsets."""
    n = 5
    geom = ProjectionGeometry(Detector(10, 16, 3.0, 6.0, shape="curved"), 60.0, 120.0,
                              np.linspace(0, 2 * np.pi, n, endpoint=False), source_z=np.linspace(-3, 3, n),
                              ffs_dphi=np.array([0.01, -0.01] * 2 + [0.01]), ffs_dz=np.array([0.5, -0.5] * 2 + [0.5]),
                              ffs_drho=np.array([1.0, -1.0] * 2 + [1.0]))
    grid = VolumeGrid((16, 8, 8), (0.5, 3.0, 3.0))
    s, p = ray_endpoints(geom, 0)
    b = (p - s) / np.array([3.0, 3.0, 0.5])
    assert np.any(np.argmax(np.abs(b), axis=-1) == 2)  # the test really covers z-dominant rays
    assert _random_adjoint_mismatch(geom, grid, seed=3) < 1e-10


def test_ray_missing_the_grid_gives_exactly_zero():
    geom = ProjectionGeometry.fan(4, 81, 2.0, 200.0, 400.0)  # fan 80 mm wide at the isocentre
    grid = VolumeGrid((1, 16, 16), (1.0, 1.0, 1.0))  # 16 mm: the outer columns miss it
    proj = forward_project(np.ones(grid.shape_zyx), grid, geom)
    assert np.all(proj[:, :, :10] == 0.0) and np.all(proj[:, :, -10:] == 0.0)
    assert np.all(proj[:, :, 40] > 0.0)
    off_grid = VolumeGrid((1, 16, 16), (1.0, 1.0, 1.0), origin_xyz=(500.0, 500.0, 0.0))
    assert np.all(forward_project(np.ones(off_grid.shape_zyx), off_grid, geom) == 0.0)


@pytest.mark.parametrize("phi, chord_voxels", [(0.0, 1.0), (np.pi / 2, 1.0), (np.pi / 4, np.sqrt(2.0))])
def test_constant_volume_through_centre_gives_mu_times_chord(phi, chord_voxels):
    """A central ray along an axis crosses n voxels of width 1 mm (chord n mm, voxel edge to edge); along the
    diagonal it samples every voxel centre of the diagonal, chord n*sqrt(2) mm."""
    n = 32
    geom = ProjectionGeometry.fan(1, 5, 1.0, 200.0, 400.0, start=phi)
    grid = VolumeGrid((1, n, n), (1.0, 1.0, 1.0))
    proj = forward_project(np.full(grid.shape_zyx, MU), grid, geom)
    central = proj[0, 0, 2]
    assert central == pytest.approx(MU * n * chord_voxels, rel=1e-6)


def test_constant_cone_volume_gives_mu_times_anisotropic_chord():
    geom = ProjectionGeometry.cone(1, 5, 5, 1.0, 1.0, 200.0, 400.0, start=np.pi / 2)  # central ray along -y
    grid = VolumeGrid((6, 10, 8), (2.0, 1.5, 1.0))
    proj = forward_project(np.full(grid.shape_zyx, MU), grid, geom)
    assert proj[0, 2, 2] == pytest.approx(MU * 10 * 1.5, rel=1e-6)


def test_central_ray_at_phi_zero_runs_along_minus_x():
    geom = ProjectionGeometry.cone(1, 9, 5, 1.0, 1.0, 300.0, 500.0, shape="curved")
    source, pixels = ray_endpoints(geom, 0)
    u0, v0 = geom.detector.centre
    centre = pixels[int(v0), int(u0)]
    np.testing.assert_allclose(source, [300.0, 0.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(centre, [-200.0, 0.0, 0.0], atol=1e-4)
    direction = (centre - source) / np.linalg.norm(centre - source)
    np.testing.assert_allclose(direction, [-1.0, 0.0, 0.0], atol=1e-7)


def test_object_at_plus_y_lands_on_higher_columns_at_phi_zero():
    """The transverse detector axis u is +y at phi = 0, and rows follow +z."""
    geom = ProjectionGeometry.cone(1, 41, 21, 1.0, 1.0, 200.0, 400.0)
    grid = VolumeGrid((9, 21, 21), (1.0, 1.0, 1.0))
    vol = np.zeros(grid.shape_zyx)
    vol[4 + 3, 10 + 5, 10] = 1.0  # voxel at (x, y, z) = (0, +5, +3) mm
    proj = forward_project(vol, grid, geom)[0]
    row, col = np.unravel_index(np.argmax(proj), proj.shape)
    u0, v0 = geom.detector.centre
    assert col == pytest.approx(u0 + 10, abs=1)  # magnification 2: +5 mm -> +10 columns of 1 mm
    assert row == pytest.approx(v0 + 6, abs=1)


def test_forward_project_rejects_a_volume_of_the_wrong_shape():
    geom = ProjectionGeometry.fan(2, 9, 1.0, 100.0, 200.0)
    with pytest.raises(ValueError, match="volume has shape"):
        forward_project(np.zeros((1, 8, 9)), VolumeGrid((1, 8, 8), (1.0, 1.0, 1.0)), geom)
    with pytest.raises(ValueError, match="proj has shape"):
        back_project(np.zeros((2, 1, 8)), VolumeGrid((1, 8, 8), (1.0, 1.0, 1.0)), geom)


def _joseph_one_ray(volume: np.ndarray, grid: VolumeGrid, s: np.ndarray, p: np.ndarray) -> float:
    """The definition in kernels.reference, one ray, one sample at a time (no vectorisation)."""
    nz, ny, nx = grid.shape_zyx
    dz, dy, dx = grid.spacing_zyx
    size, spacing = (nx, ny, nz), np.array([dx, dy, dz])
    a = (s - grid.origin) / spacing
    b = (p - grid.origin) / spacing - a
    m = int(np.argmax(np.abs(b)))
    ax1, ax2 = [ax for ax in range(3) if ax != m]
    delta = np.linalg.norm(p - s) / abs(b[m])
    total = 0.0
    for t in range(size[m]):
        lam = (t - a[m]) / b[m]
        if not 0.0 <= lam <= 1.0:
            continue
        c1, c2 = a[ax1] + lam * b[ax1], a[ax2] + lam * b[ax2]
        i1, i2 = int(np.floor(c1)), int(np.floor(c2))
        for j1, w1 in ((i1, 1 - (c1 - i1)), (i1 + 1, c1 - i1)):
            for j2, w2 in ((i2, 1 - (c2 - i2)), (i2 + 1, c2 - i2)):
                if 0 <= j1 < size[ax1] and 0 <= j2 < size[ax2]:
                    xyz = [0, 0, 0]
                    xyz[m], xyz[ax1], xyz[ax2] = t, j1, j2
                    total += delta * w1 * w2 * volume[xyz[2], xyz[1], xyz[0]]
    return total


def test_vectorised_projector_matches_the_definition_ray_by_ray():
    geom = ProjectionGeometry(Detector(10, 16, 3.0, 6.0, shape="flat"), 60.0, 120.0, np.array([0.3, 2.0]),
                              source_z=np.array([0.0, 1.0]))
    grid = VolumeGrid((16, 8, 9), (0.5, 3.0, 2.5), origin_xyz=(-9.0, -12.0, -3.0))
    vol = np.random.default_rng(5).standard_normal(grid.shape_zyx)
    proj = forward_project(vol, grid, geom)
    for k in range(geom.n_views):
        s, pixels = ray_endpoints(geom, k)
        for iv in range(0, 16, 3):
            for iu in range(10):
                assert proj[k, iv, iu] == pytest.approx(_joseph_one_ray(vol, grid, s, pixels[iv, iu]),
                                                        rel=1e-12, abs=1e-12)
