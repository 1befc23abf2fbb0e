"""The TensorRT backend: engines from the engine cache, run with ``execute_async_v3`` on a CUDA stream.

Works with full TensorRT (``tensorrt``) or TensorRT-RTX (``tensorrt_rtx``); both, and pycuda, are imported
only on this path, because without a GPU driver they fail to import (../shared/TRAPS.md).

A session takes HU and returns HU (``io = "hu"``, engines.session): the card's normalisation and output
mapping run on the GPU, as the kernels of kernels/src/hu.cu (engines.hu_io),

- inside the engine, as ahead-of-time plugins, where the TensorRT flavour has them (``hu_kernels="plugin"``);
- else on the engine's stream, just before and after ``execute_async_v3`` (``"stream"``; TensorRT-RTX).

``hu_kernels="auto"`` picks the first that works. The documented fallback ``"host"`` (also taken, with a
warning, when the stream kernels cannot be built or loaded, e.g. no nvcc on the machine) gives a session of
``io = "network"``, and the caller does the arithmetic in NumPy as for the CPU twin (engines.tiling).
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
from engines.hu_io import KERNELS, card_params, plugin_support, stream_launches
from engines.session import (BackendUnavailable, InferenceError, SessionIO, check_batch, check_card_hash,
                             check_model, check_output, onnx_io, require_card)

log = get_logger(__name__)

DEFAULT_ENGINE_CACHE = Path("/var/lib/appliance/engines")
HuKernels = Literal["auto", "plugin", "stream", "host"]


class HuKernelsUnavailable(Exception):
    """The HU kernels cannot run on the engine's stream here (no nvcc to build them, or they do not load)."""


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


def load_hu_kernels(cc: tuple[int, int]) -> dict:
    """hu.cu's plugin-convention kernels by op (engines.hu_io.KERNELS) from an nvcc fatbin holding the
    architecture of compute capability ``cc`` (kernels.build), loaded into the current CUDA context.
    Raises HuKernelsUnavailable (no nvcc, a compile or load error)."""
    import pycuda.driver as cuda

    from kernels.build import GPU_ARCHS, SOURCE_DIR, KernelBuildError, fatbin as kernel_fatbin

    arch = f"{cc[0]}{cc[1]}"
    try:
        path = kernel_fatbin(SOURCE_DIR / "hu.cu", GPU_ARCHS if arch in GPU_ARCHS else (arch,))
        module = cuda.module_from_file(str(path))
        return {op: module.get_function(abi.kernel) for op, abi in KERNELS.items()}
    except (KernelBuildError, cuda.Error) as exc:
        raise HuKernelsUnavailable(f"the HU kernels for sm_{arch}: {type(exc).__name__}: {exc}") from exc


class TensorRTSession:
    """One engine, one execution context, one CUDA stream, on the primary context of ``device``.

    engine_io: "hu" for an engine with the HU plugins inside (HU in, HU out as it stands); "network" for one
    without, around which the session launches the HU kernels on its stream (``stream_kernels``) or, if it
    may not, leaves the arithmetic to the caller (the session's ``io`` is then "network").

    Batches larger than the profile's max_batch are run in chunks; H or W outside the profile is an
    InferenceError (tile the volume: engines.tiling, tile_hw). Pinned host and device buffers grow to the
    largest batch seen and are reused. ``run`` is serialised by a lock; any thread may call it (the primary
    context is pushed around each call).
    """

    def __init__(self, engine_bytes: bytes, flavour: TrtFlavour, profile: ShapeProfile, card: ModelCard,
                 device: int = 0, runtime_cache_path: Path | None = None, engine_io: SessionIO = "network",
                 stream_kernels: bool = True):
        import pycuda.driver as cuda

        self._cuda, self._trt, self.profile, self.card = cuda, flavour.module, profile, card
        self.engine_io = engine_io
        self._lock = threading.Lock()
        self._runtime_cache_path, self._runtime_cache, self._runtime_cache_saved = runtime_cache_path, None, False
        self._kernels, self._params = None, None
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
            if engine_io == "network" and stream_kernels:
                self._kernels = load_hu_kernels(cuda.Device(device).compute_capability())
                self._params = cuda.to_device(card_params(card))
        finally:
            self._ctx.pop()
        self.io: SessionIO = "hu" if engine_io == "hu" or self._kernels is not None else "network"
        self._host_in = self._host_out = None
        self._dev: dict[str, object] = {}
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
        """Pinned host buffers and device buffers for n_in input and n_out output floats: ``hu`` (the
        input), ``hu_out`` (the output) and, for the stream kernels, the network's own ``x`` and ``y``."""
        if n_in <= self._capacity[0] and n_out <= self._capacity[1]:
            return
        cuda = self._cuda
        n_in, n_out = max(n_in, self._capacity[0]), max(n_out, self._capacity[1])
        for buf in self._dev.values():
            buf.free()
        self._host_in = cuda.pagelocked_empty(n_in, np.float32)
        self._host_out = cuda.pagelocked_empty(n_out, np.float32)
        sizes = {"hu": n_in, "hu_out": n_out, **({"x": n_in, "y": n_out} if self._kernels else {})}
        self._dev = {name: cuda.mem_alloc(n * 4) for name, n in sizes.items()}
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
        buffers = {**self._dev, "params": self._params}
        cuda.memcpy_htod_async(buffers["hu"], host_in, self._stream)
        if self._kernels is None:  # the engine's I/O is the session's: HU (plugins inside) or the network's own
            ctx.set_tensor_address(self._input, int(buffers["hu"]))
            ctx.set_tensor_address(self._output, int(buffers["hu_out"]))
            before = after = None
        else:  # the HU kernels around the engine, on its stream: ordered with it, no host round trip
            ctx.set_tensor_address(self._input, int(buffers["x"]))
            ctx.set_tensor_address(self._output, int(buffers["y"]))
            before, after = stream_launches(chunk.shape, self.card)
            self._launch(before, buffers)
        if not ctx.execute_async_v3(stream_handle=self._stream.handle):
            raise InferenceError("execute_async_v3 failed (see the TensorRT log)")
        if after is not None:
            self._launch(after, buffers)
        cuda.memcpy_dtoh_async(host_out, buffers["hu_out"], self._stream)
        self._stream.synchronize()
        return host_out.copy()

    def _launch(self, launch, buffers: dict) -> None:
        self._kernels[launch.op](*launch.args(buffers, np.int32), grid=launch.grid, block=launch.block,
                                 stream=self._stream)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) -> (N, 1, H, W) float32: HU to HU, or network input to output where ``io`` is
        "network"."""
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
                for buf in [*self._dev.values(), *([self._params] if self._params is not None else [])]:
                    buf.free()
                self._dev, self._params, self._kernels = {}, None, None
                self._context = self._engine = None
            finally:
                self._ctx.pop()


class TensorRTBackend:
    """Engines from the engine cache, built on a miss (and cached) for this GPU, flavour, precision and I/O.

    precision: what to build at where the card allows it (``card.precisions``); otherwise the card's own.
    hu_kernels: where the card's HU arithmetic runs (module docstring): "auto", "plugin", "stream", "host".
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
        hu_kernels: HuKernels = "auto",
    ):
        if hu_kernels not in ("auto", "plugin", "stream", "host"):
            raise ValueError(f"hu_kernels must be auto, plugin, stream or host, not {hu_kernels!r}")
        self.cache = EngineCache(cache_root)
        self.precision, self.device, self._prefer, self.hu_kernels = precision, device, flavour, hu_kernels
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
        no_plugins = plugin_support(flavour.module)
        if self.hu_kernels == "plugin" and no_plugins:
            raise BackendUnavailable(f"HU kernels inside the engine: {no_plugins}")
        engine_io: SessionIO = "hu" if self.hu_kernels in ("auto", "plugin") and not no_plugins else "network"
        if engine_io == "network" and self.hu_kernels == "auto":
            log.info("hu_kernels_on_stream", flavour=flavour.name, reason=no_plugins)
        session = None
        while session is None:
            key = cache_key(digest, flavour.name, flavour.version, cc, precision, profile, engine_io)
            try:
                session = self._session(onnx_path, card, digest, flavour, cc, precision, profile, engine_io, key)
            except InferenceError as exc:
                if not (engine_io == "hu" and self.hu_kernels == "auto"):
                    raise
                # An engine with plugins that does not build or load must not cost the GPU path: the same
                # kernels run on the stream instead.
                log.warning("hu_plugins_unusable", reason=str(exc), fallback="stream")
                engine_io = "network"
        log.info("model_loaded", backend=self.name, flavour=flavour.name, version=flavour.version,
                 compute_capability=cc, precision=precision, model=card.name, engine_io=engine_io,
                 session_io=session.io, key=key)
        return session

    def _session(self, onnx_path: Path, card: ModelCard, digest: str, flavour: TrtFlavour, cc: str,
                 precision: Precision, profile: ShapeProfile, engine_io: SessionIO, key: str) -> TensorRTSession:
        engine = self.cache.get(key)
        for attempt in (1, 2):
            if engine is None:
                engine = self._build(onnx_path, card, digest, flavour, cc, precision, profile, engine_io, key)
            try:
                return self._open(engine, flavour, profile, card, key, engine_io)
            except InferenceError as exc:
                if attempt == 2:
                    self.cache.remove(key)  # a rebuilt engine that does not load is not worth keeping
                    raise
                log.warning("engine_unusable_rebuilding", key=key, reason=str(exc))
                self.cache.remove(key)
                engine = None
        raise AssertionError("unreachable")

    def _open(self, engine: bytes, flavour: TrtFlavour, profile: ShapeProfile, card: ModelCard, key: str,
              engine_io: SessionIO) -> TensorRTSession:
        rtcache = self.cache.path_for(key).with_suffix(".rtcache")
        stream_kernels = engine_io == "network" and self.hu_kernels != "host"
        try:
            return TensorRTSession(engine, flavour, profile, card, self.device, rtcache, engine_io, stream_kernels)
        except HuKernelsUnavailable as exc:
            if self.hu_kernels == "stream":
                raise BackendUnavailable(f"HU kernels on the engine's stream: {exc}") from exc
            log.warning("hu_kernels_unavailable", reason=str(exc), fallback="host (NumPy around the engine)")
            return TensorRTSession(engine, flavour, profile, card, self.device, rtcache, engine_io, False)

    def _build(self, onnx_path: Path, card: ModelCard, digest: str, flavour: TrtFlavour, cc: str,
               precision: Precision, profile: ShapeProfile, engine_io: SessionIO, key: str) -> bytes:
        started = time.perf_counter()
        try:
            engine = build_engine(
                onnx_path, flavour_module=flavour.module, compute_capability=None, precision=precision,
                max_batch=profile.max_batch, opt_batch=profile.opt_batch, min_hw=profile.min_hw,
                opt_hw=profile.opt_hw, max_hw=profile.max_hw, channels=profile.channels,
                timing_cache_path=self.cache.root / f"timing-{flavour.name}-{flavour.version}-sm{cc}.cache",
                io=engine_io, card=card,
            )
        except EngineBuildError as exc:
            raise InferenceError(f"cannot build an engine for '{card.name}': {exc}") from exc
        self.cache.put(key, engine, {
            "onnx_sha256": digest, "flavour": flavour.name, "trt_version": flavour.version,
            "compute_capability": cc, "precision": precision, "profile": profile, "io": engine_io,
            "build_seconds": round(time.perf_counter() - started, 3), "model": card.name,
            "model_version": card.version,
        })
        return engine
