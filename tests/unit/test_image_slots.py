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
