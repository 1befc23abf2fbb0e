"""The TensorRT backend: engines from the engine cache, run with ``execute_async_v3`` on a CUDA stream.

An engine is built from the same ONNX as the CPU twin (engines.build), kept in the engine cache
(engines.cache) and run on a pycuda stream from pinned host buffers. Works with full TensorRT (``tensorrt``)
or TensorRT-RTX (``tensorrt_rtx``); both, and pycuda, are imported only on this path, because without a GPU
driver they fail to import (../shared/TRAPS.md).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Literal, NamedTuple

import numpy as np

from appliance.logging import get_logger
from engines.build import EngineBuildError, Precision, ShapeProfile, build_engine, local_compute_capability
from engines.cache import EngineCache, atomic_write, cache_key
from engines.card import ModelCard
from engines.session import (BackendUnavailable, InferenceError, check_batch, check_card_hash, check_model,
                             check_output, onnx_io, require_card)

log = get_logger(__name__)

DEFAULT_ENGINE_CACHE = Path("/var/lib/appliance/engines")


class TrtFlavour(NamedTuple):
    name: Literal["tensorrt", "tensorrt_rtx"]
    module: ModuleType
    version: str


def trt_flavour(prefer: Literal["tensorrt", "tensorrt_rtx"] | None = None) -> TrtFlavour:
    """The TensorRT that imports here: full TensorRT first (JetPack, NVIDIA's x86 repository), then
    TensorRT-RTX, unless ``prefer`` names one. Raises BackendUnavailable with each import's error."""
    order = ["tensorrt", "tensorrt_rtx"]
    if prefer is not None:
        order = [prefer]
    reasons = []
    for name in order:
        try:
            module = __import__(name)
            return TrtFlavour(name, module, str(module.__version__))
        except Exception as exc:  # ImportError, or OSError/RuntimeError from a broken native library
            reasons.append(f"{name}: {type(exc).__name__}: {exc}")
    raise BackendUnavailable("no TensorRT importable (" + "; ".join(reasons) + ")")


class TensorRTSession:
    """One engine, one execution context, one CUDA stream, on the primary context of ``device``.

    Batches larger than the profile's max_batch are run in chunks; H or W outside the profile is an
    InferenceError (tile the volume: engines.tiling, tile_hw). Pinned host and device buffers grow to the
    largest batch seen and are reused. ``run`` is serialised by a lock; any thread may call it (the primary
    context is pushed around each call).
    """

    def __init__(self, engine_bytes: bytes, flavour: TrtFlavour, profile: ShapeProfile, device: int = 0,
                 runtime_cache_path: Path | None = None):
        import pycuda.driver as cuda

        self._cuda, self._trt, self.profile = cuda, flavour.module, profile
        self._lock = threading.Lock()
        self._runtime_cache_path, self._runtime_cache, self._runtime_cache_saved = runtime_cache_path, None, False
        cuda.init()
        self._ctx = cuda.Device(device).retain_primary_context()
        self._ctx.push()
        try:
            trt = self._trt
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
            if self._engine is None:
                raise InferenceError(f"{flavour.name} {flavour.version} cannot deserialise the engine "
                                     "(built by another version or for another GPU?)")
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            modes = {n: self._engine.get_tensor_mode(n) for n in names}
            self._input = next(n for n in names if modes[n] == trt.TensorIOMode.INPUT)
            self._output = next(n for n in names if modes[n] == trt.TensorIOMode.OUTPUT)
            for n in (self._input, self._output):
                if self._engine.get_tensor_dtype(n) != trt.DataType.FLOAT:
                    raise InferenceError(f"engine tensor '{n}' is {self._engine.get_tensor_dtype(n)}, not float32")
            self._context = self._create_context()
            self._stream = cuda.Stream()
        finally:
            self._ctx.pop()
        self._host_in = self._host_out = self._dev_in = self._dev_out = None
        self._capacity = (0, 0)

    def _create_context(self):
        # TensorRT-RTX compiles its kernels for the GPU on first use; its runtime cache keeps them across
        # restarts so the first study after a reboot does not pay for that again.
        if self._runtime_cache_path is not None and hasattr(self._engine, "create_runtime_config"):
            config = self._engine.create_runtime_config()
            if hasattr(config, "create_runtime_cache"):
                cache = config.create_runtime_cache()
                if self._runtime_cache_path.exists():
                    try:
                        cache.deserialize(self._runtime_cache_path.read_bytes())
                    except Exception as exc:  # a stale cache only costs compile time
                        log.warning("runtime_cache_ignored", path=str(self._runtime_cache_path), reason=str(exc))
                config.set_runtime_cache(cache)
                self._runtime_cache = cache
                return self._engine.create_execution_context(config)
        return self._engine.create_execution_context()

    def _save_runtime_cache(self) -> None:
        if self._runtime_cache is None or self._runtime_cache_saved:
            return
        try:
            atomic_write(self._runtime_cache_path, bytes(memoryview(self._runtime_cache.serialize())))
            self._runtime_cache_saved = True
        except Exception as exc:
            log.warning("runtime_cache_not_saved", path=str(self._runtime_cache_path), reason=str(exc))

    def _ensure_capacity(self, n_in: int, n_out: int) -> None:
        if n_in <= self._capacity[0] and n_out <= self._capacity[1]:
            return
        cuda = self._cuda
        n_in, n_out = max(n_in, self._capacity[0]), max(n_out, self._capacity[1])
        self._host_in = cuda.pagelocked_empty(n_in, np.float32)
        self._host_out = cuda.pagelocked_empty(n_out, np.float32)
        self._dev_in, self._dev_out = cuda.mem_alloc(n_in * 4), cuda.mem_alloc(n_out * 4)
        self._capacity = (n_in, n_out)

    def _run_chunk(self, chunk: np.ndarray) -> np.ndarray:
        cuda, ctx = self._cuda, self._context
        if not ctx.set_input_shape(self._input, chunk.shape):
            raise InferenceError(f"the engine refused input shape {chunk.shape}")
        out_shape = tuple(ctx.get_tensor_shape(self._output))
        self._ensure_capacity(chunk.size, int(np.prod(out_shape)))
        host_in = self._host_in[: chunk.size].reshape(chunk.shape)
        host_out = self._host_out[: int(np.prod(out_shape))].reshape(out_shape)
        np.copyto(host_in, chunk)
        cuda.memcpy_htod_async(self._dev_in, host_in, self._stream)
        ctx.set_tensor_address(self._input, int(self._dev_in))
        ctx.set_tensor_address(self._output, int(self._dev_out))
        if not ctx.execute_async_v3(stream_handle=self._stream.handle):
            raise InferenceError("execute_async_v3 failed (see the TensorRT log)")
        cuda.memcpy_dtoh_async(host_out, self._dev_out, self._stream)
        self._stream.synchronize()
        return host_out.copy()

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, self.profile.channels)
        _, c, h, w = batch.shape
        if not self.profile.admits((1, c, h, w)):
            raise InferenceError(f"slices of {h}x{w} are outside the engine's profile "
                                 f"{self.profile.min_hw}..{self.profile.max_hw}: tile the volume (tile_hw)")
        with self._lock:
            self._ctx.push()
            try:
                step = self.profile.max_batch
                y = np.concatenate([self._run_chunk(batch[i:i + step]) for i in range(0, len(batch), step)])
                self._save_runtime_cache()
            finally:
                self._ctx.pop()
        return check_output(y, batch.shape)

    def close(self) -> None:
        with self._lock:
            self._ctx.push()
            try:
                for buf in (self._dev_in, self._dev_out):
                    if buf is not None:
                        buf.free()
                self._dev_in = self._dev_out = None
                self._context = self._engine = None
            finally:
                self._ctx.pop()


class TensorRTBackend:
    """Engines from the engine cache, built on a miss (and cached) for this GPU, flavour and precision.

    precision: what to build at where the card allows it (``card.precisions``); otherwise the card's own.
    """

    name = "tensorrt"

    def __init__(
        self,
        cache_root: Path = DEFAULT_ENGINE_CACHE,
        *,
        precision: Precision = "fp16",
        max_batch: int = 16,
        min_hw: tuple[int, int] = (64, 64),
        opt_hw: tuple[int, int] = (512, 512),
        max_hw: tuple[int, int] = (1024, 1024),
        flavour: Literal["tensorrt", "tensorrt_rtx"] | None = None,
        device: int = 0,
    ):
        self.cache = EngineCache(cache_root)
        self.precision, self.device, self._prefer = precision, device, flavour
        self._shape = {"max_batch": max_batch, "min_hw": tuple(min_hw), "opt_hw": tuple(opt_hw),
                       "max_hw": tuple(max_hw)}

    def precision_for(self, card: ModelCard) -> Precision:
        """The backend's precision where the card allows it, else the card's first (fp16 only if allowed)."""
        if card.allows(self.precision):
            return self.precision
        chosen = card.precisions[0]
        log.info("precision_limited_by_card", model=card.name, asked=self.precision, chosen=chosen,
                 allowed=card.precisions)
        return chosen

    def load(self, onnx_path: Path, card: ModelCard | None) -> TensorRTSession:
        onnx_path = Path(onnx_path)
        digest = check_card_hash(onnx_path, require_card(onnx_path, card))
        check_model(onnx_path, card, *onnx_io(onnx_path))
        flavour = trt_flavour(self._prefer)
        cc = local_compute_capability(self.device)
        if cc is None:
            raise BackendUnavailable("TensorRT backend: no CUDA GPU (pycuda finds no device)")
        precision = self.precision_for(card)
        profile = ShapeProfile(channels=card.input.channels, max_batch=self._shape["max_batch"],
                               opt_batch=self._shape["max_batch"], min_hw=self._shape["min_hw"],
                               opt_hw=self._shape["opt_hw"], max_hw=self._shape["max_hw"])
        key = cache_key(digest, flavour.name, flavour.version, cc, precision, profile)
        engine = self.cache.get(key)
        for attempt in (1, 2):
            if engine is None:
                engine = self._build(onnx_path, card, digest, flavour, cc, precision, profile, key)
            try:
                session = TensorRTSession(engine, flavour, profile, self.device,
                                          runtime_cache_path=self.cache.path_for(key).with_suffix(".rtcache"))
                break
            except InferenceError as exc:
                if attempt == 2:
                    raise
                log.warning("engine_unusable_rebuilding", key=key, reason=str(exc))
                self.cache.remove(key)
                engine = None
        log.info("model_loaded", backend=self.name, flavour=flavour.name, version=flavour.version,
                 compute_capability=cc, precision=precision, model=card.name, key=key)
        return session

    def _build(self, onnx_path: Path, card: ModelCard, digest: str, flavour: TrtFlavour, cc: str,
               precision: Precision, profile: ShapeProfile, key: str) -> bytes:
        started = time.perf_counter()
        try:
            engine = build_engine(
                onnx_path, flavour_module=flavour.module, compute_capability=None, precision=precision,
                max_batch=profile.max_batch, opt_batch=profile.opt_batch, min_hw=profile.min_hw,
                opt_hw=profile.opt_hw, max_hw=profile.max_hw, channels=profile.channels,
                timing_cache_path=self.cache.root / f"timing-{flavour.name}-{flavour.version}-sm{cc}.cache",
            )
        except EngineBuildError as exc:
            raise InferenceError(f"cannot build an engine for '{card.name}': {exc}") from exc
        self.cache.put(key, engine, {
            "onnx_sha256": digest, "flavour": flavour.name, "trt_version": flavour.version,
            "compute_capability": cc, "precision": precision, "profile": profile,
            "build_seconds": round(time.perf_counter() - started, 3), "model": card.name,
            "model_version": card.version,
        })
        return engine
