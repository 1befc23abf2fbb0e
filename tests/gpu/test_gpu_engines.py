"""The TensorRT session returns HU like the CPU twin (ONNX Runtime + the card's arithmetic in NumPy), with the
HU kernels inside the engine as ahead-of-time plugins, on the engine's stream, or (the documented fallback)
in NumPy around it: within 0.05 HU at fp32 and 1 HU at fp16. And the HU kernels on the GPU against their
host twin. Skipped where pycuda finds no CUDA device, and (the engine tests) where no TensorRT imports or
the flavour has no ahead-of-time plugins (TensorRT-RTX 1.7: engines.hu_io)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.synth.phantom import PhantomSpec, ct_phantom_hu
from engines.card import ModelCard, load_card
from engines.hu_io import card_params, plugin_support, stream_launches
from engines.tiling import denoise_volume
from tests.onnx_helpers import make_card, make_conv_net, needs_onnx

pytestmark = pytest.mark.gpu

REFERENCE = Path(__file__).resolve().parents[2] / "engines" / "models" / "reference-redcnn.toml"
PROFILE = {"max_batch": 8, "min_hw": (64, 64), "opt_hw": (256, 256), "max_hw": (512, 512)}


@pytest.mark.parametrize("meaning", ["residual", "image"])
def test_hu_kernels_on_the_gpu_match_their_host_twin(meaning):
    import pycuda.autoprimaryctx  # noqa: F401  (the primary context, as TensorRT's)
    import pycuda.driver as cuda
    from pycuda import gpuarray

    from engines.tensorrt_runtime import load_hu_kernels
    from kernels.host import hu_to_network_plugin, network_to_hu_plugin

    kernels = load_hu_kernels(cuda.Context.get_device().compute_capability())
    card = ModelCard(name="m", version="1", onnx="m.onnx", sha256="0" * 64, intended_use="t", training_data="none",
                     input={"context_slices": 2}, output={"meaning": meaning},
                     normalization={"center_hu": -20.0, "scale_hu": 800.0})
    rng = np.random.default_rng(7)
    hu = rng.uniform(-1500, 4000, (3, 5, 33, 47)).astype(np.float32)
    y = rng.normal(0, 0.05, (3, 1, 33, 47)).astype(np.float32)
    dev = {"hu": gpuarray.to_gpu(hu), "params": gpuarray.to_gpu(card_params(card)), "y": gpuarray.to_gpu(y),
           "x": gpuarray.empty(hu.shape, np.float32), "hu_out": gpuarray.empty(y.shape, np.float32)}
    pointers = {name: a.gpudata for name, a in dev.items()}
    for launch in stream_launches(hu.shape, card):
        kernels[launch.op](*launch.args(pointers, np.int32), grid=launch.grid, block=launch.block)
    params = card_params(card)
    np.testing.assert_allclose(dev["x"].get(), hu_to_network_plugin(hu, params), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dev["hu_out"].get(), network_to_hu_plugin(hu, y, params, 2, meaning == "residual"),
                               rtol=1e-6, atol=1e-3)  # HU


def _backend_or_skip(cache: Path, precision: str, hu_kernels: str):
    from engines.runtime import BackendUnavailable, TensorRTBackend, trt_flavour

    try:
        flavour = trt_flavour()
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    if hu_kernels == "plugin" and (reason := plugin_support(flavour.module)):
        pytest.skip(f"no HU kernels inside this engine: {reason}")
    return TensorRTBackend(cache, precision=precision, hu_kernels=hu_kernels, **PROFILE)


def _noisy_phantom(slices: int, size: int) -> np.ndarray:
    hu = ct_phantom_hu(PhantomSpec(shape_zyx=(slices, size, size), fov_mm=400.0, z_start_mm=150.0, seed=3))
    return (hu + np.random.default_rng(8).normal(0, 40, hu.shape)).astype(np.float32)


@pytest.mark.parametrize("hu_kernels", ["plugin", "stream", "host"])
@pytest.mark.parametrize("precision,tol_hu", [("fp32", 0.05), ("fp16", 1.0)])
def test_tensorrt_session_denoises_the_reference_model_like_the_cpu_twin(tmp_path, hu_kernels, precision, tol_hu):
    from engines.runtime import OnnxRuntimeBackend

    backend = _backend_or_skip(tmp_path, precision, hu_kernels)
    card, onnx_path = load_card(REFERENCE)
    session = backend.load(onnx_path, card)
    assert session.io == ("network" if hu_kernels == "host" else "hu")
    hu = _noisy_phantom(10, 256)
    gpu = denoise_volume(hu, session, card, slab=8)
    cpu = denoise_volume(hu, OnnxRuntimeBackend().load(onnx_path, card), card, slab=8)
    assert np.abs(gpu - cpu).max() < tol_hu
    (entry,) = backend.cache.list()
    assert entry["io"] == ("hu" if hu_kernels == "plugin" else "network") and entry["precision"] == precision


@needs_onnx
@pytest.mark.parametrize("hu_kernels", ["plugin", "stream"])
@pytest.mark.parametrize("meaning", ["residual", "image"])
def test_tensorrt_session_maps_the_centre_slice_of_its_context_like_the_cpu_twin(tmp_path, hu_kernels, meaning):
    from engines.runtime import OnnxRuntimeBackend

    backend = _backend_or_skip(tmp_path / "engines", "fp32", hu_kernels)
    path = make_conv_net(tmp_path / "net.onnx", channels=3)
    card = make_card(path, context_slices=1, meaning=meaning)
    session = backend.load(path, card)
    hu = np.random.default_rng(9).normal(40, 200, (11, 96, 80)).astype(np.float32)
    gpu = denoise_volume(hu, session, card, slab=4)
    cpu = denoise_volume(hu, OnnxRuntimeBackend().load(path, card), card, slab=4)
    assert np.abs(gpu - cpu).max() < 0.05  # HU
