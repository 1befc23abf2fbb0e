"""Runtime backends for denoiser networks behind one small interface (engines.session).

``Backend.load(onnx_path, card) -> Session``; ``Session.run(batch)`` maps (N, C, H, W) float32 to
(N, 1, H, W) float32, C = 2k+1 (card.input.context_slices = k); the session's ``io`` says whether those are
the network's own input and output or HU (engines.session). Tiling is not here (engines.tiling).

- `OnnxRuntimeBackend`: the CPU twin, always available; ``io = "network"``.
- `TensorRTBackend` (engines.tensorrt_runtime): an engine built from the same ONNX, kept in the engine cache,
  run on a CUDA stream with the card's HU arithmetic on the GPU; ``io = "hu"``.

`select_backend` picks one. The names of engines.session and engines.tensorrt_runtime are importable from
here too; importing them imports no TensorRT or pycuda (those load only when a GPU path runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from appliance.logging import get_logger
from engines.build import Precision, local_compute_capability
from engines.card import CardError, ModelCard
from engines.session import (  # re-exported: the runtime's public names (__all__)
    Backend,
    BackendUnavailable,
    InferenceError,
    Session,
    SessionIO,
    TensorSpec,
    check_batch,
    check_card_hash,
    check_model,
    check_output,
    onnx_io,
    require_card,
)
from engines.tensorrt_runtime import (  # re-exported; imports no TensorRT by itself
    DEFAULT_ENGINE_CACHE,
    TensorRTBackend,
    TensorRTSession,
    TrtFlavour,
    trt_flavour,
)

__all__ = [
    "Backend", "BackendUnavailable", "DEFAULT_ENGINE_CACHE", "InferenceError", "OnnxRuntimeBackend",
    "OnnxRuntimeSession", "Session", "SessionIO", "TensorRTBackend", "TensorRTSession", "TensorSpec", "TrtFlavour",
    "check_batch", "check_card_hash", "check_model", "check_output", "onnx_io", "require_card", "select_backend",
    "trt_flavour",
]

log = get_logger(__name__)


# ----------------------------------------------------------------------------------------------- ONNX Runtime

class OnnxRuntimeSession:
    io: SessionIO = "network"  # the caller applies the card's arithmetic (engines.tiling, in NumPy)

    def __init__(self, session: Any, input_name: str, channels: int):
        self._session, self._input, self._channels = session, input_name, channels

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, self._channels)
        (y,) = self._session.run(None, {self._input: batch})
        return check_output(np.asarray(y, dtype=np.float32), batch.shape)


class OnnxRuntimeBackend:
    """The CPU twin: ONNX Runtime's CPU execution provider on the same ONNX file."""

    name = "onnxruntime"

    def __init__(self, intra_op_threads: int | None = None):
        self.intra_op_threads = intra_op_threads  # None: ONNX Runtime's default (one per physical core)

    def load(self, onnx_path: Path, card: ModelCard | None) -> OnnxRuntimeSession:
        import onnxruntime as ort

        onnx_path = Path(onnx_path)
        check_card_hash(onnx_path, require_card(onnx_path, card))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only: its warnings are about graph rewrites, not our data
        if self.intra_op_threads:
            opts.intra_op_num_threads = int(self.intra_op_threads)
        try:
            session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for a model it cannot load
            raise CardError(f"{onnx_path.name}: ONNX Runtime cannot load the model: {exc}") from exc

        def spec(a) -> TensorSpec:
            dtype = {"tensor(float)": "float32", "tensor(float16)": "float16"}.get(a.type, a.type)
            return TensorSpec(a.name, tuple(d if isinstance(d, int) else None for d in a.shape), dtype)

        inputs, outputs = [spec(a) for a in session.get_inputs()], [spec(a) for a in session.get_outputs()]
        check_model(onnx_path, card, inputs, outputs)
        log.info("model_loaded", backend=self.name, model=card.name, version=card.version,
                 intra_op_threads=self.intra_op_threads or "default")
        return OnnxRuntimeSession(session, inputs[0].name, card.input.channels)


# ---------------------------------------------------------------------------------------------- selection

def select_backend(
    preference: Literal["auto", "tensorrt", "onnxruntime"] = "auto",
    *,
    engine_cache: Path = DEFAULT_ENGINE_CACHE,
    precision: Precision = "fp16",
    intra_op_threads: int | None = None,
) -> Backend:
    """auto: TensorRT when a TensorRT imports and a CUDA GPU is present, else ONNX Runtime (the reason is
    logged). 'tensorrt' insists (BackendUnavailable otherwise); 'onnxruntime' is always available."""
    if preference == "onnxruntime":
        return OnnxRuntimeBackend(intra_op_threads)
    if preference not in ("auto", "tensorrt"):
        raise ValueError(f"backend preference must be auto, tensorrt or onnxruntime, not {preference!r}")
    try:
        flavour = trt_flavour()
        cc = local_compute_capability()
        if cc is None:
            raise BackendUnavailable("no CUDA GPU (pycuda cannot initialise the driver or finds no device)")
    except BackendUnavailable as exc:
        if preference == "tensorrt":
            raise
        log.info("backend_selected", backend="onnxruntime", reason=f"TensorRT not usable: {exc}")
        return OnnxRuntimeBackend(intra_op_threads)
    log.info("backend_selected", backend="tensorrt", flavour=flavour.name, version=flavour.version,
             compute_capability=cc, reason="TensorRT imports and a GPU is present")
    return TensorRTBackend(engine_cache, precision=precision)
