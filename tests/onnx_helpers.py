"""Small ONNX networks for tests: a ReLU conv net written with onnx.helper, its card, and a NumPy
forward of the same weights as the oracle."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from engines.card import InputSpec, ModelCard, OutputSpec, file_sha256


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


# The cache and key tests need neither; these do (pyproject's test extra installs both).
needs_onnx = pytest.mark.skipif(_missing("onnx") or _missing("onnxruntime"),
                                reason="needs the onnx and onnxruntime packages (pip install -e '.[test]')")

# ----------------------------------------------------------------------------- small ONNX nets (shared helpers)


def conv_weights(channels: int, width: int = 8, layers: int = 3, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Weights of a fully convolutional 3x3 net: channels -> width -> ... -> 1 (receptive-field radius = layers)."""
    rng = np.random.default_rng(seed)
    sizes = [channels] + [width] * (layers - 1) + [1]
    return [((rng.standard_normal((co, ci, 3, 3)) / np.sqrt(9 * ci)).astype(np.float32),
             (0.01 * rng.standard_normal(co)).astype(np.float32)) for ci, co in zip(sizes[:-1], sizes[1:], strict=True)]


def make_conv_net(path: Path, channels: int = 1, weights=None, input_shape=None, seed: int = 0) -> Path:
    """A ReLU conv net (N, C, H, W) -> (N, 1, H, W), dynamic N/H/W, opset 17, saved to ``path``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = weights or conv_weights(channels, seed=seed)
    nodes, inits, prev = [], [], "input"
    for i, (w, b) in enumerate(weights):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = "output" if i == len(weights) - 1 else f"h{i}"
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [out], pads=[1, 1, 1, 1], name=f"conv{i}"))
        if out != "output":
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    shape = input_shape or ["N", channels, "H", "W"]
    graph = helper.make_graph(
        nodes, "denoiser",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, "H", "W"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # readable by every ONNX Runtime / TensorRT parser we use
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_card(onnx_path: Path, context_slices: int = 0, meaning: str = "residual") -> ModelCard:
    return ModelCard(name="test-net", version="0.0.1", onnx=onnx_path.name, sha256=file_sha256(onnx_path),
                     intended_use="tests", training_data="none", input=InputSpec(context_slices=context_slices),
                     output=OutputSpec(meaning=meaning))


def numpy_forward(x: np.ndarray, weights) -> np.ndarray:
    """The oracle: the same conv net in NumPy (zero padding, ReLU between layers)."""
    from numpy.lib.stride_tricks import sliding_window_view

    h = x.astype(np.float64)
    for i, (w, b) in enumerate(weights):
        windows = sliding_window_view(np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), axis=(2, 3))
        h = np.einsum("nchwij,ocij->nohw", windows, w) + b[None, :, None, None]
        if i < len(weights) - 1:
            h = np.maximum(h, 0)
    return h


# --------------------------------------------------------------------------------------------- ONNX Runtime
