"""The ONNX -> engine build path, proved on a CPU-only machine by TensorRT-RTX ahead-of-time builds for the
RTX-class targets (sm_86, sm_89); running an engine needs a GPU (``gpu`` marker)."""

from __future__ import annotations

import numpy as np
import pytest

from engines.build import EngineBuildError, ShapeProfile, build_engine, rtx_compute_capabilities, to_fp16
from engines.cache import EngineCache, cache_key
from engines.card import file_sha256

onnx = pytest.importorskip("onnx", reason="the build tests make their ONNX models with the onnx package")
from tests.onnx_helpers import make_card, make_conv_net  # noqa: E402


def _rtx():
    try:
        import tensorrt_rtx
    except Exception as exc:  # ImportError, or a native library that fails to load
        pytest.skip(f"tensorrt_rtx is not importable ({exc}): pip install tensorrt-rtx-cu13==1.7.1.116")
    return tensorrt_rtx


PROFILE = {"max_batch": 8, "min_hw": (32, 32), "opt_hw": (256, 256), "max_hw": (512, 512)}


@pytest.fixture(scope="module")
def conv_net(tmp_path_factory):
    return make_conv_net(tmp_path_factory.mktemp("net") / "net.onnx", channels=3)


def test_rtx_aot_build_for_sm89_and_sm86_on_a_cpu_machine(conv_net):
    trt = _rtx()
    digest = file_sha256(conv_net)
    profile = ShapeProfile(channels=3, opt_batch=8, **PROFILE)
    keys, engines = set(), {}
    for cc in ("8.9", "8.6"):
        for precision in ("fp16", "fp32"):
            engine = build_engine(conv_net, flavour_module=trt, compute_capability=cc, precision=precision,
                                  **PROFILE)
            assert isinstance(engine, bytes) and len(engine) > 10_000
            engines[cc, precision] = engine
            keys.add(cache_key(digest, "tensorrt_rtx", trt.__version__, cc, precision, profile))
    assert len(keys) == 4  # sm86/sm89 x fp16/fp32: four different cache entries
    assert engines["8.9", "fp16"] != engines["8.6", "fp16"]
    assert engines["8.9", "fp16"] != engines["8.9", "fp32"]


def test_rtx_aot_engine_goes_into_the_cache(conv_net, tmp_path):
    trt = _rtx()
    profile = ShapeProfile(channels=3, opt_batch=8, **PROFILE)
    fields = {"onnx_sha256": file_sha256(conv_net), "flavour": "tensorrt_rtx", "trt_version": trt.__version__,
              "compute_capability": "8.9", "precision": "fp16", "profile": profile}
    engine = build_engine(conv_net, flavour_module=trt, compute_capability="8.9", precision="fp16", **PROFILE)
    cache = EngineCache(tmp_path)
    key = cache_key(**fields)
    cache.put(key, engine, {**fields, "build_seconds": 0.1})
    assert cache.get(key) == engine and cache.list()[0]["compute_capability"] == "8.9"


def test_rtx_engine_of_the_reference_model_for_sm89_is_the_networks_and_keyed_so(tmp_path):
    """TensorRT-RTX 1.7 cannot embed the HU kernels (engines.hu_io): its engine maps the network's input to its
    output, the kernels run on the engine's stream, and the cache key says so (io "network", not "hu")."""
    import dataclasses
    from pathlib import Path

    from engines.card import load_card
    from engines.manage import build

    trt = _rtx()
    card_path = Path(__file__).resolve().parents[2] / "engines" / "models" / "reference-redcnn.toml"
    key, path = build(card_path, tmp_path, "8.9", "fp16", max_batch=4)
    meta = EngineCache(tmp_path).meta(key)
    assert meta["io"] == "network" and meta["precision"] == "fp16" and path.stat().st_size > 10_000
    card, _ = load_card(card_path)
    fields = {k: meta[k] for k in ("onnx_sha256", "flavour", "trt_version", "compute_capability", "precision")}
    profile = ShapeProfile(channels=card.input.channels, max_batch=4)
    assert cache_key(**fields, profile=profile, io="network") == key
    assert cache_key(**fields, profile=dataclasses.asdict(profile), io="hu") != key
    assert fields["trt_version"] == trt.__version__


def test_rtx_refuses_a_target_it_cannot_build_and_names_those_it_can(conv_net):
    trt = _rtx()
    assert {"8.6", "8.9"} <= set(rtx_compute_capabilities(trt))
    with pytest.raises(EngineBuildError, match=r"cannot target compute capability 9\.0.*8\.6, 8\.9"):
        build_engine(conv_net, flavour_module=trt, compute_capability="9.0", precision="fp32")


def test_parser_errors_reach_the_build_error(tmp_path):
    trt = _rtx()
    from onnx import TensorProto, helper

    path = tmp_path / "bad.onnx"
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["input"], ["output"], domain="com.example")], "bad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, "H", "W"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 9
    onnx.save(model, str(path))
    with pytest.raises(EngineBuildError, match=r"(?s)ONNX parser refused.*NoSuchOp"):
        build_engine(path, flavour_module=trt, compute_capability="8.9", precision="fp32")


def test_profile_channels_must_match_the_model(conv_net):
    trt = _rtx()
    with pytest.raises(EngineBuildError, match="takes 3 channels, the profile asks for 5"):
        build_engine(conv_net, flavour_module=trt, compute_capability="8.9", precision="fp32", channels=5)


def test_to_fp16_keeps_float32_io_and_the_result_within_fp16_rounding(conv_net, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxconverter_common", reason="fp16 conversion uses onnxconverter-common")
    half = to_fp16(conv_net, tmp_path / "net16.onnx")
    model = onnx.load(str(half))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {i.data_type for i in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    x = np.random.default_rng(2).uniform(-1, 2, (2, 3, 33, 47)).astype(np.float32)  # -1000..2000 HU

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]

    full, halfres = run(conv_net), run(half)
    assert halfres.dtype == np.float32
    assert np.abs(full - halfres).max() * 1000 < 5.0  # HU at scale_hu = 1000


# ---------------------------------------------------------------------------------- needs a GPU to run


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol_hu", [("fp32", 0.05), ("fp16", 5.0)])
def test_tensorrt_backend_matches_the_cpu_twin_and_reuses_its_cached_engine(conv_net, tmp_path, monkeypatch,
                                                                          precision, tol_hu):
    from engines import tensorrt_runtime
    from engines.runtime import OnnxRuntimeBackend, TensorRTBackend
    from engines.tiling import denoise_volume

    card = make_card(conv_net, context_slices=1)
    backend = TensorRTBackend(tmp_path / "engines", precision=precision, **PROFILE)
    session = backend.load(conv_net, card)
    twin = OnnxRuntimeBackend().load(conv_net, card)
    hu = np.random.default_rng(3).normal(40, 200, (20, 96, 80)).astype(np.float32)
    gpu = denoise_volume(hu, session, card, slab=8)
    cpu = denoise_volume(hu, twin, card, slab=8)
    assert np.abs(gpu - cpu).max() < tol_hu
    assert len(backend.cache.list()) == 1

    def no_build(*a, **k):
        raise AssertionError("the cached engine should have been used")

    monkeypatch.setattr(tensorrt_runtime, "build_engine", no_build)
    again = TensorRTBackend(tmp_path / "engines", precision=precision, **PROFILE).load(conv_net, card)
    np.testing.assert_allclose(denoise_volume(hu, again, card, slab=8), gpu, atol=1e-4)
