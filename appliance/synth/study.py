"""Synthetic CT studies: the phantom rendered, optionally made low-dose, written as a CT series.

Used by ``appliance synth ct``, the tests, ``make demo`` and the benchmarks. Deterministic: the
same arguments give the same files, bytes and UIDs included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import UID

from appliance.synth.phantom import PhantomSpec, ct_phantom_hu, low_dose_noise_hu
from appliance.synth.series import SeriesSpec, axial_geometry, study_uids, write_ct_series
from appliance.volume import Geometry


@dataclass(frozen=True)
class SyntheticStudy:
    paths: list[Path]  # in slice order (slice 0 is the most superior)
    hu: np.ndarray  # (z, y, x): exactly the HU values written (after rounding and clipping)
    geometry: Geometry
    study_uid: str
    series_uid: str


def write_synthetic_ct(
    out: Path,
    shape_zyx: tuple[int, int, int] = (64, 512, 512),
    dose_fraction: float | None = None,
    seed: int = 0,
    fov_mm: float = 400.0,
    slice_spacing_mm: float = 2.5,
    uid_root: str = "1.2.826.0.1.3680043.8.498.",
    transfer_syntax: str = "1.2.840.10008.1.2.1",
    signed: bool = False,
    z_start_mm: float = 0.0,
) -> SyntheticStudy:
    """Render the phantom (HU), add low-dose noise when ``dose_fraction`` is given, write the series.

    ``dose_fraction`` in (0, 1]: noise of a scan at that fraction of the full dose (1.0 = full-dose
    noise); None writes the noiseless phantom.
    """
    pixel_mm = fov_mm / shape_zyx[2]
    spec = PhantomSpec(
        shape_zyx=shape_zyx, pixel_spacing_mm=pixel_mm, fov_mm=fov_mm,
        slice_spacing_mm=slice_spacing_mm, z_start_mm=z_start_mm, seed=seed,
    )
    hu = ct_phantom_hu(spec)
    if dose_fraction is not None:
        hu = low_dose_noise_hu(hu, dose_fraction, seed=seed + 1, pixel_spacing_mm=pixel_mm)
    dose_text = "noiseless" if dose_fraction is None else f"{dose_fraction:g}"
    series_spec = SeriesSpec(
        uid_root=uid_root,
        seed_text=f"appliance-synth-ct/{seed}/{shape_zyx}/{fov_mm}/{slice_spacing_mm}/{dose_text}",
        rescale_intercept=0.0 if signed else -1024.0,
        signed=signed,
        transfer_syntax=UID(transfer_syntax),
        series_description=f"Synthetic CT, dose {dose_text}",
        dose_fraction=1.0 if dose_fraction is None else dose_fraction,
        patient_id=f"SYN-{seed:04d}",
    )
    # Anatomy z = 0 at the top slice; patient z (LPS, +z to the head) decreases toward the feet.
    geometry = axial_geometry(shape_zyx, pixel_mm, slice_spacing_mm, top_z_mm=-z_start_mm)
    paths = write_ct_series(hu, Path(out), geometry, series_spec)
    study_uid, series_uid, _ = study_uids(series_spec)
    return SyntheticStudy(paths=paths, hu=hu, geometry=geometry, study_uid=study_uid, series_uid=series_uid)
