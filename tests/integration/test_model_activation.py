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


def test_a_series_streaming_when_a_model_is_activated_keeps_its_model(cfg: ApplianceConfig, tmp_path: Path):
    """Activated while a series streams through slab by slab: every slice of that series comes from
    the model it began with (a fallback to the batch path would have used the new one, and shown
    here); the next series gets the new one."""
    from tests.integration.test_stream_crash import PacedSender

    cfg.routes = [RouteRule(modalities=["CT"], pipeline="denoise", destinations=["console"])]
    cfg.denoise.backend = "onnxruntime"
    cfg.streaming.slab_slices = 8
    with daemon_with_console(cfg, tmp_path, idle_seconds=1.0) as (daemon, peer):
        peer.start()
        daemon.start(timeout_s=60)
        n = 40
        first = write_synthetic_ct(tmp_path / "first", shape_zyx=(n, 96, 96), dose_fraction=0.25, seed=4,
                                   slice_spacing_mm=1.0)
        sender = PacedSender(daemon.cfg.node.port, first.paths, gap_s=0.1)  # >= 4 s for the series
        sender.start()
        peer.wait_for(8, timeout_s=120)  # the first slab is out: the series is streaming
        _models(daemon, "install", str(identity_model(tmp_path / "model", "2.0.0")), "--activate")
        assert sender.is_alive(), "the series had all arrived before the activation: nothing was mid-stream"
        sender.join(timeout=120)
        files = peer.wait_for(n, timeout_s=180)
        versions = {pydicom.dcmread(f, stop_before_pixels=True).DerivationDescription for f in files}
        assert len(versions) == 1 and versions.pop().endswith("+reference-redcnn-1.0.0")

        second = write_synthetic_ct(tmp_path / "second", shape_zyx=(8, 96, 96), dose_fraction=0.25, seed=6,
                                    slice_spacing_mm=1.0)
        assert storescu(daemon.cfg.node.port, second.paths).returncode == 0
        later = [f for f in peer.wait_for(n + 8, timeout_s=180) if f not in files]
        versions = {pydicom.dcmread(f, stop_before_pixels=True).DerivationDescription for f in later}
        assert len(versions) == 1 and versions.pop().endswith("+reference-redcnn-2.0.0")
        assert daemon.terminate() == 0
