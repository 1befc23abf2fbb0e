"""The ``recon`` pipeline: CT projection data (DICOM-CT-PD) -> a CT volume in HU.

The reconstruction grid is in the scanner frame (isocentre at the origin, z along the rotation
axis), centred on the scanned range. The output volume takes it as patient coordinates (LPS)
unchanged: right for the project's own simulated data; real scanners' table position and
patient orientation are a later step (noted on the issue).
"""

from __future__ import annotations

import numpy as np

from appliance import __version__
from appliance.config import ReconConfig
from appliance.logging import get_logger
from appliance.pipeline.stages import Pipeline, StageError
from appliance.volume import Geometry, SeriesRef, Volume
from kernels.geometry import VolumeGrid
from kernels.host import HostProjector
from kernels.recon.fbp import fbp
from kernels.recon.pwls import pwls_tv
from kernels.recon.sart import os_sart
from kernels.simulate import MU_WATER_PER_MM

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
log = get_logger(__name__)


def recon_grid(projections, cfg: ReconConfig) -> VolumeGrid:
    """Slices at the detector row pitch (at the isocentre), as many as the detector covers across
    the whole field of view, centred on the scanned z range."""
    geom = projections.geometry
    det = geom.detector
    slice_mm = cfg.slice_mm or det.dv * geom.sod / geom.sdd
    if cfg.slices is not None:
        n_slices = cfg.slices
    else:
        covered = det.n_v * det.dv * (geom.sod - cfg.fov_mm / 2) / geom.sdd
        n_slices = max(1, int(np.floor(covered / slice_mm)))
    pixel = cfg.fov_mm / cfg.matrix
    z_centre = float(np.mean(geom.source_z))
    origin = (-(cfg.matrix - 1) / 2 * pixel, -(cfg.matrix - 1) / 2 * pixel, z_centre - (n_slices - 1) / 2 * slice_mm)
    return VolumeGrid((n_slices, cfg.matrix, cfg.matrix), (slice_mm, pixel, pixel), origin)


class Reconstruct:
    """Projections -> attenuation -> HU, by FDK, OS-SART or PWLS-TV (host twin)."""

    name = "recon"

    def __init__(self, cfg: ReconConfig) -> None:
        self.cfg = cfg

    def __call__(self, projections) -> Volume:
        if not hasattr(projections, "geometry") or not hasattr(projections, "data"):
            raise StageError(self.name, "not_projection_data", "the recon pipeline takes CT projection data")
        grid = recon_grid(projections, self.cfg)
        y = np.ascontiguousarray(projections.data, dtype=np.float32)
        if self._use_gpu():
            try:
                from kernels.gpu import GpuProjector

                x = self._reconstruct(GpuProjector(projections.geometry, grid), projections, y)
                return self._finish(projections, grid, x, "gpu")
            except Exception as exc:  # DESIGN's failure policy: fall back to the CPU twin, say so
                if self.cfg.backend == "gpu":
                    raise StageError(self.name, "gpu_error", f"{type(exc).__name__}: {exc}") from exc
                log.warning("recon.gpu_failed", error=f"{type(exc).__name__}: {exc}", fallback="host twin")
        x = self._reconstruct(HostProjector(projections.geometry, grid), projections, y)
        return self._finish(projections, grid, x, "host twin")

    def _use_gpu(self) -> bool:
        if self.cfg.backend == "cpu":
            return False
        from kernels import gpu

        return self.cfg.backend == "gpu" or gpu.available()

    def _reconstruct(self, op, projections, y: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        x = fbp(y, op, window=cfg.window)
        if cfg.algorithm == "os-sart":
            x, _ = os_sart(y, op, n_iter=cfg.iterations, n_subsets=cfg.subsets * 2, x0=x)
        elif cfg.algorithm == "pwls-tv":
            x, _ = pwls_tv(y, self._weights(projections, y), op, beta=cfg.beta, eps=cfg.tv_eps_per_mm,
                           n_iter=cfg.iterations, n_subsets=cfg.subsets, x0=x)
        return op.to_host(x)

    def _finish(self, projections, grid: VolumeGrid, x: np.ndarray, backend: str) -> Volume:
        mu_water = projections.water_mu or MU_WATER_PER_MM
        hu = (x / mu_water - 1.0) * 1000.0
        volume = self._volume(projections, grid, hu.astype(np.float32))
        volume.provenance.append(f"{self.cfg.algorithm} on the {backend}")
        return volume

    @staticmethod
    def _weights(projections, y: np.ndarray) -> np.ndarray:
        """Statistical weights, proportional to the detected counts: from the photon statistics
        when the data carry them (per view and column), else from the line integrals."""
        transmission = np.exp(-y)
        if projections.counts is not None and projections.counts.shape == (y.shape[0], y.shape[2]):
            incident = projections.counts.astype(np.float64)
            # counts recorded per view/column are the mean detected counts: rescale per ray
            scale = incident / np.maximum(transmission.mean(axis=1), 1e-12)
            weights = transmission * scale[:, None, :]
            return (weights / max(float(weights.max()), 1e-12)).astype(np.float32)
        return transmission.astype(np.float32)

    @staticmethod
    def _volume(projections, grid: VolumeGrid, hu: np.ndarray) -> Volume:
        header = projections.header.copy() if projections.header is not None else None
        dz, dy, dx = grid.spacing_zyx
        geometry = Geometry(origin=grid.origin.astype(np.float64), axes=np.array([[0.0, 0, 1], [0, 1, 0], [1, 0, 0]]),
                            spacing_zyx=(dz, dy, dx))
        source = SeriesRef(
            study_uid=str(header.StudyInstanceUID) if header is not None else "",
            series_uid=str(header.SeriesInstanceUID) if header is not None else "",
            modality="CT",
            sop_class_uid=str(header.get("SOPClassUID", CT_IMAGE_STORAGE)) if header is not None else CT_IMAGE_STORAGE,
            sop_instance_uids=tuple(projections.source_sop_uids),
        )
        if header is not None:
            header.Modality = "CT"
        return Volume(hu, geometry, "HU", source, header=header, label="",
                      provenance=[f"reconstructed from {projections.data.shape[0]} views"])


def recon_pipeline(cfg) -> Pipeline:
    recon_cfg = cfg.recon if cfg is not None else ReconConfig()
    return Pipeline(f"recon-{recon_cfg.algorithm}", __version__, [Reconstruct(recon_cfg)])
