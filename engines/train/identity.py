"""A test model: the reference card with a network whose residual is zero, so its output is its
input. It exercises the model store, activation and rollback end to end (`appliance models`, the
daemon's switch, the image's model stick) with an output anyone can check, and it is never a
denoiser: its card says so. Needs the ``onnx`` package (a development dependency), not torch."""

from __future__ import annotations

import tomllib
from pathlib import Path

import tomli_w

from engines.card import file_sha256
from engines.store import PACKAGED_DIR


def write_identity_model(folder: Path, version: str, name: str = "reference-redcnn") -> Path:
    """Write ``<name>-<version>.onnx`` and its card into ``folder``; returns the card's path."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, "H", "W"])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, "H", "W"])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    graph = helper.make_graph([helper.make_node("Mul", ["input", "zero"], ["output"])], "identity", [x], [y],
                              initializer=[zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="appliance-test")
    model.ir_version = 8
    onnx_path = folder / f"{name}-{version}.onnx"
    onnx.save(model, onnx_path)
    card = tomllib.loads((PACKAGED_DIR / "reference-redcnn.toml").read_text(encoding="utf-8"))
    card.update(name=name, version=version, onnx=onnx_path.name, sha256=file_sha256(onnx_path),
                intended_use="TEST ONLY: a zero residual, the output is the input (engines/train/identity.py)",
                training_data="none: not trained")
    card.pop("scores", None)
    path = folder / f"{name}-{version}.toml"
    path.write_text(tomli_w.dumps(card), encoding="utf-8")
    return path
