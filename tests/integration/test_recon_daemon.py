"""A DICOM-CT-PD study sent to the daemon comes back as a reconstructed CT series (dcmtk peers)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from appliance.config import ApplianceConfig
from appliance.dicom.assemble import assemble_series
from appliance.synth.phantom import PhantomSpec, uniform_regions
from appliance.synth.projections import write_synthetic_projections
from tests.integration.peers import daemon_with_console, storescu

pytestmark = pytest.mark.integration

SHAPE = (8, 96, 96)


@pytest.fixture
def setup(cfg: ApplianceConfig, tmp_path: Path):
    cfg.recon.matrix, cfg.recon.slices, cfg.recon.slice_mm = SHAPE[1], SHAPE[0], 2.5
    cfg.recon.iterations = 8
    with daemon_with_console(cfg, tmp_path, idle_seconds=1.5) as pair:
        yield pair


def test_projection_data_in_reconstructed_ct_series_out(tmp_path, setup):
    daemon, peer = setup
    study = write_synthetic_projections(tmp_path / "ctpd", shape_zyx=SHAPE, dose_fraction=0.25, n_views=240, seed=4)
    peer.start()
    daemon.start()
    assert storescu(daemon.cfg.node.port, study.paths).returncode == 0
    files = peer.wait_for(SHAPE[0], timeout_s=240)
    received = [pydicom.dcmread(p) for p in files]
    assert {str(ds.SOPClassUID) for ds in received} == {"1.2.840.10008.5.1.4.1.1.2"}
    assert {ds.StudyInstanceUID for ds in received} == {study.study_uid}
    assert all(ds.Modality == "CT" and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] for ds in received)
    (vol,) = assemble_series(files, daemon.cfg.assembly).volumes
    assert vol.shape == SHAPE and vol.units == "HU"
    assert vol.geometry.spacing_zyx == pytest.approx((2.5, 400 / SHAPE[1], 400 / SHAPE[2]), rel=1e-4)
    # The reconstruction lands on the phantom: each uniform region's mean within 10 HU of truth
    # (8 PWLS-TV iterations of quarter-dose data on a 4 mm grid), slices in the right z order.
    spec = PhantomSpec(shape_zyx=SHAPE, fov_mm=400, slice_spacing_mm=2.5, z_start_mm=250.0, seed=4)
    for name, mask in uniform_regions(spec):
        mask = mask[::-1]  # phantom slices run toward the feet; the volume ascends toward the head
        assert abs(vol.voxels[mask].mean() - study.hu[mask].mean()) <= 10.0, name
    assert daemon.terminate() == 0
