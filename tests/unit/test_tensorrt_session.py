"""TensorRTSession's data path on a machine without a GPU: pycuda and TensorRT replaced by stand-ins that
keep device buffers in host memory, run the "engine" with ONNX Runtime and launch the HU kernels through
their host twin (the same .cu source). What this proves: the session feeds the engine and the kernels the
right buffers, shapes and int32 arguments, in order, in chunks of the profile's batch, and returns HU like
the CPU twin. What it cannot: anything the real driver, TensorRT or the GPU do (tests/gpu does that)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from engines import tensorrt_runtime
from engines.build import ShapeProfile
from engines.hu_io import KERNELS
from engines.runtime import BackendUnavailable, OnnxRuntimeBackend
from engines.tensorrt_runtime import HuKernelsUnavailable, TensorRTBackend, TensorRTSession, TrtFlavour
from engines.tiling import denoise_volume
from tests.onnx_helpers import make_card, make_conv_net, needs_onnx

pytestmark = needs_onnx


class _Alloc:
    """A 'device' allocation: a flat float32 host array behind an integer address."""

    registry: dict[int, _Alloc] = {}

    def __init__(self, n_floats: int):
        self.buf = np.zeros(n_floats, np.float32)
        self.address = 0x1000 + 0x100 * len(_Alloc.registry)
        _Alloc.registry[self.address] = self
        self.freed = False

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        self.freed = True


def _standin_pycuda(monkeypatch):
    driver = types.ModuleType("pycuda.driver")

    class Error(Exception):
        pass

    class _Ctx:
        def push(self): pass
        def pop(self): pass

    class Device:
        def __init__(self, index): pass
        def retain_primary_context(self): return _Ctx()
        def compute_capability(self): return (8, 9)

    class Stream:
        handle = 0xBEEF
        def synchronize(self): pass

    def to_device(a):
        alloc = _Alloc(np.asarray(a).size)
        alloc.buf[:] = np.asarray(a, np.float32).ravel()
        return alloc

    def htod(dst, src, stream):
        dst.buf[:src.size] = src.ravel()

    def dtoh(dst, src, stream):
        dst[...] = src.buf[:dst.size].reshape(dst.shape)

    driver.__dict__.update(Error=Error, Device=Device, Stream=Stream, init=lambda: None, to_device=to_device,
                           pagelocked_empty=lambda n, dtype: np.empty(n, dtype), mem_alloc=lambda b: _Alloc(b // 4),
                           memcpy_htod_async=htod, memcpy_dtoh_async=dtoh)
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = driver
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)


def _host_twin_kernels(cc):
    """load_hu_kernels' stand-in: each op's kernel through the host twin, with pycuda's calling convention."""
    from kernels.host import launch

    def kernel(name):
        def run(*args, grid, block, stream):
            launch(name, grid, block, *(a.buf if isinstance(a, _Alloc) else int(a) for a in args))
        return run

    return {op: kernel(abi.kernel) for op, abi in KERNELS.items()}


def _standin_tensorrt(forward, batches: list):
    """A TensorRT whose engine maps its input buffer to its output buffer with ``forward`` (N, C, H, W) ->
    (N, 1, H, W); ``batches`` records each run's input shape."""
    trt = types.ModuleType("tensorrt")

    class Context:
        def __init__(self):
            self.shape, self.addresses = None, {}

        def set_input_shape(self, name, shape):
            self.shape = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            n, _, h, w = self.shape
            return (n, 1, h, w)

        def set_tensor_address(self, name, address):
            self.addresses[name] = address

        def execute_async_v3(self, stream_handle):
            assert stream_handle == 0xBEEF  # the session's own stream, which the HU kernels use too
            batches.append(self.shape)
            x = _Alloc.registry[self.addresses["input"]].buf[:int(np.prod(self.shape))].reshape(self.shape)
            y = forward(x.copy())
            _Alloc.registry[self.addresses["output"]].buf[:y.size] = y.ravel()
            return True

    class Engine:
        num_io_tensors = 2
        def get_tensor_name(self, i): return ("input", "output")[i]
        def get_tensor_mode(self, name): return {"input": "IN", "output": "OUT"}[name]
        def get_tensor_dtype(self, name): return "float32"
        def create_execution_context(self): return Context()

    class Runtime:
        def __init__(self, logger): pass
        def deserialize_cuda_engine(self, data): return Engine()

    trt.__dict__.update(Logger=lambda level: None, Runtime=Runtime, DataType=types.SimpleNamespace(FLOAT="float32"),
                        TensorIOMode=types.SimpleNamespace(INPUT="IN", OUTPUT="OUT"))
    trt.Logger.WARNING = 2
    return TrtFlavour("tensorrt", trt, "0-standin")


@pytest.fixture
def model(tmp_path, monkeypatch):
    _standin_pycuda(monkeypatch)
    monkeypatch.setattr(tensorrt_runtime, "load_hu_kernels", _host_twin_kernels)
    _Alloc.registry.clear()
    path = make_conv_net(tmp_path / "net.onnx", channels=3)
    return path


def _hu_volume():
    return np.random.default_rng(11).normal(40, 300, (7, 64, 72)).astype(np.float32)


@pytest.mark.parametrize("meaning", ["residual", "image"])
def test_stream_kernels_around_the_engine_return_the_cpu_twins_hu_in_profile_sized_chunks(model, meaning):
    card = make_card(model, context_slices=1, meaning=meaning)
    twin = OnnxRuntimeBackend(intra_op_threads=1).load(model, card)
    batches = []
    profile = ShapeProfile(3, max_batch=3, min_hw=(32, 32))
    session = TensorRTSession(b"engine", _standin_tensorrt(twin.run, batches), profile, card, engine_io="network",
                              stream_kernels=True)
    assert session.io == "hu"
    hu = _hu_volume()
    np.testing.assert_allclose(denoise_volume(hu, session, card, slab=5), denoise_volume(hu, twin, card, slab=5),
                               atol=1e-3)  # HU
    assert batches == [(3, 3, 64, 72), (2, 3, 64, 72), (2, 3, 64, 72)]  # slabs of 5 and 2, cut to the profile's 3
    session.close()
    assert all(a.freed for a in _Alloc.registry.values())


def test_engine_with_hu_plugins_inside_is_fed_hu_and_returns_it(model):
    from kernels.host import hu_to_network_plugin, network_to_hu_plugin

    card = make_card(model, context_slices=1)
    twin = OnnxRuntimeBackend(intra_op_threads=1).load(model, card)
    params = tensorrt_runtime.card_params(card)

    def engine_with_plugins(hu):  # what the wrapped model computes (engines.hu_io.wrap_onnx)
        return network_to_hu_plugin(hu, twin.run(hu_to_network_plugin(hu, params)), params, 1, True)

    session = TensorRTSession(b"engine", _standin_tensorrt(engine_with_plugins, []),
                              ShapeProfile(3, max_batch=4, min_hw=(32, 32)), card, engine_io="hu")
    assert session.io == "hu" and session._kernels is None  # nothing launched around an engine with plugins
    hu = _hu_volume()
    np.testing.assert_allclose(denoise_volume(hu, session, card, slab=4), denoise_volume(hu, twin, card, slab=4),
                               atol=1e-3)  # HU


def test_without_stream_kernels_the_session_leaves_the_arithmetic_to_the_caller(model):
    card = make_card(model, context_slices=1)
    twin = OnnxRuntimeBackend(intra_op_threads=1).load(model, card)
    profile = ShapeProfile(3, max_batch=4, min_hw=(32, 32))
    session = TensorRTSession(b"engine", _standin_tensorrt(twin.run, []), profile, card, engine_io="network",
                              stream_kernels=False)
    assert session.io == "network"
    hu = _hu_volume()
    np.testing.assert_allclose(denoise_volume(hu, session, card, slab=4), denoise_volume(hu, twin, card, slab=4),
                               atol=1e-3)  # HU


def test_backend_falls_back_to_host_arithmetic_when_the_stream_kernels_cannot_load(model, tmp_path, monkeypatch):
    card = make_card(model, context_slices=1)
    twin = OnnxRuntimeBackend(intra_op_threads=1).load(model, card)

    def no_nvcc(cc):
        raise HuKernelsUnavailable("the HU kernels for sm_89: KernelBuildError: nvcc not found")

    monkeypatch.setattr(tensorrt_runtime, "load_hu_kernels", no_nvcc)
    flavour, profile, key = _standin_tensorrt(twin.run, []), ShapeProfile(3, max_batch=4, min_hw=(32, 32)), "0" * 32
    session = TensorRTBackend(tmp_path)._open(b"engine", flavour, profile, card, key, "network")
    assert session.io == "network"  # auto: warned, and NumPy does the arithmetic (engines.tiling)
    with pytest.raises(BackendUnavailable, match="nvcc not found"):
        TensorRTBackend(tmp_path, hu_kernels="stream")._open(b"engine", flavour, profile, card, key, "network")
