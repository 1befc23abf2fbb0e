"""``appliance diag`` after a study went through the daemon: the bundle has the logs, the state and the
configuration, and none of the study's patient data or UIDs."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pydicom
import pytest

from appliance.config import ApplianceConfig, RouteRule
from appliance.diag import Scrubber
from appliance.synth.study import write_synthetic_ct
from tests.integration.peers import daemon_with_console, storescu

pytestmark = pytest.mark.integration


def test_scrubber_keeps_what_a_vendor_needs_and_removes_patient_data():
    s = Scrubber(key=b"k" * 32)
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    line = json.dumps({"event": "job.failed", "series_uid": uid, "detail": f"spool/series/{uid}/0001.dcm: bad",
                       "patient_name": "DOE^JANE", "PatientID": "12345", "peer": "10.0.2.2", "version": "0.1.0",
                       "ae": "CT_SCANNER"})
    out = json.loads(s.line(line))
    token = out["series_uid"]
    assert token.startswith("uid:") and len(token) == 16 and uid not in json.dumps(out)
    assert out["detail"] == f"spool/series/{token}/0001.dcm: bad"  # the same UID, the same token
    assert out["patient_name"] == "[removed]" and out["PatientID"] == "[removed]"
    assert (out["peer"], out["version"], out["ae"]) == ("10.0.2.2", "0.1.0", "CT_SCANNER")
    assert s.line("received DOE^JANE^Q from CT_SCANNER") == "received [name removed] from CT_SCANNER"
    assert Scrubber().text(uid) != token  # another bundle, another key: tokens do not match across bundles


def test_a_diagnostic_bundle_after_a_study_holds_no_patient_data(cfg: ApplianceConfig, tmp_path: Path):
    cfg.routes = [RouteRule(modalities=["CT"], pipeline="passthrough", destinations=["console"])]
    with daemon_with_console(cfg, tmp_path, idle_seconds=1.0) as (daemon, peer):
        peer.start()
        daemon.start(timeout_s=60)
        study = write_synthetic_ct(tmp_path / "study", shape_zyx=(12, 64, 64), seed=5)
        assert storescu(daemon.cfg.node.port, study.paths).returncode == 0
        received = peer.wait_for(12, timeout_s=120)
        assert daemon.terminate() == 0

    secrets: set[str] = set()
    for path in [*study.paths, *received]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        secrets |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.PatientID),
                    str(ds.PatientName)}
    secrets.discard("")
    log_text = daemon.log_path.read_text()
    assert str(pydicom.dcmread(study.paths[0]).SeriesInstanceUID) in log_text  # the logs do name the series

    out = tmp_path / "diag.tar.gz"
    res = subprocess.run([sys.executable, "-m", "appliance", "diag", "--config", str(daemon.config_path), "--out",
                          str(out), "--log", str(daemon.log_path), "--no-journal"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout
    with tarfile.open(out) as tar:
        names = tar.getnames()
        contents = {n.split("/", 1)[1]: tar.extractfile(n).read().decode() for n in names if tar.getmember(n).isfile()}
    assert {"README.txt", "system.json", "config.toml", "state.json", "models.txt"} <= set(contents)
    assert any(n.startswith("logs/") for n in contents)
    everything = "\n".join(contents.values())
    found = sorted(s for s in secrets if s in everything)
    assert not found, f"patient data or UIDs in the bundle: {found}"
    state = json.loads(contents["state.json"])
    assert state["jobs_by_pipeline"] == {"passthrough": 1} and sum(state["series_by_state"].values()) == 1
    log = next(v for k, v in contents.items() if k.startswith("logs/"))
    assert "uid:" in log and len(log.splitlines()) == len(log_text.splitlines())
    system = json.loads(contents["system.json"])
    assert system["appliance"] and system["packages"]["pydicom"]
    assert "uids_tokenised" in contents["README.txt"]
