"""ONNX -> serialised TensorRT engine, with full TensorRT or TensorRT-RTX.

TensorRT 11 and TensorRT-RTX are strongly typed: there is no FP16 builder flag, the precision is the ONNX
file's (../shared/TRAPS.md). An fp16 engine is therefore built from an fp16 copy of the model made by
`to_fp16`, which keeps the network's input and output float32 so the runtime feeds and reads float32.

TensorRT-RTX builds ahead of time on a machine without a GPU for a named compute capability (SM75, SM80,
SM86, SM89, SM120, SM121 in 1.7); CI uses that to prove the build path. Full TensorRT builds only for the GPU
it runs on. TensorRT-RTX has no timing cache (its builder does not time tactics; the calls are deprecated
no-ops since RTX 1.2), so ``timing_cache_path`` is used with full TensorRT only.

``io = "hu"`` builds the engine around the card's arithmetic: the model is wrapped with the HU plugins
(engines.hu_io.wrap_onnx) after any fp16 conversion, so the engine takes the HU batch (N, C, H, W) and
returns HU (N, 1, H, W). It needs a TensorRT with ahead-of-time Python plugins (engines.hu_io.plugin_support;
not TensorRT-RTX 1.7) and nvcc for the kernels' PTX.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

from appliance.logging import get_logger
from engines.cache import atomic_write, normalize_compute_capability
from engines.card import ModelCard

log = get_logger(__name__)

Precision = Literal["fp16", "fp32"]


class EngineBuildError(Exception):
    """The engine could not be built; the message carries the parser's and the builder's errors."""


@dataclass(frozen=True)
class ShapeProfile:
    """The optimisation profile: batch of slices N in [1, max_batch], H and W in [min, max] pixels."""

    channels: int
    max_batch: int = 16
    opt_batch: int | None = None  # None: max_batch (a full slab is the common case)
    min_hw: tuple[int, int] = (64, 64)
    opt_hw: tuple[int, int] = (512, 512)
    max_hw: tuple[int, int] = (1024, 1024)

    def __post_init__(self) -> None:
        if self.opt_batch is None:
            object.__setattr__(self, "opt_batch", self.max_batch)
        if self.channels < 1 or self.max_batch < 1 or not 1 <= self.opt_batch <= self.max_batch:
            raise ValueError(f"bad profile: channels {self.channels}, batch opt {self.opt_batch} max {self.max_batch}")
        for axis in (0, 1):
            if not 1 <= self.min_hw[axis] <= self.opt_hw[axis] <= self.max_hw[axis]:
                raise ValueError(f"profile needs 1 <= min <= opt <= max for H and W: {self.min_hw}, "
                                 f"{self.opt_hw}, {self.max_hw}")

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        c = self.channels
        return ((1, c, *self.min_hw), (self.opt_batch, c, *self.opt_hw), (self.max_batch, c, *self.max_hw))

    def admits(self, shape: tuple[int, ...]) -> bool:
        n, c, h, w = shape
        return (1 <= n <= self.max_batch and c == self.channels
                and self.min_hw[0] <= h <= self.max_hw[0] and self.min_hw[1] <= w <= self.max_hw[1])


def to_fp16(onnx_path: Path, out_path: Path) -> Path:
    """Write an fp16 copy of the model: weights and compute in fp16, the graph's input and output float32
    (a Cast at each end). Uses onnxconverter-common's converter, which keeps the ops it knows to be unsafe
    in fp16 (e.g. Resize scales, range ops) in fp32 and clamps weights to the fp16 range."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(onnx_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    # The converter warns once per tensor whose values leave fp16's range. Tiny weights pushed up to
    # 1e-7 change nothing that matters; values clamped to +-1e4 do, and deserve a look at the model.
    clamped = [str(w.message) for w in caught if "will be truncated" in str(w.message)]
    overflow = [m for m in clamped if not m.endswith("1e-07")]
    if overflow:
        log.warning("fp16_overflow_clamped", model=Path(onnx_path).name, tensors=len(overflow), first=overflow[0])
    elif clamped:
        log.info("fp16_underflow_clamped", model=Path(onnx_path).name, tensors=len(clamped))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(out_path))
    return out_path


def local_compute_capability(device: int = 0) -> str | None:
    """The compute capability of CUDA device ``device`` ('8.9'), or None without a driver or a GPU."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() <= device:
            return None
        major, minor = cuda.Device(device).compute_capability()
        return f"{major}.{minor}"
    except Exception:  # no libcuda.so.1, no device, a driver too old: all mean "no GPU here"
        return None


def rtx_compute_capabilities(trt: ModuleType) -> dict[str, object]:
    """The compute capabilities a TensorRT-RTX module can target: {'8.9': trt.ComputeCapability.SM89, ...}."""
    members = {}
    for name in dir(trt.ComputeCapability):
        if name.startswith("SM") and name[2:].isdigit():
            members[f"{name[2:-1]}.{name[-1]}"] = getattr(trt.ComputeCapability, name)
    return members


def _is_rtx(trt: ModuleType) -> bool:
    return trt.__name__.split(".")[0] == "tensorrt_rtx"


def _collecting_logger(trt: ModuleType):
    class CollectingLogger(trt.ILogger):
        """Keeps the errors (for EngineBuildError) and forwards warnings to our log."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):  # noqa: D401 (TensorRT's callback)
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(msg)
                log.error("tensorrt", message=msg)
            elif severity == trt.ILogger.WARNING:
                log.warning("tensorrt", message=msg)

    return CollectingLogger()


def _parser_errors(parser) -> list[str]:
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        errors.append(f"node {e.node()} ({e.node_operator()} '{e.node_name()}'): {e.desc()}")
    return errors


def build_engine(
    onnx_path: Path,
    *,
    flavour_module: ModuleType,
    compute_capability: str | None = None,
    precision: Precision = "fp16",
    max_batch: int = 16,
    min_hw: tuple[int, int] = (64, 64),
    opt_hw: tuple[int, int] = (512, 512),
    max_hw: tuple[int, int] = (1024, 1024),
    opt_batch: int | None = None,
    channels: int | None = None,
    timing_cache_path: Path | None = None,
    workspace_bytes: int | None = None,
    io: Literal["network", "hu"] = "network",
    card: ModelCard | None = None,
) -> bytes:
    """Build a serialised engine for ``onnx_path``, an (N, C, H, W) -> (N, 1, H, W) network.

    compute_capability: '8.6', '8.9'...; None builds for the local GPU. With TensorRT-RTX a named one builds
    ahead of time, GPU or not; full TensorRT accepts only None or the local GPU's own.
    precision: 'fp16' builds from an fp16 copy of the model (see `to_fp16`); 'fp32' from the file as it is.
    channels: C of the profile; None reads it from the model's input (it must then be static).
    io: 'network' (the model as it is) or 'hu' (the card's HU arithmetic embedded as plugins; needs ``card``).
    Raises EngineBuildError with the parser's and builder's messages.
    """
    trt = flavour_module
    onnx_path = Path(onnx_path)
    rtx = _is_rtx(trt)
    if precision not in ("fp16", "fp32"):
        raise EngineBuildError(f"precision must be 'fp16' or 'fp32', not {precision!r}")
    if io not in ("network", "hu"):
        raise EngineBuildError(f"io must be 'network' or 'hu', not {io!r}")
    if io == "hu":
        _prepare_hu_plugins(trt, onnx_path, card, compute_capability)
    started = time.perf_counter()
    logger = _collecting_logger(trt)

    def fail(what: str, extra: list[str] = ()) -> EngineBuildError:
        details = [*extra, *logger.errors]
        return EngineBuildError(f"{onnx_path.name}: {what}" + ("".join(f"\n  {d}" for d in details)))

    with tempfile.TemporaryDirectory(prefix="engine-build-") as tmp:
        model_path = to_fp16(onnx_path, Path(tmp) / "model-fp16.onnx") if precision == "fp16" else onnx_path
        if io == "hu":
            from engines.hu_io import wrap_onnx

            model_path = wrap_onnx(model_path, Path(tmp) / "model-hu.onnx", card)
        builder = trt.Builder(logger)
        flags = 0
        if hasattr(trt, "NetworkDefinitionCreationFlag") and hasattr(trt.NetworkDefinitionCreationFlag,
                                                                        "STRONGLY_TYPED"):
            # Default (and only mode) in TensorRT 11 / RTX; TensorRT 10 needs it asked for, or it may run
            # an fp16 model's layers in fp32 and an fp32 model's in whatever it likes.
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(model_path.read_bytes(), str(model_path)):
            raise fail("the ONNX parser refused the model", _parser_errors(parser))
        if network.num_inputs != 1 or network.num_outputs != 1:
            raise fail(f"expected one input and one output, the model has {network.num_inputs} and "
                       f"{network.num_outputs}")
        inp = network.get_input(0)
        if len(inp.shape) != 4:
            raise fail(f"input '{inp.name}' has rank {len(inp.shape)}, expected 4 (N, C, H, W)")
        model_channels = int(inp.shape[1])
        if channels is None:
            if model_channels < 0:
                raise fail(f"input '{inp.name}' has a dynamic channel dimension: pass channels=")
            channels = model_channels
        elif model_channels >= 0 and model_channels != channels:
            raise fail(f"input '{inp.name}' takes {model_channels} channels, the profile asks for {channels}")
        profile = ShapeProfile(channels=channels, max_batch=max_batch, opt_batch=opt_batch,
                               min_hw=tuple(min_hw), opt_hw=tuple(opt_hw), max_hw=tuple(max_hw))

        config = builder.create_builder_config()
        opt = builder.create_optimization_profile()
        opt.set_shape(inp.name, *profile.shapes())
        config.add_optimization_profile(opt)
        if workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            # TF32 (on by default) keeps 10 mantissa bits in convolutions: ~0.5 HU on a residual of 1000 HU.
            # An fp32 engine is the accurate one, within 0.05 HU of the CPU twin.
            config.clear_flag(trt.BuilderFlag.TF32)

        target = "local GPU"
        if rtx:
            targets = rtx_compute_capabilities(trt)
            if compute_capability is None:
                member = trt.ComputeCapability.CURRENT
            else:
                cc = normalize_compute_capability(compute_capability)
                if cc not in targets:
                    known = sorted(targets, key=lambda t: tuple(map(int, t.split("."))))
                    raise fail(f"TensorRT-RTX {trt.__version__} cannot target compute capability {cc}; "
                               f"it can target {', '.join(known)}")
                member, target = targets[cc], f"sm_{cc.replace('.', '')}"
            config.num_compute_capabilities = 1
            config.set_compute_capability(member, 0)
        else:
            if compute_capability is not None:
                cc, local = normalize_compute_capability(compute_capability), local_compute_capability()
                if cc != local:
                    raise fail(f"full TensorRT builds only for the GPU it runs on ({local or 'none here'}), "
                               f"not for {cc}: build on such a GPU, or use TensorRT-RTX for AOT builds")
            if timing_cache_path is not None:
                cached = Path(timing_cache_path).read_bytes() if Path(timing_cache_path).exists() else b""
                config.set_timing_cache(config.create_timing_cache(cached), ignore_mismatch=False)

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise fail(f"build_serialized_network failed ({trt.__name__} {trt.__version__}, {target}, {precision})")
        engine = bytes(memoryview(serialized))
        if not engine:
            raise fail("the builder returned an empty engine")

        if not rtx and timing_cache_path is not None:
            path = Path(timing_cache_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, bytes(memoryview(config.get_timing_cache().serialize())))

    log.info("engine_built", onnx=onnx_path.name, flavour=trt.__name__, version=trt.__version__, target=target,
             precision=precision, io=io, bytes=len(engine), seconds=round(time.perf_counter() - started, 3))
    return engine


def _prepare_hu_plugins(trt: ModuleType, onnx_path: Path, card: ModelCard | None,
                        compute_capability: str | None) -> None:
    """Register the HU plugins with their PTX for the engine's target, or say why they cannot be embedded."""
    from engines.hu_io import plugin_support, ptx_arch, register_plugins
    from kernels.build import SOURCE_DIR, KernelBuildError, build_ptx

    where = Path(onnx_path).name
    if card is None:
        raise EngineBuildError(f"{where}: an engine with HU I/O needs the model's card (normalisation, output)")
    reason = plugin_support(trt)
    if reason is not None:
        raise EngineBuildError(f"{where}: cannot embed the HU kernels as plugins: {reason}")
    cc = normalize_compute_capability(compute_capability) if compute_capability else local_compute_capability()
    if cc is None:
        raise EngineBuildError(f"{where}: no GPU here to take the plugins' PTX target from: name the target")
    try:
        ptx = build_ptx(SOURCE_DIR / "hu.cu", ptx_arch(cc)).read_bytes()
    except KernelBuildError as exc:
        raise EngineBuildError(f"{where}: the HU plugins' PTX: {exc}") from exc
    register_plugins(trt, ptx)
