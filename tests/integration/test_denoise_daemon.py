"""A 300-slice 512x512 CT series goes through the daemon's denoise pipeline (CPU twin) and comes
back to dcmtk's storescp as a derived series, denoised."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import ApplianceConfig, RouteRule
from appliance.dicom.assemble import assemble_series
from appliance.synth.phantom import PhantomSpec, uniform_regions
from appliance.synth.study import write_synthetic_ct
from tests.integration.peers import daemon_with_console, storescu

pytestmark = pytest.mark.integration

SHAPE = (300, 512, 512)


@pytest.fixture
def setup(cfg: ApplianceConfig, tmp_path: Path):
    cfg.routes = [RouteRule(modalities=["CT"], pipeline="denoise", destinations=["console"])]
    cfg.denoise.backend = "onnxruntime"
    with daemon_with_console(cfg, tmp_path, idle_seconds=2.0) as pair:
        yield pair


def test_300_slices_of_512_come_back_denoised(tmp_path, setup):
    daemon, peer = setup
    study = write_synthetic_ct(tmp_path / "study", shape_zyx=SHAPE, dose_fraction=0.25, seed=21, slice_spacing_mm=1.0,
                               z_start_mm=150.0)
    peer.start()
    daemon.start(timeout_s=60)  # loads the model at start
    assert storescu(daemon.cfg.node.port, study.paths).returncode == 0
    files = peer.wait_for(SHAPE[0], timeout_s=900)
    (vol,) = assemble_series(files, daemon.cfg.assembly).volumes
    assert vol.shape == SHAPE
    denoised = vol.voxels[::-1]  # back to the study's slice order (it ascends toward the head)
    spec = PhantomSpec(shape_zyx=SHAPE, fov_mm=400.0, slice_spacing_mm=1.0, z_start_mm=150.0, seed=21)
    for name, mask in uniform_regions(spec):
        before, after = study.hu[mask].std(), denoised[mask].std()
        # Image-domain synthetic noise (not the FBP noise the model was trained on): a lower bar
        # than the model's own held-out test, which asserts the 40 % on its training distribution.
        assert after < 0.8 * before, f"{name}: noise std {before:.1f} -> {after:.1f} HU"
        assert abs(denoised[mask].mean() - study.hu[mask].mean()) < 5.0, name
    assert daemon.terminate() == 0
