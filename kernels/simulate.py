"""Low-dose CT scan simulation: HU <-> linear attenuation, and Poisson + electronic noise on line integrals.

Model (monochromatic, no scatter, no beam hardening): a detector element behind line integral p
receives on average ``I0 * exp(-p)`` photons (Beer-Lambert), counted with Poisson statistics; the
read-out adds Gaussian electronic noise of standard deviation ``electronic_noise`` (photons).  The
measured line integral is ``-log(counts / I0)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Linear attenuation of water at ~70 keV, the usual effective energy of a 120 kVp beam, in 1/mm.
# NIST XCOM gives mu/rho = 0.193 cm^2/g at 70 keV (interpolated between 0.206 at 60 keV and 0.184 at
# 80 keV), i.e. 0.0193/mm at 1 g/cm^3; 0.0192/mm is the value common in the low-dose CT simulation
# literature.  Assumption: one effective energy for every ray (HU is then linear in mu).
MU_WATER_PER_MM = 0.0192

# Counts are clamped at one photon before the log: Gaussian electronic noise makes counts <= 0 in
# photon-starved elements, where -log is undefined.  One photon is the smallest physically meaningful
# detection and caps a measured line integral at log(I0) (about 11.5 at 1e5 photons), the same floor
# scanners apply before their own log.
MIN_COUNTS = 1.0


def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    """Linear attenuation (1/mm) from HU: ``mu = MU_WATER_PER_MM * (1 + HU / 1000)``, clipped at 0
    (HU below -1000 is noise in air, not negative attenuation).  Any array shape."""
    mu = MU_WATER_PER_MM * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0)
    return np.maximum(mu, 0.0)


def mu_to_hu(mu: np.ndarray) -> np.ndarray:
    """HU from linear attenuation (1/mm): ``HU = 1000 * (mu / MU_WATER_PER_MM - 1)``.  Any array shape."""
    return 1000.0 * (np.asarray(mu, dtype=np.float64) / MU_WATER_PER_MM - 1.0)


@dataclass(frozen=True)
class Scan:
    """A simulated acquisition; arrays have the shape of the input line integrals, e.g. (views, rows, cols)."""

    line_integrals: np.ndarray  # measured -log(max(counts, 1) / I0), dimensionless, float64
    counts: np.ndarray  # detected photons (float64; may be <= 0 with electronic noise)
    incident_photons: float  # I0: photons per detector element per view, unattenuated
    electronic_noise: float  # standard deviation of the additive read-out noise, photons


def _check_dose(incident_photons: float, electronic_noise: float) -> None:
    if not incident_photons > 0:
        raise ValueError(f"incident_photons must be > 0 photons per element per view, got {incident_photons}")
    if not electronic_noise >= 0:
        raise ValueError(f"electronic_noise must be >= 0 photons, got {electronic_noise}")


def _measure(counts: np.ndarray, incident_photons: float) -> np.ndarray:
    return -np.log(np.maximum(counts, MIN_COUNTS) / incident_photons)


def simulate_scan(line_integrals: np.ndarray, incident_photons: float, electronic_noise: float = 10.0,
                  seed: int = 0) -> Scan:
    """Noisy scan of the true ``line_integrals`` (any shape, dimensionless).

    counts = Poisson(I0 * exp(-p)) + Normal(0, electronic_noise); measured p = -log(max(counts, 1) / I0).
    ``incident_photons`` (I0) is per detector element per view, e.g. 1e5 for full dose, 2.5e4 for a quarter.
    Deterministic in ``seed``.
    """
    _check_dose(incident_photons, electronic_noise)
    p = np.asarray(line_integrals, dtype=np.float64)
    rng = np.random.default_rng(seed)
    counts = rng.poisson(incident_photons * np.exp(-p)).astype(np.float64)
    if electronic_noise > 0:
        counts += rng.normal(0.0, electronic_noise, size=p.shape)
    return Scan(_measure(counts, incident_photons), counts, float(incident_photons), float(electronic_noise))


def noiseless_scan(line_integrals: np.ndarray, incident_photons: float) -> Scan:
    """Noise-free scan: counts = I0 * exp(-p) exactly (e.g. for PWLS weights in ideal tests).

    The measured line integrals go through the same one-photon clamp as `simulate_scan`: they equal the
    input exactly wherever p <= log(I0) and are log(I0) beyond.
    """
    _check_dose(incident_photons, 0.0)
    p = np.asarray(line_integrals, dtype=np.float64)
    counts = incident_photons * np.exp(-p)
    # p itself rather than -log(exp(-p)): exact, not just to rounding
    measured = np.where(counts >= MIN_COUNTS, p, np.log(incident_photons / MIN_COUNTS))
    return Scan(measured, counts, float(incident_photons), 0.0)
