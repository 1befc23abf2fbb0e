"""The model store (`engines.store`, `appliance models`): versions side by side, hash and signature
checked at install, activation and rollback recorded, the daemon's pipeline following the store."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from appliance.config import ApplianceConfig
from engines.card import file_sha256
from engines.store import PACKAGED, ModelStore, StoreError

REFERENCE = Path(__file__).resolve().parents[2] / "engines" / "models" / "reference-redcnn.toml"


def identity_model(folder: Path, version: str, name: str = "reference-redcnn") -> Path:
    """A model of the reference model's name whose output is its input (`engines.train.identity`)."""
    from engines.train.identity import write_identity_model

    return write_identity_model(folder, version, name)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_keys(d: Path) -> Path:
    """A CA, a signer it certifies, and a stranger's self-signed CA and signer, in ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    for who in ("ca", "stranger-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{who}.key", "-out", f"{who}.pem", "-days", "30", "-subj", f"/O=Test/CN={who}",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
                 cwd=d)
    for who, ca in (("signer", "ca"), ("stranger", "stranger-ca")):
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                 f"{who}.key", "-out", f"{who}.csr", "-subj", f"/O=Test/CN={who}", cwd=d)
        (d / f"{who}.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n")
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-out", f"{who}.pem", "-days", "30", "-extfile", f"{who}.ext", cwd=d)
    return d


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    return make_keys(tmp_path_factory.mktemp("keys"))


def sign(card: Path, keys: Path, who: str = "signer") -> Path:
    sig = card.with_name(card.name + ".sig")
    _openssl("cms", "-sign", "-binary", "-outform", "DER", "-in", str(card), "-signer", str(keys / f"{who}.pem"),
             "-inkey", str(keys / f"{who}.key"), "-out", str(sig), cwd=card.parent)
    return sig


def test_install_activate_rollback_side_by_side(tmp_path):
    store = ModelStore(tmp_path / "models")
    assert store.resolve("reference-redcnn").origin == "packaged"
    v2 = store.install(identity_model(tmp_path / "in", "2.0.0"))
    v3 = store.install(identity_model(tmp_path / "in3", "3.0.0"))
    assert (v2.version, v2.active, v3.active) == ("2.0.0", False, False)
    assert store.resolve("reference-redcnn").origin == "packaged"  # installed is not active

    assert store.activate("reference-redcnn", "2.0.0") == (PACKAGED, "2.0.0")
    now = store.resolve("reference-redcnn")
    assert (now.origin, now.version) == ("store", "2.0.0")
    assert now.card == tmp_path / "models" / "reference-redcnn" / "2.0.0" / "card.toml"
    assert store.activate("reference-redcnn", "3.0.0") == ("2.0.0", "3.0.0")
    assert store.rollback("reference-redcnn") == ("3.0.0", "2.0.0")
    assert store.rollback("reference-redcnn") == ("2.0.0", PACKAGED)
    assert store.resolve("reference-redcnn").card == REFERENCE.resolve()
    with pytest.raises(StoreError, match="nothing to roll back"):
        store.rollback("reference-redcnn")
    with pytest.raises(StoreError, match="not installed"):
        store.activate("reference-redcnn", "9.9.9")

    rows = {(r.name, r.version): r for r in store.rows()}
    assert set(rows) == {("reference-redcnn", PACKAGED), ("reference-redcnn", "2.0.0"), ("reference-redcnn", "3.0.0")}
    assert rows[("reference-redcnn", PACKAGED)].active
    assert rows[("reference-redcnn", "2.0.0")].installed_by and rows[("reference-redcnn", "2.0.0")].signer is None
    actions = [(a["action"], a.get("version"), a.get("previous")) for a in store.audit_lines()]
    assert actions == [("model.installed", "2.0.0", None), ("model.installed", "3.0.0", None),
                       ("model.activated", "2.0.0", PACKAGED), ("model.activated", "3.0.0", "2.0.0"),
                       ("model.rolled_back", "2.0.0", "3.0.0"), ("model.rolled_back", PACKAGED, "2.0.0")]
    assert all(a["actor"] and a["time"].endswith("Z") for a in store.audit_lines())


def test_an_installed_version_is_never_replaced(tmp_path):
    store = ModelStore(tmp_path / "models")
    card = identity_model(tmp_path / "a", "2.0.0")
    store.install(card)
    installed = (tmp_path / "models" / "reference-redcnn" / "2.0.0" / "card.toml").read_bytes()
    with pytest.raises(StoreError, match="already installed \\(same bytes\\)"):
        store.install(card)
    other = identity_model(tmp_path / "b", "2.0.0")
    other.write_text(other.read_text().replace("TEST ONLY", "TEST ONLY, other text"))
    with pytest.raises(StoreError, match="never replaced"):
        store.install(other)
    assert (tmp_path / "models" / "reference-redcnn" / "2.0.0" / "card.toml").read_bytes() == installed
    assert [a["action"] for a in store.audit_lines()] == ["model.installed", "model.install_refused",
                                                          "model.install_refused"]


def test_bad_models_are_refused_and_leave_nothing(tmp_path):
    store = ModelStore(tmp_path / "models")
    card = identity_model(tmp_path / "a", "2.0.0")
    onnx = card.with_name("reference-redcnn-2.0.0.onnx")
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    with pytest.raises(StoreError, match="does not match the card"):
        store.install(card)
    evil = identity_model(tmp_path / "b", "2.0.1")
    evil.write_text(evil.read_text().replace('name = "reference-redcnn"', 'name = "../../etc"'))
    with pytest.raises(StoreError, match="model name"):
        store.install(evil)
    long = identity_model(tmp_path / "c", "2.0.0-a-very-long-version-text-here")
    with pytest.raises(StoreError, match="DerivationDescription"):
        store.install(long)
    broken = identity_model(tmp_path / "d", "2.0.2")  # a graph that does not give (N, 1, H, W)
    import onnx as onnx_mod
    from onnx import helper

    model = onnx_mod.load(broken.with_name("reference-redcnn-2.0.2.onnx"))
    model.graph.node[0].op_type = "Concat"
    model.graph.node[0].attribute.append(helper.make_attribute("axis", 1))
    onnx_path = broken.with_name("reference-redcnn-2.0.2.onnx")
    onnx_mod.save(model, onnx_path)
    broken.write_text(broken.read_text().replace(tomllib.loads(broken.read_text())["sha256"], file_sha256(onnx_path)))
    with pytest.raises(StoreError):
        store.install(broken)
    folder = tmp_path / "models" / "reference-redcnn"
    assert not folder.exists() or sorted(p.name for p in folder.iterdir()) == []
    assert [a["action"] for a in store.audit_lines()] == ["model.install_refused"] * 4


def test_a_model_that_would_eat_into_the_spools_reserve_is_refused(tmp_path):
    import os

    st = os.statvfs(tmp_path)
    store = ModelStore(tmp_path / "models", reserve_bytes=st.f_bavail * st.f_frsize)  # all of it reserved
    with pytest.raises(StoreError, match="not enough space"):
        store.install(identity_model(tmp_path / "a", "2.0.0"))
    assert ModelStore(tmp_path / "models").install(identity_model(tmp_path / "b", "2.0.0")).version == "2.0.0"


def test_a_keyring_requires_a_signature_that_verifies(tmp_path, keys):
    store = ModelStore(tmp_path / "models", keyring=keys / "ca.pem")
    card = identity_model(tmp_path / "a", "2.0.0")
    with pytest.raises(StoreError, match="no signature"):
        store.install(card)
    sign(card, keys, "stranger")
    with pytest.raises(StoreError, match="does not verify"):
        store.install(card)
    sign(card, keys, "signer")
    card.write_text(card.read_text() + "\n# changed after signing\n")
    with pytest.raises(StoreError, match="does not verify"):
        store.install(card)
    card = identity_model(tmp_path / "b", "2.0.0")
    sign(card, keys, "signer")
    row = store.install(card, activate=True)
    assert row.active and "CN=signer" in row.signer
    folder = tmp_path / "models" / "reference-redcnn" / "2.0.0"
    assert (folder / "card.sig").read_bytes() == card.with_name(card.name + ".sig").read_bytes()
    assert json.loads((folder / "installed.json").read_text())["signature_checked"] is True
    assert [a["action"] for a in store.audit_lines()] == ["model.install_refused"] * 3 + ["model.installed",
                                                                                           "model.activated"]


def test_the_denoise_pipeline_follows_the_store(tmp_path):
    """What the worker asks before each job: the pipeline's model against what the store names now;
    the output of the new model, and its version in the pipeline's (DerivationDescription's) version."""
    from appliance.pipeline import stages

    cfg = ApplianceConfig()
    cfg.storage.root = tmp_path / "spool"
    cfg.denoise.backend = "onnxruntime"
    first = stages.build("denoise", cfg)
    assert first.version.endswith("+reference-redcnn-1.0.0") and first.wanted() == first.model
    cfg.model_store().install(identity_model(tmp_path / "in", "2.0.0"), activate=True)
    assert first.wanted() != first.model
    second = stages.build("denoise", cfg)
    assert second.version.endswith("+reference-redcnn-2.0.0") and second.wanted() == second.model
    from engines.tiling import denoise_volume

    hu = np.random.default_rng(0).normal(40, 30, (3, 64, 64)).astype(np.float32)
    stage = second.stages[0]
    np.testing.assert_allclose(denoise_volume(hu, stage.session, stage.card), hu, atol=1e-3)  # identity model
    before = first.stages[0]
    assert np.abs(denoise_volume(hu, before.session, before.card) - hu).mean() > 1.0  # the reference denoises


def test_cli_models_install_activate_list_rollback(tmp_path, keys):
    config = tmp_path / "appliance.toml"
    config.write_text(tomli_w.dumps({"storage": {"root": str(tmp_path / "spool")},
                                     "models": {"keyring": str(keys / "ca.pem")}}))
    card = identity_model(tmp_path / "in", "2.0.0")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "appliance", "models", *args, "--config", str(config)],
                              capture_output=True, text=True, timeout=120)

    refused = cli("install", str(card))
    assert refused.returncode == 2 and "no signature" in refused.stderr
    sign(card, keys)
    done = cli("install", str(card), "--activate")
    assert done.returncode == 0, done.stderr
    assert "installed and active" in done.stdout and "signed by" in done.stdout
    listing = cli("list")
    assert listing.returncode == 0
    lines = [line for line in listing.stdout.splitlines() if "reference-redcnn" in line]
    assert lines[0].startswith("  reference-redcnn  packaged") and lines[1].startswith("* reference-redcnn  2.0.0")
    verify = subprocess.run([sys.executable, "-m", "appliance", "engines", "verify", "--config", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and "reference-redcnn 2.0.0: OK" in verify.stdout, verify.stderr
    back = cli("rollback", "reference-redcnn")
    assert back.returncode == 0 and "2.0.0 -> packaged" in back.stdout
    again = cli("activate", "reference-redcnn", "2.0.0")
    assert again.returncode == 0 and "packaged -> 2.0.0" in again.stdout
