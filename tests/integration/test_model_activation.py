"""A model activated and rolled back on a running daemon (`appliance models`): the next series is
denoised by the active version, and every derived series says which one in DerivationDescription."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from appliance.config import ApplianceConfig, RouteRule
from appliance.dicom.assemble import assemble_series
from appliance.synth.study import write_synthetic_ct
from tests.integration.peers import daemon_with_console, storescu
from tests.unit.test_model_store import identity_model

pytestmark = pytest.mark.integration

SHAPE = (20, 128, 128)


def _models(daemon, *args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "appliance", "models", *args, "--config", str(daemon.config_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run


def test_activate_and_roll_back_on_a_running_daemon(cfg: ApplianceConfig, tmp_path: Path):
    cfg.routes = [RouteRule(modalities=["CT"], pipeline="denoise", destinations=["console"])]
    cfg.denoise.backend = "onnxruntime"
    with daemon_with_console(cfg, tmp_path, idle_seconds=1.0) as (daemon, peer):
        peer.start()
        daemon.start(timeout_s=60)
        got: list[Path] = []

        def study(seed: int):
            s = write_synthetic_ct(tmp_path / f"study-{seed}", shape_zyx=SHAPE, dose_fraction=0.25, seed=seed,
                                   slice_spacing_mm=1.0)
            assert storescu(daemon.cfg.node.port, s.paths).returncode == 0
            files = [f for f in peer.wait_for(len(got) + SHAPE[0], timeout_s=180) if f not in got]
            got.extend(files)
            versions = {pydicom.dcmread(f, stop_before_pixels=True).DerivationDescription for f in files}
            (vol,) = assemble_series(files, daemon.cfg.assembly).volumes
            return s, versions, vol.voxels[::-1]

        first, versions, out = study(1)
        assert len(versions) == 1 and versions.pop().endswith("+reference-redcnn-1.0.0")
        assert np.abs(out - first.hu).mean() > 1.0  # the reference model denoises

        _models(daemon, "install", str(identity_model(tmp_path / "model", "2.0.0")), "--activate")
        second, versions, out = study(2)
        assert len(versions) == 1 and versions.pop().endswith("+reference-redcnn-2.0.0")
        # The identity model gives back its input, to the derived series' integer rounding.
        assert np.abs(out - second.hu).max() <= 1.0

        assert "2.0.0 -> packaged" in _models(daemon, "rollback", "reference-redcnn").stdout
        _, versions, _ = study(3)
        assert len(versions) == 1 and versions.pop().endswith("+reference-redcnn-1.0.0")
        assert daemon.terminate() == 0

    changes = [line for line in daemon.logs() if line.get("event") == "pipeline.model_changed"]
    assert [c["current"].rsplit("+", 1)[1] for c in changes] == ["reference-redcnn-2.0.0", "reference-redcnn-1.0.0"]
    audit = [json.loads(line) for line in (cfg.storage.root / "models" / "audit.jsonl").read_text().splitlines()]
    assert [a["action"] for a in audit] == ["model.installed", "model.activated", "model.rolled_back"]
