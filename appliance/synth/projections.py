"""Synthetic CT projection data: the phantom projected by the project's own projector (host twin),
low-dose noise simulated in the projection domain, written as DICOM-CT-PD (one instance per view).

Used by ``appliance synth ct-pd``, the recon tests and the benchmarks. Deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.synth.phantom import PhantomSpec, ct_phantom_hu
from kernels.ctpd import write_ctpd
from kernels.geometry import ProjectionGeometry, VolumeGrid
from kernels.host import HostProjector
from kernels.simulate import MU_WATER_PER_MM, hu_to_mu, noiseless_scan, simulate_scan

FULL_DOSE_PHOTONS = 2e5  # incident photons per detector element per view at full dose


@dataclass(frozen=True)
class SyntheticProjections:
    paths: list[Path]
    hu: np.ndarray  # (z, y, x) the phantom that was projected, on `grid` (z ascending = toward the head)
    grid: VolumeGrid  # scanner frame
    geometry: ProjectionGeometry
    study_uid: str
    series_uid: str


def scan_geometry(shape_zyx: tuple[int, int, int], fov_mm: float, slice_mm: float, n_views: int) -> ProjectionGeometry:
    """A third-generation scanner (sod 570 mm, sdd 1040 mm, curved detector) with enough columns
    for the field of view and enough rows for the slab, on a circular orbit."""
    sod, sdd = 570.0, 1040.0
    n_cols = 2 * shape_zyx[2]
    du = fov_mm * 1.15 * sdd / sod / n_cols  # columns cover the FOV with 15 % margin
    slab = shape_zyx[0] * slice_mm
    dv = slice_mm * sdd / sod
    n_rows = int(np.ceil(slab * 1.1 * sdd / sod / dv)) + 2  # rows cover the slab where it is widest
    return ProjectionGeometry.cone(n_views, n_cols, n_rows, du, dv, sod, sdd, "curved")


def write_synthetic_projections(
    out: Path,
    shape_zyx: tuple[int, int, int] = (8, 128, 128),
    dose_fraction: float | None = 0.25,
    seed: int = 0,
    fov_mm: float = 400.0,
    slice_mm: float = 2.5,
    n_views: int = 360,
    uid_root: str = "1.2.826.0.1.3680043.8.498.",
    z_start_mm: float = 250.0,
) -> SyntheticProjections:
    """Project the phantom slab and write it as DICOM-CT-PD; ``dose_fraction`` None: noiseless."""
    # The phantom's slice index runs toward the feet; scanner (and patient) +z points to the head.
    hu = ct_phantom_hu(PhantomSpec(shape_zyx=shape_zyx, fov_mm=fov_mm, slice_spacing_mm=slice_mm,
                                   z_start_mm=z_start_mm, seed=seed))[::-1].copy()
    grid = VolumeGrid(shape_zyx, (slice_mm, fov_mm / shape_zyx[2], fov_mm / shape_zyx[1]))
    geom = scan_geometry(shape_zyx, fov_mm, slice_mm, n_views)
    line_integrals = HostProjector(geom, grid).forward(hu_to_mu(hu).astype(np.float32))
    if dose_fraction is None:
        scan = noiseless_scan(line_integrals, FULL_DOSE_PHOTONS)
    else:
        scan = simulate_scan(line_integrals, FULL_DOSE_PHOTONS * dose_fraction, 10.0, seed=seed + 1)
    dose_text = "noiseless" if dose_fraction is None else f"{dose_fraction:g}"
    seed_text = f"appliance-synth-ctpd/{seed}/{shape_zyx}/{fov_mm}/{slice_mm}/{n_views}/{dose_text}"
    paths = write_ctpd(
        Path(out), scan.line_integrals.astype(np.float32), geom, uid_root=uid_root, seed_text=seed_text,
        study={"PatientName": "SYNTHETIC^PHANTOM", "PatientID": f"SYN-{seed:04d}",
               "SeriesDescription": f"Synthetic projection data, dose {dose_text}", "Modality": "CT"},
        water_mu=MU_WATER_PER_MM, counts=scan.counts.mean(axis=1).astype(np.float32),
    )
    import pydicom

    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return SyntheticProjections(paths, hu, grid, geom, str(first.StudyInstanceUID), str(first.SeriesInstanceUID))
