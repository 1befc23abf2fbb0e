"""`appliance engines verify | build | list`, as a field engineer runs them."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from tests.onnx_helpers import make_card, make_conv_net, needs_onnx


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", "engines", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def _model(tmp_path: Path, channels: int = 1, context_slices: int = 0) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    onnx_path = make_conv_net(tmp_path / "net.onnx", channels=channels)
    card = make_card(onnx_path, context_slices=context_slices)
    card_path = tmp_path / "net.toml"
    card_path.write_text(tomli_w.dumps(card.model_dump(mode="json", exclude_none=True)))
    return card_path


@needs_onnx
def test_verify_accepts_a_good_model_and_names_what_is_wrong_with_a_bad_one(tmp_path):
    good = _model(tmp_path / "good")
    res = _cli("verify", "--model", good)
    assert res.returncode == 0 and "OK" in res.stdout and "NOT for clinical use" in res.stdout
    res = _cli("verify", "--model", tmp_path / "nowhere.toml")
    assert res.returncode == 2 and "no model card" in res.stderr
    mismatch = _model(tmp_path / "mismatch", channels=1, context_slices=1)  # the card says 3 channels
    res = _cli("verify", "--model", mismatch)
    assert res.returncode == 2 and "channel" in res.stderr
    tampered = _model(tmp_path / "tampered")
    (tampered.parent / "net.onnx").write_bytes((tampered.parent / "net.onnx").read_bytes() + b"\0")
    res = _cli("verify", "--model", tampered)
    assert res.returncode == 2 and "sha256" in res.stderr


def test_build_ahead_of_time_for_two_targets_and_list_them(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (the test extra) builds engines without a GPU")
    card = _model(tmp_path / "m")
    cache = tmp_path / "cache"
    keys = []
    for cc in ("8.9", "8.6"):
        res = _cli("build", "--model", card, "--cache", cache, "--compute-capability", cc)
        assert res.returncode == 0, res.stderr
        assert "done in" in res.stderr  # the progress display
        keys.append(re.search(r"^engine ([0-9a-f]{32}):", res.stdout, re.M).group(1))
    assert keys[0] != keys[1]
    again = _cli("build", "--model", card, "--cache", cache, "--compute-capability", "8.9")
    assert again.returncode == 0 and keys[0] in again.stdout  # found in the cache, not rebuilt
    listing = _cli("list", "--cache", cache).stdout
    assert keys[0] in listing and keys[1] in listing and "sm 8.9" in listing and "sm 8.6" in listing
    res = _cli("build", "--model", card, "--cache", cache, "--compute-capability", "9.0")
    assert res.returncode == 2 and "engine not built" in res.stderr


def test_build_refuses_a_precision_the_card_forbids_and_builds_one_it_allows(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (the test extra) builds engines without a GPU")
    card_path = _model(tmp_path / "m")
    card = tomllib.loads(card_path.read_text())
    card_path.write_text(tomli_w.dumps({**card, "precisions": ["fp32"]}))
    cache = tmp_path / "cache"
    res = _cli("build", "--model", card_path, "--cache", cache, "--compute-capability", "8.9")  # fp16 by default
    assert res.returncode == 2
    assert "allows precision(s) fp32 only, not fp16" in res.stderr and "--precision fp32" in res.stderr
    assert not cache.exists()  # refused before anything was built
    res = _cli("build", "--model", card_path, "--cache", cache, "--compute-capability", "8.9", "--precision", "fp32")
    assert res.returncode == 0, res.stderr
    # TensorRT-RTX cannot embed the HU kernels (engines.hu_io): the engine is the network's, io "network"
    assert "fp32  io network" in _cli("list", "--cache", cache).stdout
