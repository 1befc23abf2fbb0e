"""Training pairs for the reference denoiser: full-dose / quarter-dose FBP slices the project simulates itself.

Per slice (one phantom seed, one anatomical z):

    phantom HU (appliance.synth.phantom)  ->  attenuation 1/mm (hu_to_mu)
    ->  fan-beam line integrals (HostProjector, curved detector)
    ->  Poisson + electronic noise at full dose and, independently, at quarter dose (simulate_scan)
    ->  FBP with the Hann window, both  ->  HU, clipped to the stored range [-1024, 3071]

The full-dose FBP is the target and the quarter-dose FBP the input: the network learns what a
quarter-dose scan would have looked like at full dose, with the project's own noise model and
reconstruction.  Everything is deterministic in (phantom seed, z): the two noise realisations draw
from seeds derived from both.  Pairs are cached as ``.npz`` under ``cache_dir()`` (in /tmp, never in
the repository), keyed by the protocol, so a second run or a test reads them back.

This module needs only NumPy and the kernels (no torch): the tests simulate their held-out slices here.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from appliance.synth.phantom import (HU_MAX, HU_MIN, LABELS, PhantomSpec, ct_phantom_hu, phantom_labels,
                                     uniform_regions)
from kernels.geometry import ProjectionGeometry, VolumeGrid
from kernels.host import HostProjector
from kernels.recon.fbp import fbp
from kernels.simulate import hu_to_mu, mu_to_hu, simulate_scan

CACHE_VERSION = 1  # bump when the simulation chain changes, so stale cached pairs are not read back


@dataclass(frozen=True)
class ScanProtocol:
    """The simulated acquisition and reconstruction (one axial fan-beam slice).

    The detector has ``2 * pixels`` curved columns of ``detector_pitch_mm`` (arc length at the
    detector), i.e. 1.56 mm at the isocentre for the defaults, about one reconstructed pixel; its fan
    covers a 366 mm radius, the whole 400 mm square field of view.  720 views over 360 degrees is well
    above the angular sampling a 256-pixel, 400 mm grid needs (pi/2 * 256 ~ 400 views).
    """

    pixels: int = 256                 # reconstructed grid, square
    fov_mm: float = 400.0             # reconstructed field of view, square
    n_views: int = 720                # over a full circle
    sod_mm: float = 570.0             # focal spot to isocentre
    sdd_mm: float = 1040.0            # focal spot to detector
    detector_pitch_mm: float = 2.85   # column pitch at the detector (arc length, curved detector)
    full_dose_photons: float = 2e5    # incident photons per detector element per view
    dose_fraction: float = 0.25       # the low-dose input: a quarter of the full dose
    electronic_noise: float = 10.0    # read-out noise standard deviation, photons
    window: str = "hann"              # FBP ramp apodisation

    @property
    def pixel_mm(self) -> float:
        return self.fov_mm / self.pixels

    def key(self) -> str:
        """Short digest of the protocol and the chain version, for cache paths."""
        text = repr(sorted(asdict(self).items())) + f"v{CACHE_VERSION}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SliceSite:
    """Where a slice is taken: the phantom's seed (body and organ variation) and anatomical z in mm
    (0 = lung apex, toward the feet)."""

    phantom_seed: int
    z_mm: float

    def phantom_spec(self, protocol: ScanProtocol) -> PhantomSpec:
        return PhantomSpec(shape_zyx=(1, protocol.pixels, protocol.pixels), fov_mm=protocol.fov_mm,
                           z_start_mm=self.z_mm, seed=self.phantom_seed)

    def noise_seed(self, dose_tag: int) -> int:
        """Seed of one noise realisation; ``dose_tag`` 0 = full dose, 1 = low dose (independent)."""
        entropy = [self.phantom_seed, int(round(self.z_mm * 100)), dose_tag]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@dataclass(frozen=True)
class SlicePair:
    """One training or evaluation slice, arrays (rows, columns) float32 HU on the protocol's grid."""

    site: SliceSite
    low_dose_hu: np.ndarray   # quarter-dose FBP: the network's input
    full_dose_hu: np.ndarray  # full-dose FBP of the same slice: the target
    phantom_hu: np.ndarray    # the noise-free phantom (for reporting only)


@lru_cache(maxsize=2)
def projector(protocol: ScanProtocol) -> HostProjector:
    """The host-twin projector for ``protocol`` (one 2-D slice, fan beam, curved detector)."""
    n = protocol.pixels
    grid = VolumeGrid((1, n, n), (1.0, protocol.pixel_mm, protocol.pixel_mm))
    geom = ProjectionGeometry.fan(protocol.n_views, 2 * n, protocol.detector_pitch_mm, protocol.sod_mm,
                                  protocol.sdd_mm, "curved")
    return HostProjector(geom, grid)


def _reconstruct_hu(line_integrals: np.ndarray, protocol: ScanProtocol) -> np.ndarray:
    mu = fbp(line_integrals.astype(np.float32), projector(protocol), window=protocol.window)
    return np.clip(mu_to_hu(mu[0]), HU_MIN, HU_MAX).astype(np.float32)


def simulate_pair(site: SliceSite, protocol: ScanProtocol = ScanProtocol()) -> SlicePair:
    """Simulate one slice at full and at low dose (independent noise) and reconstruct both (no cache)."""
    phantom = ct_phantom_hu(site.phantom_spec(protocol))
    clean = projector(protocol).forward(hu_to_mu(phantom).astype(np.float32))
    full = simulate_scan(clean, protocol.full_dose_photons, protocol.electronic_noise, seed=site.noise_seed(0))
    low = simulate_scan(clean, protocol.full_dose_photons * protocol.dose_fraction, protocol.electronic_noise,
                        seed=site.noise_seed(1))
    return SlicePair(site, _reconstruct_hu(low.line_integrals, protocol),
                     _reconstruct_hu(full.line_integrals, protocol), phantom[0])


def cache_dir() -> Path:
    """``$APPLIANCE_TRAIN_CACHE`` or /tmp/appliance-denoiser-pairs."""
    return Path(os.environ.get("APPLIANCE_TRAIN_CACHE", "/tmp/appliance-denoiser-pairs"))


def _cache_path(site: SliceSite, protocol: ScanProtocol) -> Path:
    return cache_dir() / protocol.key() / f"seed{site.phantom_seed:03d}_z{site.z_mm:07.2f}.npz"


def load_pair(site: SliceSite, protocol: ScanProtocol = ScanProtocol(), cache: bool = True) -> SlicePair:
    """`simulate_pair`, read back from the cache when it is there (and written there when it is not)."""
    path = _cache_path(site, protocol)
    if cache and path.exists():
        with np.load(path) as z:
            return SlicePair(site, z["low_dose_hu"], z["full_dose_hu"], z["phantom_hu"])
    pair = simulate_pair(site, protocol)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, low_dose_hu=pair.low_dose_hu, full_dose_hu=pair.full_dose_hu, phantom_hu=pair.phantom_hu)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return pair


# --- which slices train and which are held out ------------------------------------------------------

TRAIN_PHANTOM_SEEDS = tuple(range(20))
Z_RANGE_MM = (0.0, 380.0)  # lung apex to below the kidneys
Z_STRATA_PER_SEED = 4      # one slice per quarter of Z_RANGE_MM per seed: thorax, heart/dome, liver, kidneys
HELDOUT_PHANTOM_SEEDS = (40, 41, 42, 43, 44, 45)
# Held-out z: 2 through the thorax, 4 through the upper abdomen where liver, muscle and fat all have
# uniform regions; each held-out seed gets one of them.
HELDOUT_Z_MM = (67.5, 142.5, 252.5, 277.5, 297.5, 322.5)


def training_sites(seeds: tuple[int, ...] = TRAIN_PHANTOM_SEEDS) -> list[SliceSite]:
    """Per seed, one z drawn uniformly (0.5 mm grid) in each of `Z_STRATA_PER_SEED` equal strata of
    `Z_RANGE_MM`, from a generator seeded with the phantom seed: deterministic, covering the anatomy."""
    lo, hi = Z_RANGE_MM
    edges = np.linspace(lo, hi, Z_STRATA_PER_SEED + 1)
    sites = []
    for seed in seeds:
        rng = np.random.default_rng([seed, 2024])
        for a, b in zip(edges[:-1], edges[1:]):
            sites.append(SliceSite(seed, float(np.round(rng.uniform(a, b) * 2) / 2)))
    return sites


def heldout_sites() -> list[SliceSite]:
    """Slices never trained on: phantom seeds and z positions disjoint from `training_sites`."""
    sites = [SliceSite(s, z) for s, z in zip(HELDOUT_PHANTOM_SEEDS, HELDOUT_Z_MM)]
    train = training_sites()
    assert not {s.phantom_seed for s in sites} & {s.phantom_seed for s in train}
    assert not {s.z_mm for s in sites} & {s.z_mm for s in train}, "a held-out z is also a training z"
    return sites


def body_mask(site: SliceSite, protocol: ScanProtocol = ScanProtocol()) -> np.ndarray:
    """(rows, columns) bool: inside the patient (every tissue but outside air and the table)."""
    lab = phantom_labels(site.phantom_spec(protocol))[0]
    return (lab != LABELS["air"]) & (lab != LABELS["table"])


# --- measurements on held-out slices ----------------------------------------------------------------

PSNR_PEAK_HU = 1000.0  # PSNR peak: 1000 HU, the card's normalisation scale (a gain in dB does not depend on it)
SCORED_REGIONS = ("liver", "muscle", "fat")  # the uniform regions the quality targets are held to


def psnr_db(image_hu: np.ndarray, reference_hu: np.ndarray, mask: np.ndarray,
            peak_hu: float = PSNR_PEAK_HU) -> float:
    """10 log10(peak^2 / MSE) over ``mask``, HU images of the same shape."""
    err = (image_hu.astype(np.float64) - reference_hu)[mask]
    return float(10 * np.log10(peak_hu**2 / np.mean(err**2)))


def score_denoiser(pairs: list[SlicePair], denoised_hu: list[np.ndarray],
                   protocol: ScanProtocol = ScanProtocol()) -> dict:
    """Held-out scores of a denoiser against the full-dose FBP of the same slices (its training target).

    Per uniform region (``uniform_regions``: liver, muscle, fat, lung; 3 mm margin), pooled over the
    slices that contain it:

    * ``noise_std_reduction`` = 1 - sigma_out / sigma_low, sigma the pixel standard deviation inside the
      region per slice, pooled as the root of the pixel-weighted mean variance;
    * ``mean_shift_hu`` = mean over all region pixels of (denoised - full dose), HU;
    * the same numbers per slice under ``slices``.

    Per slice, ``psnr_gain_db`` = PSNR(denoised) - PSNR(low dose), both against the full-dose FBP over
    the body (`body_mask`), peak `PSNR_PEAK_HU`.
    """
    regions: dict[str, dict[str, float]] = {}
    slices = []
    for pair, out in zip(pairs, denoised_hu, strict=True):
        spec = pair.site.phantom_spec(protocol)
        body = body_mask(pair.site, protocol)
        psnr_low = psnr_db(pair.low_dose_hu, pair.full_dose_hu, body)
        psnr_out = psnr_db(out, pair.full_dose_hu, body)
        row = {"phantom_seed": pair.site.phantom_seed, "z_mm": pair.site.z_mm,
               "psnr_low_db": round(psnr_low, 3), "psnr_denoised_db": round(psnr_out, 3),
               "psnr_gain_db": round(psnr_out - psnr_low, 3), "regions": {}}
        for name, mask in uniform_regions(spec):
            m = mask[0]
            low, full, den = pair.low_dose_hu[m], pair.full_dose_hu[m], out[m].astype(np.float64)
            acc = regions.setdefault(name, {"pixels": 0, "var_low": 0.0, "var_out": 0.0, "var_full": 0.0,
                                            "sum_shift": 0.0, "sum_shift_low": 0.0})
            n = int(m.sum())
            acc["pixels"] += n
            acc["var_low"] += n * float(low.var())
            acc["var_out"] += n * float(den.var())
            acc["var_full"] += n * float(full.var())
            acc["sum_shift"] += float((den - full).sum())
            acc["sum_shift_low"] += float((low - full.astype(np.float64)).sum())
            row["regions"][name] = {
                "pixels": n, "std_low_hu": round(float(low.std()), 3), "std_denoised_hu": round(float(den.std()), 3),
                "std_full_hu": round(float(full.std()), 3),
                "noise_std_reduction": round(1 - float(den.std()) / float(low.std()), 4),
                "mean_full_hu": round(float(full.mean()), 3),
                "mean_shift_hu": round(float(den.mean() - full.mean()), 3),
                "mean_shift_low_hu": round(float(low.mean() - full.mean()), 3)}
        slices.append(row)
    per_region = {}
    for name, acc in regions.items():
        n = acc["pixels"]
        std_low, std_out, std_full = (float(np.sqrt(acc[k] / n)) for k in ("var_low", "var_out", "var_full"))
        per_region[name] = {"pixels": n, "std_low_hu": round(std_low, 3), "std_denoised_hu": round(std_out, 3),
                            "std_full_hu": round(std_full, 3), "noise_std_reduction": round(1 - std_out / std_low, 4),
                            "mean_shift_hu": round(acc["sum_shift"] / n, 3),
                            "mean_shift_low_hu": round(acc["sum_shift_low"] / n, 3)}
    gains = [s["psnr_gain_db"] for s in slices]
    scored = [per_region[r] for r in SCORED_REGIONS if r in per_region]
    return {
        "regions": per_region,
        "slices": slices,
        "psnr_gain_db": {"mean": round(float(np.mean(gains)), 3), "min": round(float(np.min(gains)), 3)},
        # The card's three numbers: the worst scored region, and the mean PSNR gain over the slices.
        "card": {"noise_std_reduction": min(r["noise_std_reduction"] for r in scored),
                 "mean_shift_hu": max(abs(r["mean_shift_hu"]) for r in scored),
                 "psnr_gain_db": round(float(np.mean(gains)), 3)},
    }
