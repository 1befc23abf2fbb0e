"""Unit tests for the analytic CT phantom and its low-dose noise model (appliance.synth.phantom)."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.synth.phantom import (
    LABELS, LIVER_Z_MM, MID_THORAX_Z_MM, ROI_CENTRES_MM, PhantomSpec, ct_noise_filter, ct_phantom_hu,
    liver_lesions, low_dose_noise_hu, phantom_labels, roi_mask, uniform_regions, voxel_centres_mm,
)


def _slab(z_mm: float, n: int = 128, slices: int = 1, seed: int = 0, spacing: float = 2.5) -> PhantomSpec:
    """A slab of ``slices`` slices centred on anatomical z = z_mm."""
    z0 = z_mm - spacing * (slices - 1) / 2
    return PhantomSpec((slices, n, n), slice_spacing_mm=spacing, z_start_mm=z0, seed=seed)


def _roi_mean(spec: PhantomSpec, hu: np.ndarray, name: str) -> float:
    m = roi_mask(spec, name)
    assert m.sum() > 0, f"ROI {name} holds no voxel centre"
    return float(hu[m].mean())


def test_same_spec_gives_bit_identical_volume():
    spec = PhantomSpec((4, 96, 96), z_start_mm=120.0, seed=7)
    a, b = ct_phantom_hu(spec), ct_phantom_hu(PhantomSpec((4, 96, 96), z_start_mm=120.0, seed=7))
    assert a.tobytes() == b.tobytes()


def test_different_seed_changes_anatomy_but_not_liver_mean():
    a, b = ct_phantom_hu(_slab(LIVER_Z_MM, slices=3, seed=0)), ct_phantom_hu(_slab(LIVER_Z_MM, slices=3, seed=1))
    assert not np.array_equal(a, b)
    assert np.mean(a != b) > 0.001  # sizes / positions actually moved
    spec = _slab(LIVER_Z_MM, slices=3)
    assert abs(_roi_mean(spec, a, "liver") - _roi_mean(spec, b, "liver")) < 5.0


@pytest.mark.parametrize("shape, pixel_mm", [((3, 64, 64), 0.0), ((2, 80, 120), 3.0), ((1, 1, 1), 0.0)])
def test_volume_is_float32_integer_valued_clipped_and_shaped(shape, pixel_mm):
    spec = PhantomSpec(shape, pixel_spacing_mm=pixel_mm, z_start_mm=200.0)
    hu = ct_phantom_hu(spec)
    assert hu.dtype == np.float32 and hu.shape == shape
    assert np.array_equal(hu, np.rint(hu))
    assert hu.min() >= -1024 and hu.max() <= 3071


def test_voxel_centres_follow_documented_convention():
    spec = PhantomSpec((3, 4, 8), fov_mm=400.0, slice_spacing_mm=5.0, z_start_mm=10.0)
    z, y, x = voxel_centres_mm(spec)
    assert np.allclose(z, [10, 15, 20])
    assert np.allclose(x, (np.arange(8) - 3.5) * 50) and np.allclose(y, (np.arange(4) - 1.5) * 50)


def test_mid_thorax_slice_has_lung_air_and_dense_spine():
    spec = _slab(MID_THORAX_Z_MM, n=256)
    hu = ct_phantom_hu(spec)
    assert -900 <= _roi_mean(spec, hu, "lung") <= -750
    assert np.all(hu[roi_mask(spec, "air")] == -1000)
    assert np.all(hu[0, :4, :] == -1000)  # anterior edge of the FOV is air
    z, y, x = voxel_centres_mm(spec)
    spine = hu[0][np.ix_((y > 30) & (y < 110), np.abs(x) < 40)]
    assert spine.max() > 700
    # patient right (low x) and left both hold lung; the back rests on a table plate below the body
    lung = hu[0] < -700
    assert lung[:, x < -30].sum() > 1000 and lung[:, x > 30].sum() > 1000
    col = hu[0, :, np.argmin(np.abs(x))]
    assert np.any(col[y > 118] >= 150)


def test_lower_slice_liver_roi_mean_is_liver_like():
    spec = _slab(LIVER_Z_MM, n=256)
    hu = ct_phantom_hu(spec)
    assert 40 <= _roi_mean(spec, hu, "liver") <= 80
    assert -120 <= _roi_mean(spec, hu, "fat") <= -80


def test_anatomy_varies_along_z_lungs_then_liver_then_kidneys():
    zs = (-30.0, 60.0, 130.0, 230.0, 275.0, 320.0)
    lab = np.stack([phantom_labels(PhantomSpec((1, 96, 96), z_start_mm=z))[0] for z in zs])
    frac = {k: (lab == LABELS[k]).mean(axis=(1, 2)) for k in ("lung", "liver", "kidney")}
    assert frac["lung"][0] == 0 and frac["lung"][1] > 0.05 and frac["lung"][2] > 0.05 and frac["lung"][5] == 0
    assert frac["liver"][2] == 0 and frac["liver"][4] > 0.05
    assert frac["kidney"][2] == 0 and frac["kidney"][5] > 0.005


def test_renderings_at_64_and_256_agree_on_region_means_and_lung_area():
    for z, names in ((MID_THORAX_Z_MM, ("lung", "air")), (LIVER_Z_MM, ("liver", "fat")), (300.0, ("muscle",))):
        lo, hi = _slab(z, n=64), _slab(z, n=256)
        hu_lo, hu_hi = ct_phantom_hu(lo), ct_phantom_hu(hi)
        for name in names:
            assert abs(_roi_mean(lo, hu_lo, name) - _roi_mean(hi, hu_hi, name)) < 5.0, (z, name)
    specs = (_slab(MID_THORAX_Z_MM, n=64), _slab(MID_THORAX_Z_MM, n=256))
    area = [(phantom_labels(s) == LABELS["lung"]).sum() * s.pixel_mm ** 2 for s in specs]
    assert abs(area[0] - area[1]) / area[1] < 0.05


def test_named_rois_stay_in_a_single_tissue_for_several_seeds():
    for seed in range(4):
        for name, (z, _, _) in ROI_CENTRES_MM.items():
            if name == "spine":
                continue
            spec = _slab(z, n=128, slices=3, seed=seed)
            assert len(np.unique(phantom_labels(spec)[roi_mask(spec, name)])) == 1, (seed, name)


def test_uniform_regions_are_uniform_named_and_eroded():
    spec = PhantomSpec((4, 128, 128), z_start_mm=LIVER_Z_MM - 5.0)
    hu, lab = ct_phantom_hu(spec), phantom_labels(spec)
    regions = dict(uniform_regions(spec, margin_mm=6.0))
    assert {"liver", "muscle", "fat"} <= set(regions)
    expected = {"liver": 60, "muscle": 50, "fat": -100, "lung": -850}
    for name, m in regions.items():
        assert m.shape == hu.shape and m.dtype == bool and m.sum() > 50
        assert np.all(hu[m] == expected[name]), name
        # eroded: no in-plane neighbour within the margin (6 mm = 2 px at 3.125 mm) is another tissue
        inner = m[:, 2:-2, 2:-2]
        for dy, dx in ((2, 0), (-2, 0), (0, 2), (0, -2)):
            assert np.all(lab[:, 2 + dy:lab.shape[1] - 2 + dy, 2 + dx:lab.shape[2] - 2 + dx][inner] == LABELS[name])
    assert dict(uniform_regions(_slab(MID_THORAX_Z_MM, n=128)))["lung"].sum() > 100


def test_liver_lesions_are_seeded_small_low_contrast_and_rendered():
    a, b = liver_lesions(PhantomSpec((1, 8, 8), seed=0)), liver_lesions(PhantomSpec((1, 8, 8), seed=3))
    assert len(a) == 3 and a != b
    for les in a:
        assert 4.0 <= les["radius_mm"] <= 7.5 and 10 <= abs(les["contrast_hu"]) <= 20
        z, y, x = les["centre_zyx_mm"]
        spec = PhantomSpec((1, 256, 256), z_start_mm=z)
        hu = ct_phantom_hu(spec)
        assert np.all(hu[roi_mask(spec, (z, y, x), 0.8 * les["radius_mm"])] == 60 + les["contrast_hu"])


def test_invalid_spec_is_rejected():
    with pytest.raises(ValueError):
        PhantomSpec((0, 8, 8))
    with pytest.raises(ValueError):
        PhantomSpec((1, 8, 8), slice_spacing_mm=0.0)


def _noise_in_liver(dose: float, n: int = 128, seed: int = 5):
    spec = _slab(LIVER_Z_MM, n=n, slices=6)
    clean = ct_phantom_hu(spec)
    noisy = low_dose_noise_hu(clean, dose, seed=seed, pixel_spacing_mm=spec.pixel_mm)
    return clean, noisy, dict(uniform_regions(spec))["liver"]


@pytest.mark.parametrize("dose, target", [(0.25, 16.0), (1.0, 8.0)])
def test_noise_std_in_uniform_region_matches_dose(dose, target):
    clean, noisy, liver = _noise_in_liver(dose)
    diff = (noisy - clean)[liver]
    assert abs(diff.std() - target) <= 0.1 * target
    assert abs(diff.mean()) < 0.1 * target


def test_noise_std_is_honest_at_fine_pixels_too():
    spec = PhantomSpec((2, 512, 512), z_start_mm=LIVER_Z_MM)
    clean = ct_phantom_hu(spec)
    noisy = low_dose_noise_hu(clean, 0.25, seed=1, pixel_spacing_mm=spec.pixel_mm)
    liver = dict(uniform_regions(spec))["liver"]
    assert abs((noisy - clean)[liver].std() - 16.0) <= 1.6


def test_noise_is_deterministic_integer_clipped_and_slice_independent():
    clean, noisy, _ = _noise_in_liver(0.25)
    again = low_dose_noise_hu(clean, 0.25, seed=5, pixel_spacing_mm=400 / 128)
    other = low_dose_noise_hu(clean, 0.25, seed=6, pixel_spacing_mm=400 / 128)
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape and np.array_equal(noisy, again)
    assert not np.array_equal(noisy, other)
    assert np.array_equal(noisy, np.rint(noisy)) and noisy.min() >= -1024 and noisy.max() <= 3071
    d = noisy - clean
    assert abs(np.corrcoef(d[0].ravel(), d[1].ravel())[0, 1]) < 0.05
    single = low_dose_noise_hu(clean[0], 1.0, seed=5, pixel_spacing_mm=400 / 128)
    assert single.shape == clean[0].shape


def test_noise_spectrum_is_ramp_like_with_zero_dc_and_unit_variance():
    filt = ct_noise_filter((256, 256), 0.8)
    full = np.concatenate([filt, filt[:, 1:-1][:, ::-1]], axis=1)  # mirror to the full grid (|H| is symmetric)
    assert filt[0, 0] == 0.0
    assert abs(np.mean(full ** 2) - 1.0) < 0.02
    radial = filt[0, :]  # along fx: rises from DC, peaks at mid frequencies, falls toward the cut-off
    peak = int(np.argmax(radial))
    assert 0 < peak < radial.size - 1 and radial[peak] > 2 * radial[1] and radial[-1] < radial[peak]


def test_invalid_dose_is_rejected():
    with pytest.raises(ValueError):
        low_dose_noise_hu(np.zeros((1, 8, 8), np.float32), 0.0, seed=0, pixel_spacing_mm=1.0)
    with pytest.raises(ValueError):
        low_dose_noise_hu(np.zeros((1, 8, 8), np.float32), 1.5, seed=0, pixel_spacing_mm=1.0)
