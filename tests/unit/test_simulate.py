"""Unit tests for the low-dose scan simulator (kernels.simulate): Poisson + electronic noise statistics."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.simulate import MU_WATER_PER_MM, Scan, hu_to_mu, mu_to_hu, noiseless_scan, simulate_scan

FULL_DOSE, QUARTER_DOSE = 1e5, 2.5e4  # photons per detector element per view


def test_same_seed_gives_identical_scan_and_another_seed_does_not():
    p = np.linspace(0.0, 6.0, 3 * 4 * 50).reshape(3, 4, 50)
    a, b = simulate_scan(p, FULL_DOSE, seed=4), simulate_scan(p, FULL_DOSE, seed=4)
    assert a.line_integrals.tobytes() == b.line_integrals.tobytes()
    assert a.counts.tobytes() == b.counts.tobytes()
    assert not np.array_equal(a.counts, simulate_scan(p, FULL_DOSE, seed=5).counts)
    assert a.line_integrals.shape == p.shape and a.line_integrals.dtype == np.float64
    assert isinstance(a, Scan) and a.incident_photons == FULL_DOSE and a.electronic_noise == 10.0


@pytest.mark.parametrize("p, incident", [(2.0, 1e4), (4.0, FULL_DOSE), (0.5, QUARTER_DOSE)])
def test_noisy_line_integrals_are_unbiased_up_to_the_log_bias(p, incident):
    """E[-log(N/I0)] ~ p + 1/(2 N) to second order in the relative noise (N = I0 e^-p mean counts)."""
    n_samples = 200_000
    scan = simulate_scan(np.full(n_samples, p), incident, electronic_noise=0.0, seed=1)
    mean_counts = incident * np.exp(-p)
    stderr = np.sqrt(1.0 / mean_counts / n_samples)
    log_bias = 1.0 / (2.0 * mean_counts)
    assert abs(scan.line_integrals.mean() - (p + log_bias)) < 5 * stderr + 0.2 * log_bias
    assert abs(scan.line_integrals.mean() - p) < 2 * log_bias + 5 * stderr


@pytest.mark.parametrize("p, incident", [(1.0, FULL_DOSE), (3.0, QUARTER_DOSE), (5.0, FULL_DOSE)])
def test_variance_is_one_over_expected_counts(p, incident):
    """var(-log(N/I0)) ~ 1/(I0 e^-p) (Poisson, first order), within 10 %."""
    scan = simulate_scan(np.full(100_000, p), incident, electronic_noise=0.0, seed=2)
    expected = 1.0 / (incident * np.exp(-p))
    assert scan.line_integrals.var() == pytest.approx(expected, rel=0.10)


def test_electronic_noise_adds_its_variance_to_the_counts():
    """var(-log(N/I0)) ~ (N + sigma_e^2) / N^2 with read-out noise sigma_e (photons)."""
    p, sigma_e = 6.0, 10.0
    scan = simulate_scan(np.full(100_000, p), FULL_DOSE, electronic_noise=sigma_e, seed=3)
    n = FULL_DOSE * np.exp(-p)
    assert scan.line_integrals.var() == pytest.approx((n + sigma_e ** 2) / n ** 2, rel=0.10)


def test_quarter_dose_doubles_the_noise_std():
    p = np.full(100_000, 3.0)
    full = simulate_scan(p, FULL_DOSE, electronic_noise=0.0, seed=7).line_integrals.std()
    quarter = simulate_scan(p, QUARTER_DOSE, electronic_noise=0.0, seed=8).line_integrals.std()
    assert quarter / full == pytest.approx(2.0, rel=0.05)


def test_zero_counts_are_clamped_to_one_photon_without_inf_or_nan():
    p = np.array([0.0, 20.0, 50.0, 1e3, np.inf])  # far beyond log(I0): essentially no photons arrive
    scan = simulate_scan(p, FULL_DOSE, electronic_noise=10.0, seed=0)
    assert np.all(np.isfinite(scan.line_integrals))
    assert np.all(scan.line_integrals[1:] <= np.log(FULL_DOSE) + 1e-12)
    noiseless = noiseless_scan(p, FULL_DOSE)
    assert np.all(np.isfinite(noiseless.line_integrals))
    np.testing.assert_array_equal(noiseless.line_integrals[1:], np.log(FULL_DOSE))


def test_noiseless_scan_returns_the_exact_line_integrals_and_expected_counts():
    p = np.linspace(0.0, 8.0, 17).reshape(1, 1, 17)
    scan = noiseless_scan(p, QUARTER_DOSE)
    np.testing.assert_array_equal(scan.line_integrals, p)
    np.testing.assert_allclose(scan.counts, QUARTER_DOSE * np.exp(-p), rtol=1e-15)
    assert scan.electronic_noise == 0.0


def test_hu_mu_round_trip_and_fixed_points():
    hu = np.array([-1000.0, -850.0, -100.0, 0.0, 60.0, 1000.0, 3071.0])
    mu = hu_to_mu(hu)
    assert mu[0] == 0.0 and mu[3] == pytest.approx(MU_WATER_PER_MM) and mu[5] == pytest.approx(2 * MU_WATER_PER_MM)
    np.testing.assert_allclose(mu_to_hu(mu), hu, atol=1e-9)  # HU
    assert hu_to_mu(np.array([-1024.0]))[0] == 0.0  # below air: clipped, never negative attenuation


@pytest.mark.parametrize("incident, sigma_e", [(0.0, 10.0), (-1.0, 0.0), (1e5, -1.0)])
def test_invalid_dose_is_rejected(incident, sigma_e):
    with pytest.raises(ValueError):
        simulate_scan(np.zeros(3), incident, electronic_noise=sigma_e)
