"""The CUDA kernels: nvcc builds every one for sm_87/89/90 without spills, and the host twin (the
same source through kernels/host_shim.h) is the exact adjoint pair, matches the NumPy reference,
and reconstructs the phantom by FBP/FDK."""

from __future__ import annotations

import os

import numpy as np
import pytest

from appliance.synth.phantom import PhantomSpec, ct_phantom_hu
from kernels import build, reference
from kernels.geometry import ProjectionGeometry, VolumeGrid
from kernels.host import HostProjector
from kernels.recon.fbp import fbp

MU_WATER = 0.0192  # 1/mm

GEOMETRIES = {
    "fan-flat": (ProjectionGeometry.fan(60, 48, 1.6, 300.0, 550.0, "flat"), VolumeGrid((1, 40, 36), (1.0, 1.1, 0.9))),
    "fan-curved": (ProjectionGeometry.fan(60, 48, 1.6, 300.0, 550.0, "curved"),
                   VolumeGrid((1, 40, 40), (1.0, 1.0, 1.0), (-22.0, -17.0, 0.0))),
    "cone-flat": (ProjectionGeometry.cone(24, 40, 12, 1.5, 1.5, 300.0, 550.0, "flat"),
                  VolumeGrid((10, 28, 30), (1.25, 1.0, 1.0))),
    "cone-curved-helical": (ProjectionGeometry.cone(24, 40, 12, 1.5, 1.5, 300.0, 550.0, "curved", pitch_mm_per_turn=12.0),
                            VolumeGrid((10, 28, 28), (1.25, 1.0, 1.0))),
}


def _ffs(geom: ProjectionGeometry) -> ProjectionGeometry:
    """The same geometry with an alternating flying focal spot (in phi, z and rho)."""
    alt = np.where(np.arange(geom.n_views) % 2 == 0, 1.0, -1.0)
    return ProjectionGeometry(geom.detector, geom.sod, geom.sdd, geom.angles, geom.source_z,
                              ffs_dphi=alt * 0.0006, ffs_dz=alt * 0.3, ffs_drho=alt * 0.5)


def _cases():
    for name, (geom, grid) in GEOMETRIES.items():
        yield pytest.param(geom, grid, id=name)
    geom, grid = GEOMETRIES["cone-flat"]
    yield pytest.param(_ffs(geom), grid, id="cone-flat-ffs")


@pytest.mark.parametrize("geom, grid", list(_cases()))
def test_host_twin_is_the_exact_adjoint_pair(geom, grid):
    op = HostProjector(geom, grid)
    rng = np.random.default_rng(0)
    x = rng.random(grid.shape_zyx, dtype=np.float32)
    y = rng.random(geom.shape, dtype=np.float32)
    lhs = float(np.vdot(op.forward(x).astype(np.float64), y))
    rhs = float(np.vdot(x.astype(np.float64), op.adjoint(y)))
    assert abs(lhs - rhs) / abs(lhs) < 1e-5


@pytest.mark.parametrize("geom, grid", list(_cases()))
def test_host_twin_matches_the_numpy_reference(geom, grid):
    op = HostProjector(geom, grid)
    rng = np.random.default_rng(1)
    x = rng.random(grid.shape_zyx, dtype=np.float32)
    y = rng.random(geom.shape, dtype=np.float32)
    fp_ref = reference.forward_project(x.astype(np.float64), grid, geom)
    bp_ref = reference.back_project(y.astype(np.float64), grid, geom)
    # float32 kernel vs float64 reference: index coordinates carry ~1e-6 of the grid size and
    # each ray or voxel sums ~100 samples, so agreement to 2e-5 of the largest value is the
    # arithmetic, not the method (the pair itself is adjoint to ~1e-9, test above).
    assert np.max(np.abs(op.forward(x) - fp_ref)) <= 2e-5 * np.max(np.abs(fp_ref))
    assert np.max(np.abs(op.adjoint(y) - bp_ref)) <= 2e-5 * np.max(np.abs(bp_ref))


def _nvcc_or_skip():
    if build.nvcc_path() is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc is required in CI: every kernel must build for sm_87/89/90")
        pytest.skip("nvcc not installed on this machine")


@pytest.mark.parametrize("source", build.sources(), ids=lambda p: p.name)
def test_nvcc_builds_every_kernel_for_three_architectures_without_spills(source):
    _nvcc_or_skip()
    path, report = build.build_fatbin(source)  # raises on a compile error or any spill
    assert path.stat().st_size > 0
    kernels = {key.split("@")[0] for key in report}
    for arch in build.GPU_ARCHS:
        assert {k for k in report if k.endswith(f"@sm_{arch}")}, f"nothing compiled for sm_{arch}"
    assert all(report[f"{k}@sm_{a}"].get("spill_stores", 0) == 0 for k in kernels for a in build.GPU_ARCHS)


def test_a_spill_fails_the_build(tmp_path, monkeypatch):
    _nvcc_or_skip()
    src = tmp_path / "spill.cu"
    # A large per-thread array indexed at run time lives in local memory: ptxas reports it as a
    # stack frame (and at -maxrregcount=16 also as spills) -- the build must refuse spills.
    src.write_text(
        'extern "C" __global__ void k(float* out, int n) {\n'
        "  float acc[64];\n  for (int i = 0; i < 64; ++i) acc[i] = out[i * n] * i;\n"
        "  float s = 0.f;\n  for (int i = 0; i < 64; ++i) s += acc[(i * 7 + n) % 64] * acc[i];\n"
        "  out[threadIdx.x] = s;\n}\n"
    )
    monkeypatch.setattr(build, "NVCC_FLAGS", (*build.NVCC_FLAGS, "-maxrregcount=16"))
    monkeypatch.setenv("APPLIANCE_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(build.KernelBuildError, match="spill"):
        build.build_fatbin(src, ("90",))


def _edge_mask(hu: np.ndarray, radius: int) -> np.ndarray:
    """Voxels within ``radius`` pixels of a tissue boundary of the piecewise-constant phantom."""
    near = np.zeros(hu.shape, dtype=bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            near |= np.roll(np.roll(hu, dy, 0), dx, 1) != hu
    return near


@pytest.mark.parametrize("shape", ["flat", "curved"])
def test_fbp_of_the_noiseless_phantom_is_within_5_hu(shape):
    n, fov = 256, 400.0
    hu = ct_phantom_hu(PhantomSpec(shape_zyx=(1, n, n), fov_mm=fov, z_start_mm=200, seed=0))[0]
    mu = (MU_WATER * (1 + hu / 1000)).clip(0).astype(np.float32)[None]
    grid = VolumeGrid((1, n, n), (1.0, fov / n, fov / n))
    geom = ProjectionGeometry.fan(720, 2 * n, 2.851, 570.0, 1040.0, shape)
    op = HostProjector(geom, grid)
    recon_hu = (fbp(op.forward(mu), op, window="hann")[0] / MU_WATER - 1) * 1000
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot((xx - (n - 1) / 2), (yy - (n - 1) / 2)) * fov / n
    # Inside the field of view (radius 180 mm of 224 mm measured) and more than 2 pixels from a
    # tissue boundary: a band-limited reconstruction cannot reproduce the phantom's step edges.
    region = (r < 180) & ~_edge_mask(hu, 2)
    assert region.sum() > 0.5 * (r < 180).sum()
    rmse = float(np.sqrt(np.mean((recon_hu - hu)[region] ** 2)))
    assert rmse <= 5.0, f"FBP RMSE {rmse:.2f} HU"


def test_fdk_reconstructs_a_uniform_ball_to_its_attenuation():
    n = 48
    grid = VolumeGrid((24, n, n), (2.0, 2.0, 2.0))
    z, y, x = np.meshgrid(*(np.arange(s) - (s - 1) / 2 for s in grid.shape_zyx), indexing="ij")
    ball = ((x * 2) ** 2 + (y * 2) ** 2 + (z * 2) ** 2 < 30**2).astype(np.float32) * MU_WATER
    for shape in ("flat", "curved"):
        # 90 rows of 1.6 mm cover the 60 mm ball axially at the isocentre (no truncation)
        geom = ProjectionGeometry.cone(180, 96, 90, 1.6, 1.6, 400.0, 700.0, shape)
        op = HostProjector(geom, grid)
        recon = fbp(op.forward(ball), op, window="hann")
        inner = (x * 2) ** 2 + (y * 2) ** 2 + (z * 2) ** 2 < 20**2
        assert abs(recon[inner].mean() / MU_WATER - 1) < 0.003  # within 3 HU of water


def test_denoiser_normalisation_kernels_do_the_cards_arithmetic():
    from engines.card import ModelCard
    from kernels.host import hu_to_network, network_to_hu

    rng = np.random.default_rng(5)
    hu = rng.uniform(-1500, 4000, size=(3, 17, 19)).astype(np.float32)
    y = rng.normal(0, 0.05, size=hu.shape).astype(np.float32)
    for meaning in ("residual", "image"):
        card = ModelCard(name="m", version="1", onnx="m.onnx", sha256="0" * 64, intended_use="test",
                         training_data="none", output={"meaning": meaning},
                         normalization={"center_hu": -20.0, "scale_hu": 800.0})
        n = card.normalization
        x = hu_to_network(hu, n.center_hu, n.scale_hu, n.clip_min_hu, n.clip_max_hu)
        np.testing.assert_allclose(x, n.to_network(hu), rtol=1e-6, atol=1e-6)
        out = network_to_hu(hu, y, n.center_hu, n.scale_hu, meaning == "residual")
        np.testing.assert_allclose(out, card.from_network(y, hu), rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("meaning", ["residual", "image"])
def test_plugin_convention_hu_kernels_do_the_cards_arithmetic_on_the_centre_slice(meaning):
    from engines.card import ModelCard
    from kernels.host import hu_to_network_plugin, network_to_hu_plugin

    rng = np.random.default_rng(6)
    hu = rng.uniform(-1500, 4000, size=(3, 5, 17, 19)).astype(np.float32)  # 3 slices, 2 neighbours each side
    y = rng.normal(0, 0.05, size=(3, 1, 17, 19)).astype(np.float32)
    card = ModelCard(name="m", version="1", onnx="m.onnx", sha256="0" * 64, intended_use="test",
                     training_data="none", input={"context_slices": 2}, output={"meaning": meaning},
                     normalization={"center_hu": -20.0, "scale_hu": 800.0, "clip_min_hu": -1000.0})
    n = card.normalization
    params = np.array([n.center_hu, n.scale_hu, n.clip_min_hu, n.clip_max_hu], np.float32)  # the kernels' order
    x = hu_to_network_plugin(hu, params)
    # 1e-6 network units is 0.0008 HU at scale 800 (float32 rounding of the same operations)
    np.testing.assert_allclose(x, card.normalization.to_network(hu), rtol=1e-6, atol=1e-6)
    out = network_to_hu_plugin(hu, y, params, centre=2, residual=meaning == "residual")
    np.testing.assert_allclose(out[:, 0], card.from_network(y[:, 0], hu[:, 2]), rtol=1e-6, atol=1e-3)  # HU


@pytest.mark.parametrize("shape", ["flat", "curved"])
def test_short_scan_fbp_with_parker_weights_matches_the_full_scan(shape):
    n, fov = 128, 400.0
    grid = VolumeGrid((1, n, n), (1.0, fov / n, fov / n))
    yy, xx = np.mgrid[:n, :n]
    x, y = (xx - (n - 1) / 2) * fov / n, (yy - (n - 1) / 2) * fov / n
    disc = (((x - 30) ** 2 + (y + 10) ** 2 < 70**2) * MU_WATER).astype(np.float32)[None]
    fan_half = 128 * 2.5 / 1040 if shape == "curved" else np.arctan(128 * 2.5 / 1040)
    step = 2 * np.pi / 720
    views = int(np.ceil((np.pi + 2 * fan_half + 0.05) / step))
    geom = ProjectionGeometry.fan(views, 256, 2.5, 570.0, 1040.0, shape, span=views * step, start=0.3)
    op = HostProjector(geom, grid)
    recon = fbp(op.forward(disc), op, window="hann")[0]
    inner = (x - 30) ** 2 + (y + 10) ** 2 < 55**2
    assert abs(recon[inner].mean() / MU_WATER - 1) < 0.002  # within 2 HU of water
    assert recon[inner].std() / MU_WATER < 0.005
    too_short = ProjectionGeometry.fan(200, 256, 2.5, 570.0, 1040.0, shape, span=200 * step)
    with pytest.raises(ValueError, match="short scan needs"):
        fbp(np.zeros(too_short.shape, np.float32), HostProjector(too_short, grid))
