"""The image's slot logic (image-build/rootfs/usr/lib/appliance-image/slots), run on the host with
its EFI variables, state and audit files in a temporary folder: an update's trial boot, its commit,
and the rollback of a bad slot, as RAUC drives the backend. The boot test (image-build/boot_test.py)
shows the same in a booted image."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import struct
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "image-build" / "rootfs" / "usr" / "lib" / "appliance-image" / "slots"


@pytest.fixture
def slots(tmp_path, monkeypatch):
    loader = importlib.machinery.SourceFileLoader("appliance_image_slots", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    (tmp_path / "efivars").mkdir()
    monkeypatch.setattr(module, "EFIVARS", tmp_path / "efivars")
    monkeypatch.setattr(module, "STATE", tmp_path / "data" / "rauc" / "slots.json")
    monkeypatch.setattr(module, "AUDIT", tmp_path / "data" / "audit" / "slots.jsonl")
    module.boot = lambda slot: monkeypatch.setattr(module, "booted", lambda: slot)
    module.boot("a")
    return module


def _raw(slots, name: str) -> bytes:
    return (slots.EFIVARS / f"{name}-{slots.LOADER_GUID}").read_bytes()


def _audit(slots) -> list[dict]:
    return [json.loads(line) for line in slots.AUDIT.read_text().splitlines()]


def test_an_update_boots_once_on_trial_and_is_committed_when_healthy(slots, capsys):
    slots.backend("get-primary", [])
    assert capsys.readouterr().out.strip() == "a"
    slots.backend("set-primary", ["b"])  # RAUC wrote slot B
    assert slots.read_var("LoaderEntryOneShot") == "b.conf"
    raw = _raw(slots, "LoaderEntryOneShot")  # what efivarfs gets: attributes NV|BS|RT, then UTF-16 + NUL
    assert struct.unpack("<I", raw[:4])[0] == 7 and raw[4:] == "b.conf\0".encode("utf-16-le")
    assert slots.committed() == "a"  # a crash during the trial lands on A

    slots.boot("b")  # systemd-boot spent the one-shot entry
    (slots.EFIVARS / f"LoaderEntryOneShot-{slots.LOADER_GUID}").unlink()
    assert slots.committed() != slots.booted()  # this boot is a trial
    slots.backend("set-state", ["b", "good"])  # rauc status mark-good booted
    assert slots.committed() == "b"
    assert [e["event"] for e in _audit(slots)] == ["primary", "commit"]


def test_a_bad_trial_slot_rolls_back_to_the_committed_one(slots, capsys):
    slots.boot("b")
    slots.write_var("LoaderEntryDefault", "b.conf")
    slots.save({"primary": "b", "state": {"a": "good", "b": "good"}, "installed": []})
    slots.backend("set-primary", ["a"])  # a new bundle went into A
    assert slots.read_var("LoaderEntryOneShot") == "a.conf" and slots.committed() == "b"

    slots.boot("a")
    (slots.EFIVARS / f"LoaderEntryOneShot-{slots.LOADER_GUID}").unlink()
    slots.backend("set-state", ["a", "bad"])  # rauc status mark-bad booted, then the reboot
    assert slots.committed() == "b" and slots.read_var("LoaderEntryOneShot") is None
    state = json.loads(slots.STATE.read_text())
    assert state["primary"] == "b" and state["state"]["a"] == "bad"
    capsys.readouterr()  # the set-* operations' audit lines (RAUC reads only the get-* answers)
    slots.backend("get-primary", [])
    assert capsys.readouterr().out.strip() == "b"
    bad = _audit(slots)[-1]
    assert bad["event"] == "bad" and bad["slot"] == "a" and bad["next_boot"] == "b"


def test_marking_the_committed_slot_good_again_changes_nothing(slots):
    slots.write_var("LoaderEntryDefault", "a.conf")
    slots.backend("set-state", ["a", "good"])
    assert slots.committed() == "a" and slots.read_var("LoaderEntryOneShot") is None
    assert not slots.AUDIT.exists() or all(e["event"] != "commit" for e in _audit(slots))



def test_a_model_stick_installs_activates_and_rolls_back_signed_models(slots, tmp_path, monkeypatch):
    """models/*.toml on an APPUPDATE stick: a signed model is installed and made active, an unsigned
    one is refused, and the older card on a later stick makes that version active again."""
    import sys

    from engines.store import ModelStore
    from tests.unit.test_model_store import identity_model, make_keys, sign

    keys = make_keys(tmp_path / "keys")
    config = tmp_path / "appliance.toml"
    config.write_text(f'[storage]\nroot = "{tmp_path / "spool"}"\n')  # no keyring: the stick path sets it
    appliance = tmp_path / "appliance"
    appliance.write_text(f"#!/bin/sh\nexec {sys.executable} -m appliance \"$@\"\n")
    appliance.chmod(0o755)
    monkeypatch.setattr(slots, "APPLIANCE", str(appliance))
    monkeypatch.setattr(slots, "MODEL_KEYRING", keys / "ca.pem")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(config))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))

    stick = tmp_path / "stick"
    v2 = identity_model(stick / "models", "2.0.0")
    sign(v2, keys)
    identity_model(stick / "models", "2.1.0")  # not signed
    slots.models_from_media(stick, "/dev/sdz")
    store = ModelStore(tmp_path / "spool" / "models")
    assert store.resolve("reference-redcnn").version == "2.0.0"
    events = [(e["event"], e.get("version")) for e in _audit(slots)]
    assert events == [("model-activated", "2.0.0"), ("model-refused", "2.1.0")]
    assert "no signature" in _audit(slots)[-1]["reason"]

    later = tmp_path / "stick2"
    v3 = identity_model(later / "models", "3.0.0")
    sign(v3, keys)
    slots.models_from_media(later, "/dev/sdz")
    assert store.resolve("reference-redcnn").version == "3.0.0"
    slots.models_from_media(stick, "/dev/sdz")  # the first stick again: 2.0.0 back
    assert store.resolve("reference-redcnn").version == "2.0.0"
    slots.models_from_media(stick, "/dev/sdz")  # and again: nothing to do
    assert [e["event"] for e in _audit(slots)][-4:] == ["model-activated", "model-refused", "skip", "model-refused"]
    assert [a["action"] for a in store.audit_lines() if a["action"] != "model.install_refused"] == [
        "model.installed", "model.activated", "model.installed", "model.activated", "model.activated"]
