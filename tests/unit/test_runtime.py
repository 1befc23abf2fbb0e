"""Runtime backends (ONNX Runtime CPU twin), model/card checks at load, the engine cache and its key."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
from pydantic import ValidationError

from engines.build import ShapeProfile, local_compute_capability
from engines.cache import EngineCache, cache_key
from engines.card import CardError, ModelCard
from engines.runtime import (
    BackendUnavailable,
    InferenceError,
    OnnxRuntimeBackend,
    TensorRTBackend,
    select_backend,
    trt_flavour,
)
from tests.onnx_helpers import conv_weights, make_card, make_conv_net, needs_onnx, numpy_forward


@needs_onnx
def test_onnxruntime_runs_conv_net_like_its_numpy_forward(tmp_path):
    weights = conv_weights(3)
    path = make_conv_net(tmp_path / "net.onnx", channels=3, weights=weights)
    session = OnnxRuntimeBackend(intra_op_threads=1).load(path, make_card(path, context_slices=1))
    x = np.random.default_rng(1).standard_normal((5, 3, 37, 29)).astype(np.float32)
    y = session.run(x)
    assert y.shape == (5, 1, 37, 29) and y.dtype == np.float32
    # 1e-5 in network units is 0.01 HU at scale_hu = 1000
    np.testing.assert_allclose(y, numpy_forward(x, weights), atol=1e-5)


@needs_onnx
def test_session_refuses_batch_with_wrong_channel_count(tmp_path):
    path = make_conv_net(tmp_path / "net.onnx", channels=3)
    session = OnnxRuntimeBackend().load(path, make_card(path, context_slices=1))
    with pytest.raises(InferenceError, match=r"\(N, 3, H, W\)"):
        session.run(np.zeros((2, 1, 16, 16), np.float32))


@needs_onnx
def test_missing_card_is_refused_at_load(tmp_path):
    path = make_conv_net(tmp_path / "net.onnx")
    with pytest.raises(CardError, match="no model card"):
        OnnxRuntimeBackend().load(path, None)


@needs_onnx
def test_wrong_input_rank_is_refused_at_load(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # A model taking single slices (1, H, W): valid ONNX, but not the (N, C, H, W) the card promises.
    path = tmp_path / "rank3.onnx"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"])], "rank3",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "H", "W"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, "H", "W"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    with pytest.raises(CardError, match="rank 3"):
        OnnxRuntimeBackend().load(path, make_card(path))


@needs_onnx
def test_channel_count_must_match_card_context_slices(tmp_path):
    path = make_conv_net(tmp_path / "net.onnx", channels=1)
    with pytest.raises(CardError, match=r"takes 1 channel.*context_slices = 2, i.e. 5 channel"):
        OnnxRuntimeBackend().load(path, make_card(path, context_slices=2))


@needs_onnx
def test_model_not_matching_card_hash_is_refused(tmp_path):
    path = make_conv_net(tmp_path / "net.onnx")
    card = make_card(path)
    make_conv_net(path, seed=7)  # retrained in place: the card no longer describes it
    with pytest.raises(CardError, match="does not match card"):
        OnnxRuntimeBackend().load(path, card)


# ----------------------------------------------------------------------------------------- backend selection


def test_onnxruntime_preference_is_always_available():
    assert select_backend("onnxruntime").name == "onnxruntime"


@pytest.mark.skipif(local_compute_capability() is not None, reason="a GPU is present: auto picks TensorRT here")
def test_auto_falls_back_to_onnxruntime_without_gpu():
    assert select_backend("auto").name == "onnxruntime"


@pytest.mark.skipif(local_compute_capability() is not None, reason="a GPU is present")
def test_tensorrt_preference_without_gpu_says_why():
    with pytest.raises(BackendUnavailable, match="GPU|TensorRT"):
        select_backend("tensorrt")


def test_trt_flavour_names_each_failed_import():
    with pytest.raises(BackendUnavailable, match="no_such_tensorrt"):
        trt_flavour(prefer="no_such_tensorrt")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ engine cache key

PROFILE = ShapeProfile(channels=1, max_batch=16, opt_batch=16, min_hw=(64, 64), opt_hw=(512, 512), max_hw=(1024, 1024))
BASE = {"onnx_sha256": "ab" * 32, "flavour": "tensorrt_rtx", "trt_version": "1.7.1.116",
        "compute_capability": "8.9", "precision": "fp16", "profile": PROFILE}


def test_cache_key_is_stable_hex():
    key = cache_key(**BASE)
    assert cache_key(**BASE, io="network") == key  # an engine without embedded HU kernels, as before
    assert key == cache_key(**BASE) and len(key) == 32 and int(key, 16) >= 0
    # Spellings of the same compute capability and a profile given as a dict are the same key.
    assert cache_key(**{**BASE, "compute_capability": "sm_89"}) == key
    assert cache_key(**{**BASE, "profile": {"channels": 1, "max_batch": 16, "opt_batch": 16, "min_hw": [64, 64],
                                            "opt_hw": [512, 512], "max_hw": [1024, 1024]}}) == key


@pytest.mark.parametrize("change", [
    {"onnx_sha256": "cd" * 32},
    {"precision": "fp32"},
    {"flavour": "tensorrt"},
    {"trt_version": "1.7.1.117"},
    {"compute_capability": "8.6"},
    {"profile": replace(PROFILE, max_hw=(512, 512))},
    {"profile": replace(PROFILE, channels=3)},
    {"io": "hu"},
], ids=lambda c: next(iter(c)))
def test_cache_key_changes_with_each_field(change):
    assert cache_key(**{**BASE, **change}) != cache_key(**BASE)


def test_cache_key_refuses_an_unknown_io():
    with pytest.raises(ValueError, match="io must be one of"):
        cache_key(**BASE, io="raw")


# --------------------------------------------------------------------------------------------- engine cache


def test_engine_cache_put_get_list_remove(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    key = cache_key(**BASE)
    assert cache.get(key) is None and cache.list() == []
    cache.put(key, b"engine-bytes", {**BASE, "build_seconds": 1.5})
    assert cache.get(key) == b"engine-bytes"
    (entry,) = cache.list()
    assert entry["key"] == key and entry["build_seconds"] == 1.5 and entry["engine_bytes"] == 12
    assert entry["compute_capability"] == "8.9" and entry["profile"]["max_hw"] == [1024, 1024]
    assert json.loads(cache.path_for(key).with_suffix(".json").read_text())["precision"] == "fp16"
    cache.remove(key)
    assert cache.get(key) is None and cache.list() == [] and not any(cache.root.iterdir())


def test_engine_cache_records_the_engines_io(tmp_path):
    cache = EngineCache(tmp_path)
    key = cache_key(**BASE, io="hu")
    cache.put(key, b"engine", {**BASE, "io": "hu"})
    assert cache.get(key) == b"engine" and cache.list()[0]["io"] == "hu"
    with pytest.raises(ValueError, match="does not match key"):
        cache.put(key, b"engine", BASE)  # io left out means "network": not this key


def test_engine_cache_refuses_meta_that_does_not_match_key(tmp_path):
    cache = EngineCache(tmp_path)
    with pytest.raises(ValueError, match="does not match key"):
        cache.put(cache_key(**BASE), b"x", {**BASE, "precision": "fp32"})
    with pytest.raises(ValueError, match="lacks key field"):
        cache.put(cache_key(**BASE), b"x", {"precision": "fp16"})


def test_engine_cache_write_interrupted_leaves_a_miss_and_no_temporary_files(tmp_path, monkeypatch):
    cache = EngineCache(tmp_path)
    key = cache_key(**BASE)
    real_replace = os.replace

    def crash_on_sidecar(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_sidecar)
    with pytest.raises(OSError, match="power cut"):
        cache.put(key, b"engine", BASE)
    monkeypatch.setattr(os, "replace", real_replace)
    assert cache.path_for(key).exists()  # the engine landed, its sidecar did not: not a usable entry
    assert cache.get(key) is None and cache.list() == []
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_engine_cache_drops_a_corrupt_engine(tmp_path):
    cache = EngineCache(tmp_path)
    key = cache_key(**BASE)
    cache.put(key, b"engine-bytes", BASE)
    cache.path_for(key).write_bytes(b"engine-byteZ")
    assert cache.get(key) is None and cache.list() == []


def test_engine_cache_overwrite_keeps_one_entry(tmp_path):
    cache = EngineCache(tmp_path)
    key = cache_key(**BASE)
    cache.put(key, b"first", BASE)
    cache.put(key, b"second", BASE)
    assert cache.get(key) == b"second" and len(cache.list()) == 1


# ------------------------------------------------------------------------------------------ card precisions


def test_card_precisions_default_to_both_and_are_validated():
    card = dict(name="m", version="1", onnx="m.onnx", sha256="0" * 64, intended_use="t", training_data="none")
    assert ModelCard(**card).precisions == ["fp32", "fp16"]
    assert not ModelCard(**card, precisions=["fp32"]).allows("fp16")
    for bad in ([], ["fp8"], ["fp16", "fp16"]):
        with pytest.raises(ValidationError):
            ModelCard(**card, precisions=bad)


def test_tensorrt_backend_builds_fp16_only_where_the_card_allows_it(tmp_path):
    card = dict(name="m", version="1", onnx="m.onnx", sha256="0" * 64, intended_use="t", training_data="none")
    backend = TensorRTBackend(tmp_path, precision="fp16")
    assert backend.precision_for(ModelCard(**card)) == "fp16"
    assert backend.precision_for(ModelCard(**card, precisions=["fp32"])) == "fp32"
    assert TensorRTBackend(tmp_path, precision="fp32").precision_for(ModelCard(**card)) == "fp32"


def test_reference_model_card_allows_fp16():
    from pathlib import Path

    from engines.card import load_card

    card, _ = load_card(Path(__file__).resolve().parents[2] / "engines" / "models" / "reference-redcnn.toml")
    assert card.precisions == ["fp32", "fp16"]
