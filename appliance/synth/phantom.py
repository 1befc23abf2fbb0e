"""Deterministic, resolution-independent 3-D anatomical CT phantom (adult thorax / upper abdomen) in HU.

Conventions (all lengths in mm, arrays indexed ``[z, y, x]`` = slice, row, column):

* Patient supine on the table, head first.  Column index (x) increases toward the patient's
  LEFT, row index (y) increases toward the patient's BACK (anterior -> posterior), slice index
  (z) increases toward the FEET (superior -> inferior).
* Voxel centres: ``x = (i + 0.5 - nx/2) * ps``, ``y = (j + 0.5 - ny/2) * ps`` (the FOV centre is
  (0, 0); ``ps`` = ``pixel_spacing_mm`` or ``fov_mm / columns``), ``z = z_start_mm + k * slice_spacing_mm``.
* Anatomical z layout (``Z_LAYOUT_MM``, seed 0; seeds move it by a few mm): z = 0 at the lung
  apex; carina ~95; hila ~122; heart ~110-210; diaphragm dome ~185 (right) / ~197 (left)
  centrally, deeper laterally/posteriorly, so lungs span ~0-240 (recesses at most 255);
  liver ~185-345; spleen ~200-285; stomach ~200-290; gallbladder ~265-325; pancreas ~275-300;
  kidneys ~245-365; colon below ~300.  Vertebrae every 22-32 mm along z with discs between
  them; 12 rib pairs starting at z ~12 posteriorly, each sloping 85 mm down to its anterior end.
  A default 64-slice x 2.5 mm slab from z = 0 is thorax only; start at ~180 for liver/kidneys.
  Outside ~-100..500 the body just continues (profiles clamped).
* HU (see ``anatomy._TISSUES``): air -1000, fat -100, muscle +50, mediastinum +40, lung -850,
  lung vessels +40, blood pool with arterial contrast (aorta, left heart, pulmonary arteries)
  +200, right heart / venae cavae +120, liver +60, spleen +50, kidneys +30, vertebral cortex
  +1000 / trabecular +250, posterior elements +800, discs +80, canal +20, ribs +900 / +300,
  table +200.  Three liver lesions (8-15 mm spheres, -20..-10 or +10..+20 HU) placed by the seed.
* The seed perturbs body size, dome heights and organ positions/sizes by a few % (a few mm),
  vessel directions and the vertebra phase, and places the lesions; same spec -> identical output.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from appliance.synth import anatomy as _an

HU_MIN, HU_MAX = -1024.0, 3071.0
LABELS = _an.LABELS
MID_THORAX_Z_MM = 130.0  # a slice through both lungs, hila and heart
LIVER_Z_MM = 275.0       # a slice through liver, spleen, stomach, kidneys
Z_LAYOUT_MM = {"lungs": (0.0, 240.0), "heart": (110.0, 210.0), "liver": (185.0, 345.0),
               "spleen": (200.0, 285.0), "kidneys": (245.0, 365.0), "anatomy": (0.0, 350.0)}
# Centres (z, y, x) mm of ROIs inside one tissue for every seed (verified for seeds 0-59 at 64-512 px;
# the tests check a few seeds), radii mm.  "spine" is a search region, not a uniform ROI.
ROI_CENTRES_MM: dict[str, tuple[float, float, float]] = {
    "lung": _an.LUNG_ROI[0],
    "liver": _an.LIVER_ROI[0],
    "muscle": (300.0, 93.0, -42.0),
    "fat": (LIVER_Z_MM, -106.0, 0.0),
    "air": (MID_THORAX_Z_MM, -170.0, 0.0),
    "spine": (MID_THORAX_Z_MM, 52.0, 0.0),  # vertebral body centre (bone or disc)
}
ROI_RADII_MM = {"lung": _an.LUNG_ROI[1], "liver": _an.LIVER_ROI[1], "muscle": 8.0, "fat": 5.0, "air": 15.0,
                "spine": 10.0}
UNIFORM_REGION_LABELS = {"liver": "liver", "muscle": "muscle", "fat": "fat", "lung": "lung"}


@dataclass(frozen=True)
class PhantomSpec:
    shape_zyx: tuple[int, int, int]  # slices, rows, columns
    pixel_spacing_mm: float = 0.0    # in-plane mm; 0 => fov_mm / columns
    fov_mm: float = 400.0            # in-plane field of view (square), mm
    slice_spacing_mm: float = 2.5    # along z (toward the feet), mm
    z_start_mm: float = 0.0          # anatomical z of slice 0 (0 = lung apex)
    seed: int = 0

    def __post_init__(self):
        if len(self.shape_zyx) != 3 or min(self.shape_zyx) < 1:
            raise ValueError(f"shape_zyx must be 3 positive ints, got {self.shape_zyx}")
        if self.fov_mm <= 0 or self.slice_spacing_mm <= 0 or self.pixel_spacing_mm < 0:
            raise ValueError("fov_mm and slice_spacing_mm must be > 0, pixel_spacing_mm >= 0")

    @property
    def pixel_mm(self) -> float:
        return float(self.pixel_spacing_mm) if self.pixel_spacing_mm > 0 else self.fov_mm / self.shape_zyx[2]


def voxel_centres_mm(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D voxel-centre coordinates (z, y, x) in mm (conventions in the module docstring)."""
    nz, ny, nx = spec.shape_zyx
    ps = spec.pixel_mm
    return (spec.z_start_mm + np.arange(nz) * spec.slice_spacing_mm,
            (np.arange(ny) + 0.5 - ny / 2) * ps, (np.arange(nx) + 0.5 - nx / 2) * ps)


@lru_cache(maxsize=16)
def _anatomy(seed: int) -> _an.Anatomy:
    return _an.build_anatomy(seed)


def _render(spec: PhantomSpec, want_labels: bool):
    zs, ys, xs = voxel_centres_mm(spec)
    an = _anatomy(int(spec.seed))
    hu = np.empty(spec.shape_zyx, np.float32)
    lab = np.empty(spec.shape_zyx, np.uint8) if want_labels else None
    for k, z in enumerate(zs):
        c = _an.Canvas(xs, ys, float(z))
        _an.paint_slice(an, c)
        hu[k] = c.hu
        if want_labels:
            lab[k] = c.lab
    np.clip(np.rint(hu, out=hu), HU_MIN, HU_MAX, out=hu)
    return hu, lab


def ct_phantom_hu(spec: PhantomSpec) -> np.ndarray:
    """float32 array (z, y, x) of HU values, integer-valued (already rounded), clipped to [-1024, 3071]."""
    return _render(spec, False)[0]


def phantom_labels(spec: PhantomSpec) -> np.ndarray:
    """uint8 tissue-label volume (z, y, x) matching ``ct_phantom_hu``; ids in ``LABELS``."""
    return _render(spec, True)[1]


def liver_lesions(spec: PhantomSpec) -> list[dict]:
    """The seed's liver lesions: ``centre_zyx_mm``, ``radius_mm``, ``contrast_hu`` (vs liver)."""
    return [{"centre_zyx_mm": (float(p[2]), float(p[1]), float(p[0])), "radius_mm": r, "contrast_hu": float(c)}
            for p, r, c in _anatomy(int(spec.seed)).lesions]


def roi_mask(spec: PhantomSpec, roi: str | tuple[float, float, float], radius_mm: float | None = None) -> np.ndarray:
    """Boolean (z, y, x) mask of the ball of ``radius_mm`` (default ``ROI_RADII_MM``) around a named
    ROI (``ROI_CENTRES_MM``) or around a (z, y, x) centre in mm."""
    cz, cy, cx = ROI_CENTRES_MM[roi] if isinstance(roi, str) else roi
    r = ROI_RADII_MM[roi] if radius_mm is None else radius_mm
    zs, ys, xs = voxel_centres_mm(spec)
    return ((zs[:, None, None] - cz) ** 2 + (ys[None, :, None] - cy) ** 2 + (xs[None, None, :] - cx) ** 2) <= r * r


def _erode(mask: np.ndarray, radii: tuple[int, int, int]) -> np.ndarray:
    """Separable box erosion by ``radii`` voxels per axis; the volume's own borders do not erode."""
    for axis, r in enumerate(radii):
        src = mask
        mask = src.copy()
        m, s0 = np.moveaxis(mask, axis, -1), np.moveaxis(src, axis, -1)
        for s in range(1, min(r, m.shape[-1] - 1) + 1):
            m[..., s:] &= s0[..., :-s]
            m[..., :-s] &= s0[..., s:]
    return mask


def uniform_regions(spec: PhantomSpec, margin_mm: float = 3.0) -> list[tuple[str, np.ndarray]]:
    """[(name, bool mask zyx)] of uniform regions: liver, muscle (body wall / paraspinal / psoas),
    subcutaneous fat and lung parenchyma, each eroded by ``margin_mm`` (box, in voxels rounded up)
    away from any other tissue (vessels, lesions, bone, organ edges).  Empty regions are left out."""
    lab = phantom_labels(spec)
    ps = spec.pixel_mm
    radii = (int(np.ceil(margin_mm / spec.slice_spacing_mm - 1e-9)),) + (int(np.ceil(margin_mm / ps - 1e-9)),) * 2
    out = []
    for name, tissue in UNIFORM_REGION_LABELS.items():
        m = _erode(lab == LABELS[tissue], radii)
        if m.any():
            out.append((name, m))
    return out


def ct_noise_filter(shape_yx: tuple[int, int], pixel_spacing_mm: float, cutoff_cyc_per_mm: float = 0.7) -> np.ndarray:
    """rfft2-layout amplitude filter whose noise power spectrum is |f| * Hann(f / cutoff)
    (ramp x apodisation, zero at DC, peak ~0.29 cycles/mm), normalised to unit output variance."""
    ny, nx = shape_yx
    f = np.hypot(np.fft.fftfreq(ny, pixel_spacing_mm)[:, None], np.fft.fftfreq(nx, pixel_spacing_mm)[None, :])
    nps = f * np.where(f < cutoff_cyc_per_mm, 0.5 * (1 + np.cos(np.pi * f / cutoff_cyc_per_mm)), 0.0)
    if not nps.any():  # 1x1 image: no non-DC frequencies
        nps[...] = 1.0
    amp = np.sqrt(nps / nps.mean())  # output variance = mean(|H|^2) = 1
    return amp[:, : nx // 2 + 1]


def low_dose_noise_hu(clean_hu: np.ndarray, dose_fraction: float, seed: int, pixel_spacing_mm: float,
                      full_dose_sigma_hu: float = 8.0) -> np.ndarray:
    """Returns integer-valued float32 HU volume = clean + noise (clipped to [-1024, 3071]).
    dose_fraction in (0, 1]; 1.0 means the full-dose reference noise level.

    Noise: white Gaussian shaped per slice (independently) by a ramp-like 2-D noise power
    spectrum (``ct_noise_filter``, defined in cycles/mm so the texture is the same at any
    pixel size), stationary (same std inside and outside the body) with std
    ``full_dose_sigma_hu / sqrt(dose_fraction)`` before rounding and clipping (clipping at
    -1024 lowers the std in air slightly).  Zero mean per slice.  Deterministic in ``seed``.
    Accepts (z, y, x) or a single (y, x) slice.
    """
    if not 0.0 < dose_fraction <= 1.0:
        raise ValueError(f"dose_fraction must be in (0, 1], got {dose_fraction}")
    clean = np.asarray(clean_hu, dtype=np.float32)
    vol = clean[None] if clean.ndim == 2 else clean
    if vol.ndim != 3:
        raise ValueError(f"clean_hu must be 2-D or 3-D, got shape {clean.shape}")
    sigma = full_dose_sigma_hu / np.sqrt(dose_fraction)
    ny, nx = vol.shape[1:]
    filt = ct_noise_filter((ny, nx), pixel_spacing_mm) * sigma
    rng = np.random.default_rng(seed)
    out = np.empty(vol.shape, np.float32)
    for k in range(vol.shape[0]):
        white = rng.standard_normal((ny, nx))
        out[k] = vol[k] + np.fft.irfft2(np.fft.rfft2(white) * filt, s=(ny, nx))
    np.clip(np.rint(out, out=out), HU_MIN, HU_MAX, out=out)
    return out[0] if clean.ndim == 2 else out
