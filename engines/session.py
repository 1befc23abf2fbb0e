"""What every denoiser session promises, and the checks of a model against its card.

A `Backend` loads an ONNX model with its card into a `Session`; ``Session.run(batch)`` maps a batch of
(N, C, H, W) float32 to (N, 1, H, W) float32, C = 2k+1 (card.input.context_slices = k). What the numbers
are is the session's ``io``:

- ``"network"``: the network's own input and output; the caller applies the card's normalisation and
  output mapping (engines.tiling does, in NumPy). The ONNX Runtime CPU twin is such a session.
- ``"hu"``: HU in, HU out; the session applies the card's arithmetic itself, with the CUDA kernels of
  kernels/src/hu.cu inside its TensorRT engine or on the engine's stream (engines.hu_io).

Both backends check the model against its card when they load it (`check_model`), so a mismatch is a
CardError at start, not a shape error in the middle of a study.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import numpy as np

from engines.card import CardError, ModelCard, file_sha256

SessionIO = Literal["network", "hu"]


class Session(Protocol):
    io: SessionIO  # "network": network input -> network output; "hu": HU -> HU (see the module's docstring)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 -> (N, 1, H, W) float32."""
        ...


class Backend(Protocol):
    name: str

    def load(self, onnx_path: Path, card: ModelCard) -> Session: ...


class BackendUnavailable(Exception):
    """The asked-for backend cannot run here (library missing, no GPU); the message says which."""


class InferenceError(Exception):
    """A network run failed or returned something the card's contract does not allow."""


# ---------------------------------------------------------------------------------------------- model checks

class TensorSpec(NamedTuple):
    name: str
    shape: tuple[int | None, ...]  # None: a dynamic dimension
    dtype: str  # numpy name: 'float32', 'float16', ...


def check_model(onnx_path: Path, card: ModelCard | None, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Raise CardError when the model cannot serve the card's (N, 2k+1, H, W) -> (N, 1, H, W) contract."""
    where = Path(onnx_path).name
    require_card(onnx_path, card)
    if len(inputs) != 1 or len(outputs) != 1:
        raise CardError(f"{where}: expected one input and one output, the model has {len(inputs)} input(s) "
                        f"{[i.name for i in inputs]} and {len(outputs)} output(s)")
    inp, out = inputs[0], outputs[0]
    if len(inp.shape) != 4:
        raise CardError(f"{where}: input '{inp.name}' has rank {len(inp.shape)} {_fmt(inp.shape)}, "
                        "the card's contract is rank 4 (N, C, H, W)")
    channels = card.input.channels
    if inp.shape[1] is not None and inp.shape[1] != channels:
        raise CardError(f"{where}: input '{inp.name}' takes {inp.shape[1]} channel(s), but card "
                        f"'{card.name}' has context_slices = {card.input.context_slices}, i.e. {channels} "
                        "channel(s) (2k+1): the card and the model do not belong together")
    if inp.dtype != "float32" or out.dtype != "float32":
        raise CardError(f"{where}: input and output must be float32, they are {inp.dtype} and {out.dtype} "
                        "(an fp16 model must keep float32 I/O: engines.build.to_fp16)")
    if len(out.shape) != 4 or (out.shape[1] is not None and out.shape[1] != 1):
        raise CardError(f"{where}: output '{out.name}' is {_fmt(out.shape)}, the card's contract is (N, 1, H, W)")


def require_card(onnx_path: Path, card: ModelCard | None) -> ModelCard:
    if card is None:
        raise CardError(f"{Path(onnx_path).name}: no model card; a denoiser is an ONNX file plus a TOML card "
                        "beside it, which says its context slices, normalisation and output meaning")
    return card


def check_card_hash(onnx_path: Path, card: ModelCard) -> str:
    """The model's sha256, which must be the card's (the engine cache is keyed by it)."""
    digest = file_sha256(Path(onnx_path))
    if digest != card.sha256:
        raise CardError(f"{Path(onnx_path).name}: sha256 {digest[:12]}... does not match card '{card.name}' "
                        f"({card.sha256[:12]}...): the card and the model do not belong together")
    return digest


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def onnx_io(onnx_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs as read by the onnx package (weights not loaded)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        return TensorSpec(v.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name)

    return ([spec(v) for v in model.graph.input if v.name not in initializers],
            [spec(v) for v in model.graph.output])


def check_batch(batch: np.ndarray, channels: int) -> np.ndarray:
    if batch.ndim != 4 or batch.shape[1] != channels:
        raise InferenceError(f"batch of shape {batch.shape}: the network takes (N, {channels}, H, W)")
    return np.ascontiguousarray(batch, dtype=np.float32)


def check_output(y: np.ndarray, batch_shape: tuple[int, ...]) -> np.ndarray:
    n, _, h, w = batch_shape
    if y.shape != (n, 1, h, w):
        raise InferenceError(f"the network returned {y.shape} for input {batch_shape}; expected {(n, 1, h, w)}")
    return y
