"""HU in, HU out: the card's arithmetic as CUDA kernels around the network of a TensorRT engine.

The normalisation in front of the network and the output mapping behind it (engines.card) are the kernels
``hu_to_network_plugin`` and ``network_to_hu_plugin`` of kernels/src/hu.cu. They run on the GPU in one of
two ways, and the session that uses either takes HU and returns HU (``io = "hu"``, engines.session):

1. **Inside the engine** (engine io "hu"): TensorRT "quickly deployable" Python plugins with an
   ahead-of-time implementation (``tensorrt.plugin``: ``register`` gives the output's shape and type,
   ``aot_impl`` the kernel name, its PTX from nvcc, the launch grid and the int32 arguments). `wrap_onnx`
   puts the two plugin nodes around the model, so the engine's input is the HU batch (N, C, H, W) and its
   output HU (N, 1, H, W); the PTX is in the engine and no Python runs at inference.
2. **On the engine's stream** (engine io "network"), where the TensorRT flavour cannot embed them: the
   session launches the same kernels (nvcc fatbin, pycuda) on its stream just before and after
   ``execute_async_v3`` (`stream_launches` gives the grids and arguments).

`plugin_support` says which applies. TensorRT-RTX 1.7 has no ahead-of-time plugins: its ``tensorrt_rtx.plugin``
package is a stub importing a module the wheel lacks, its bindings have no ``IPluginV3QuickAOTBuild`` and
its network API no ``add_plugin``; its ONNX parser imports only IPluginV3One plugins, and one written in
Python aborts the process in the parser (checked on 1.7.1.116, CPU-only). So RTX engines use way 2.

Plugin kernels take their tensor inputs, then int32 scalars, then their outputs, and no float scalars
(../shared/TRAPS.md): the card's numbers travel as a float32 tensor, `card_params`, an initializer of the
wrapped model.
"""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np

from engines.card import ModelCard

NAMESPACE = "appliance"
BLOCK = 256  # threads per block of both kernels (elementwise)
_INT32_MAX = 2**31 - 1


class KernelABI(NamedTuple):
    """A plugin kernel's parameters in order: tensor inputs, int32 scalars, outputs."""

    kernel: str  # entry point in kernels/src/hu.cu
    inputs: tuple[str, ...]
    scalars: tuple[str, ...]
    outputs: tuple[str, ...]


KERNELS = {
    "hu_to_network": KernelABI("hu_to_network_plugin", ("hu", "params"), ("n",), ("x",)),
    "network_to_hu": KernelABI("network_to_hu_plugin", ("hu", "y", "params"),
                               ("n", "hw", "channels", "centre", "residual"), ("hu_out",)),
}


def card_params(card: ModelCard) -> np.ndarray:
    """The card's numbers for the kernels: float32 (center_hu, scale_hu, clip_min_hu, clip_max_hu)."""
    n = card.normalization
    return np.array([n.center_hu, n.scale_hu, n.clip_min_hu, n.clip_max_hu], dtype=np.float32)


def scalar_args(op: str, shape_nchw: tuple[int, int, int, int], card: ModelCard) -> tuple[int, ...]:
    """The int32 arguments of ``op``'s kernel for an input batch of ``shape_nchw``, in the kernel's order."""
    n, c, h, w = shape_nchw
    values = {"n": n * c * h * w} if op == "hu_to_network" else {
        "n": n * h * w, "hw": h * w, "channels": c, "centre": card.input.context_slices,
        "residual": int(card.output.meaning == "residual")}
    if values["n"] > _INT32_MAX:
        raise ValueError(f"a batch of {shape_nchw} has more than 2^31 - 1 elements: the kernels index with int32")
    return tuple(values[name] for name in KERNELS[op].scalars)


class Launch(NamedTuple):
    op: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    scalars: tuple[int, ...]

    def args(self, buffers: dict, int32=int) -> list:
        """The kernel's arguments: ``buffers`` by the ABI's names, scalars converted by ``int32``."""
        abi = KERNELS[self.op]
        return [*(buffers[t] for t in abi.inputs), *(int32(s) for s in self.scalars),
                *(buffers[t] for t in abi.outputs)]


def stream_launches(shape_nchw: tuple[int, int, int, int], card: ModelCard) -> tuple[Launch, Launch]:
    """The two launches around the network for an input batch (N, C, H, W): before and after it."""
    def launch(op: str) -> Launch:
        scalars = scalar_args(op, shape_nchw, card)
        return Launch(op, ((scalars[0] + BLOCK - 1) // BLOCK, 1, 1), (BLOCK, 1, 1), scalars)

    return launch("hu_to_network"), launch("network_to_hu")


# ------------------------------------------------------------------------------------ inside the engine

def plugin_support(trt: ModuleType) -> str | None:
    """None when TensorRT module ``trt`` can embed ahead-of-time Python plugins; otherwise why not."""
    name = trt.__name__.split(".")[0]
    where = f"{name} {getattr(trt, '__version__', '?')}"
    try:
        trtp = importlib.import_module(f"{name}.plugin")
    except Exception as exc:  # ImportError, or the stub's import of a module its wheel does not ship
        return f"{where} has no usable {name}.plugin ({type(exc).__name__}: {exc})"
    missing = [f"{name}.plugin.{a}" for a in ("register", "aot_impl", "KernelLaunchParams", "SymIntExprs", "SymInt32")
               if not hasattr(trtp, a)]
    missing += [f"{name}.{a}" for a in ("IPluginV3QuickAOTBuild",) if not hasattr(trt, a)]
    if missing:
        return f"{where} lacks ahead-of-time plugins ({', '.join(missing)} missing)"
    return None


_registered: set[str] = set()
_ptx: dict[str, bytes] = {}  # what the aot_impl functions hand TensorRT; set by `register_plugins`
_lock = threading.Lock()


def register_plugins(trt: ModuleType, ptx: bytes) -> None:
    """Register ``appliance::hu_to_network`` and ``appliance::network_to_hu`` with ``trt``'s plugin
    registry (once per process), their kernels from ``ptx`` (kernels/src/hu.cu, `kernels.build.build_ptx`)."""
    name = trt.__name__.split(".")[0]
    reason = plugin_support(trt)
    if reason is not None:
        raise RuntimeError(reason)
    trtp = importlib.import_module(f"{name}.plugin")
    with _lock:
        _ptx[name] = bytes(ptx)
        if name in _registered:
            return
        _define(trtp, name)
        _registered.add(name)


def _define(trtp: ModuleType, flavour: str) -> None:
    """The plugin definitions. tensorrt.plugin reads their signatures: parameter names (inputs, attributes
    in registration order, ``outputs``, ``tactic``) and type hints, which must be the classes themselves,
    so they are set here rather than written as (postponed, string) annotations."""
    desc, hu_net, net_hu = trtp.TensorDesc, KERNELS["hu_to_network"], KERNELS["network_to_hu"]
    aot_result = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]

    def launch_params(n):
        params = trtp.KernelLaunchParams()
        params.grid_x = trtp.cdiv(n, BLOCK)
        params.block_x = BLOCK
        params.shared_mem = 0
        return params

    def hu_to_network_desc(hu, params):
        return hu.like()  # x: (N, C, H, W) float32

    def hu_to_network_aot(hu, params, outputs, tactic):
        n = hu.shape_expr.numel()
        return hu_net.kernel, _ptx[flavour], launch_params(n), trtp.SymIntExprs.from_tuple([trtp.SymInt32(n)])

    def network_to_hu_desc(hu, y, params, residual, centre):
        return y.like()  # HU: (N, 1, H, W) float32

    def network_to_hu_aot(hu, y, params, residual, centre, outputs, tactic):
        n = y.shape_expr.numel()
        values = {"n": n, "hw": y.shape_expr[2] * y.shape_expr[3], "channels": hu.shape_expr[1],
                  "centre": int(centre), "residual": int(residual)}
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(values[k]) for k in net_hu.scalars])
        return net_hu.kernel, _ptx[flavour], launch_params(n), extra

    hu_to_network_desc.__annotations__ = {"hu": desc, "params": desc, "return": desc}
    hu_to_network_aot.__annotations__ = {"tactic": int, "return": aot_result}
    network_to_hu_desc.__annotations__ = {"hu": desc, "y": desc, "params": desc, "residual": int, "centre": int,
                                          "return": desc}
    network_to_hu_aot.__annotations__ = {"residual": int, "centre": int, "tactic": int, "return": aot_result}
    for op, register, aot in (("hu_to_network", hu_to_network_desc, hu_to_network_aot),
                              ("network_to_hu", network_to_hu_desc, network_to_hu_aot)):
        trtp.register(f"{NAMESPACE}::{op}")(register)
        trtp.aot_impl(f"{NAMESPACE}::{op}")(aot)


def wrap_onnx(onnx_path: Path, out_path: Path, card: ModelCard) -> Path:
    """Write a copy of the model that takes HU and returns HU: hu (N, C, H, W) -> appliance::hu_to_network ->
    the model -> appliance::network_to_hu (with ``hu``'s centre channel for a residual model) -> hu_out
    (N, 1, H, W). The plugin nodes follow TensorRT's ONNX convention for plugins (op type = plugin name,
    ``plugin_namespace`` attribute, ``aot = 1`` for the ahead-of-time implementation); only TensorRT with
    the plugins registered (`register_plugins`) can build it."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(f"{Path(onnx_path).name}: expected one input and one output")
    taken = {t for node in graph.node for t in (*node.input, *node.output)} | initializers | {inputs[0].name}
    hu, params, hu_out = "appliance_hu", "appliance_hu_params", "appliance_hu_out"
    clash = {hu, params, hu_out} & taken
    if clash:
        raise ValueError(f"{Path(onnx_path).name}: the model already uses tensor name(s) {sorted(clash)}")
    net_in, net_out = inputs[0], graph.output[0]

    new_in = onnx.ValueInfoProto()
    new_in.CopyFrom(net_in)
    new_in.name = hu
    new_out = onnx.ValueInfoProto()
    new_out.CopyFrom(net_out)
    new_out.name = hu_out
    front = helper.make_node("hu_to_network", [hu, params], [net_in.name], name="appliance_hu_to_network",
                             plugin_namespace=NAMESPACE, aot=1)
    back = helper.make_node("network_to_hu", [hu, net_out.name, params], [hu_out], name="appliance_network_to_hu",
                            plugin_namespace=NAMESPACE, aot=1, centre=card.input.context_slices,
                            residual=int(card.output.meaning == "residual"))
    graph.node.insert(0, front)
    graph.node.append(back)
    graph.initializer.append(numpy_helper.from_array(card_params(card), params))
    graph.input.remove(net_in)
    graph.input.insert(0, new_in)
    graph.output.remove(net_out)
    graph.output.append(new_out)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    return out_path


def ptx_arch(compute_capability: str) -> str:
    """'8.9' -> '89': PTX for the engine's own target (it must not exceed the GPU that runs it)."""
    major, _, minor = compute_capability.partition(".")
    return f"{int(major)}{int(minor)}"
