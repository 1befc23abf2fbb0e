"""HU in, HU out (engines.hu_io): the launches the TensorRT session makes on its stream, run here through the
host twin of the same kernels; the plugin kernels' calling convention in their PTX; the model wrapped with
the plugin nodes; the plugins' ahead-of-time implementation against a stand-in for ``tensorrt.plugin``; and
what TensorRT-RTX 1.7 supports (no ahead-of-time plugins)."""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest

from engines.card import ModelCard
from engines.hu_io import KERNELS, card_params, plugin_support, register_plugins, stream_launches, wrap_onnx
from engines.tiling import denoise_volume
from tests.onnx_helpers import make_card, make_conv_net, needs_onnx


class HostTwinHuSession:
    """What TensorRTSession does with the stream kernels, on the CPU: the launches of `stream_launches`
    through the host twin of kernels/src/hu.cu around the CPU twin's network. HU in, HU out."""

    io = "hu"

    def __init__(self, network, card: ModelCard):
        self.network, self.card, self.params = network, card, card_params(card)

    def run(self, hu: np.ndarray) -> np.ndarray:
        from kernels.host import launch

        hu = np.ascontiguousarray(hu, dtype=np.float32)
        n, _, h, w = hu.shape
        buffers = {"hu": hu, "params": self.params, "x": np.empty_like(hu),
                   "hu_out": np.empty((n, 1, h, w), np.float32)}
        before, after = stream_launches(hu.shape, self.card)
        launch(KERNELS[before.op].kernel, before.grid, before.block, *before.args(buffers))
        buffers["y"] = self.network.run(buffers["x"])
        launch(KERNELS[after.op].kernel, after.grid, after.block, *after.args(buffers))
        return buffers["hu_out"]


@needs_onnx
@pytest.mark.parametrize("meaning", ["residual", "image"])
def test_stream_kernel_launches_give_the_cpu_twins_hu_whole_and_tiled(tmp_path, meaning):
    from engines.runtime import OnnxRuntimeBackend

    path = make_conv_net(tmp_path / "net.onnx", channels=3)
    card = make_card(path, context_slices=1, meaning=meaning)
    twin = OnnxRuntimeBackend(intra_op_threads=1).load(path, card)
    hu = np.random.default_rng(4).normal(40, 300, (7, 70, 52)).astype(np.float32)
    expected = denoise_volume(hu, twin, card, slab=4)  # NumPy arithmetic around the network
    on_kernels = HostTwinHuSession(twin, card)
    np.testing.assert_allclose(denoise_volume(hu, on_kernels, card, slab=4), expected, atol=1e-3)  # HU
    tiled = denoise_volume(hu, on_kernels, card, slab=4, tile_hw=40, tile_overlap=16)
    np.testing.assert_allclose(tiled, expected, atol=1e-2)  # HU: blending the mapped outputs


def test_plugin_kernels_take_tensors_then_int32_scalars_then_outputs_in_their_ptx():
    from kernels import build

    if build.nvcc_path() is None:
        pytest.skip("nvcc not installed on this machine")
    ptx = build.build_ptx(build.SOURCE_DIR / "hu.cu", "89").read_text()
    entries = {m.group(1): re.findall(r"\.param \.(\w+)", m.group(2))
               for m in re.finditer(r"\.entry (\w+)\(([^)]*)\)", ptx)}
    for abi in KERNELS.values():
        expected = ["u64"] * len(abi.inputs) + ["u32"] * len(abi.scalars) + ["u64"] * len(abi.outputs)
        assert entries[abi.kernel] == expected, abi.kernel


@needs_onnx
def test_wrapped_model_takes_hu_and_returns_hu_through_the_two_plugin_nodes(tmp_path):
    import onnx
    from onnx import numpy_helper

    path = make_conv_net(tmp_path / "net.onnx", channels=5)
    card = make_card(path, context_slices=2, meaning="residual")
    model = onnx.load(str(wrap_onnx(path, tmp_path / "hu.onnx", card)))
    g = model.graph
    assert [i.name for i in g.input] == ["appliance_hu"] and [o.name for o in g.output] == ["appliance_hu_out"]
    dims = [d.dim_value or d.dim_param for d in g.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 5, "H", "W"]
    front, back = g.node[0], g.node[-1]
    assert (front.op_type, list(front.input), list(front.output)) == (
        "hu_to_network", ["appliance_hu", "appliance_hu_params"], ["input"])
    assert (back.op_type, list(back.input), list(back.output)) == (
        "network_to_hu", ["appliance_hu", "output", "appliance_hu_params"], ["appliance_hu_out"])
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in back.attribute}
    assert attrs == {"plugin_namespace": b"appliance", "aot": 1, "centre": 2, "residual": 1}
    (params,) = [t for t in g.initializer if t.name == "appliance_hu_params"]
    np.testing.assert_array_equal(numpy_helper.to_array(params), [0.0, 1000.0, -1024.0, 3071.0])
    assert len(g.node) == len(onnx.load(str(path)).graph.node) + 2  # the network itself untouched


# ------------------------------------------------------------------- the ahead-of-time plugins (stand-in)

def _standin_tensorrt(monkeypatch, name: str):
    """A stand-in for a TensorRT with ahead-of-time plugins: shapes are ints, and ``register``/``aot_impl``
    check what tensorrt.plugin checks of the signatures (names in order, annotations that are classes)."""
    import inspect

    class TensorDesc:
        def __init__(self, shape):
            self.shape_expr = _Shape(shape)

        def like(self):
            return TensorDesc(tuple(self.shape_expr))

    class _Shape(tuple):
        def numel(self):
            return int(np.prod(self))

    class KernelLaunchParams:
        grid_x = grid_y = grid_z = block_x = block_y = block_z = 1
        shared_mem = 0

    class SymInt32(int):
        pass

    class SymIntExprs(list):
        @classmethod
        def from_tuple(cls, values):
            return cls(values)

    registered: dict[str, dict] = {}

    def register(plugin_id):
        def wrap(fn):
            sig = inspect.signature(fn)
            assert all(isinstance(p.annotation, type) for p in sig.parameters.values()), sig
            registered[plugin_id] = {"desc": fn, "attrs": [n for n, p in sig.parameters.items()
                                                           if not issubclass(p.annotation, TensorDesc)]}
            return fn
        return wrap

    def aot_impl(plugin_id):
        def wrap(fn):
            spec = registered[plugin_id]
            tensors = [n for n in inspect.signature(spec["desc"]).parameters if n not in spec["attrs"]]
            assert list(inspect.signature(fn).parameters) == [*tensors, *spec["attrs"], "outputs", "tactic"]
            assert inspect.signature(fn).return_annotation is not inspect.Signature.empty
            spec["aot"] = fn
            return fn
        return wrap

    plugin = types.ModuleType(f"{name}.plugin")
    plugin.__dict__.update(TensorDesc=TensorDesc, KernelLaunchParams=KernelLaunchParams, SymInt32=SymInt32,
                           SymIntExprs=SymIntExprs, register=register, aot_impl=aot_impl,
                           cdiv=lambda a, b: (a + b - 1) // b)
    trt = types.ModuleType(name)
    trt.__version__, trt.IPluginV3QuickAOTBuild, trt.plugin = "0.0-standin", object, plugin
    monkeypatch.setitem(sys.modules, name, trt)
    monkeypatch.setitem(sys.modules, f"{name}.plugin", plugin)
    return trt, registered, TensorDesc


@pytest.mark.parametrize("meaning", ["residual", "image"])
def test_aot_plugins_give_tensorrt_the_kernels_grid_and_int32_args_of_the_stream_launches(monkeypatch, meaning):
    trt, registered, TensorDesc = _standin_tensorrt(monkeypatch, f"standin_trt_{meaning}")
    assert plugin_support(trt) is None
    register_plugins(trt, b"// ptx of hu.cu")
    card = ModelCard(name="m", version="1", onnx="m.onnx", sha256="0" * 64, intended_use="t", training_data="none",
                     input={"context_slices": 1}, output={"meaning": meaning})
    shape = (4, 3, 96, 80)
    hu, params, y = TensorDesc(shape), TensorDesc((4,)), TensorDesc((4, 1, 96, 80))
    before, after = stream_launches(shape, card)
    front = registered["appliance::hu_to_network"]
    assert front["desc"](hu, params).shape_expr == shape
    name, ptx, launch, extra = front["aot"](hu, params, (hu.like(),), 0)
    assert (name, ptx) == ("hu_to_network_plugin", b"// ptx of hu.cu")
    assert ((launch.grid_x, 1, 1), (launch.block_x, 1, 1), tuple(extra)) == (before.grid, before.block, before.scalars)
    back = registered["appliance::network_to_hu"]
    residual = int(meaning == "residual")
    assert back["desc"](hu, y, params, residual, 1).shape_expr == (4, 1, 96, 80)
    name, _, launch, extra = back["aot"](hu, y, params, residual, 1, (y.like(),), 0)
    assert name == "network_to_hu_plugin"
    assert ((launch.grid_x, 1, 1), (launch.block_x, 1, 1), tuple(extra)) == (after.grid, after.block, after.scalars)


# ------------------------------------------------------------------------------------ TensorRT-RTX 1.7

def _rtx():
    try:
        import tensorrt_rtx
    except Exception as exc:  # ImportError, or a native library that fails to load
        pytest.skip(f"tensorrt_rtx is not importable ({exc})")
    return tensorrt_rtx


def test_tensorrt_rtx_1_7_has_no_ahead_of_time_plugins_and_says_why():
    """Recorded on 1.7.1.116: if a TensorRT-RTX gains them, this fails, and its engines can embed the kernels."""
    trt = _rtx()
    reason = plugin_support(trt)
    assert reason is not None and "tensorrt_rtx.plugin" in reason
    assert not hasattr(trt, "IPluginV3QuickAOTBuild") and not hasattr(trt.INetworkDefinition, "add_plugin_v3")


@needs_onnx
def test_rtx_refuses_an_engine_with_embedded_hu_kernels_with_the_reason(tmp_path):
    from engines.build import EngineBuildError, build_engine

    trt = _rtx()
    path = make_conv_net(tmp_path / "net.onnx")
    with pytest.raises(EngineBuildError, match=r"cannot embed the HU kernels as plugins: tensorrt_rtx .*\.plugin"):
        build_engine(path, flavour_module=trt, compute_capability="8.9", precision="fp32", io="hu",
                     card=make_card(path))
