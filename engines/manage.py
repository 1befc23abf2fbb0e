"""``appliance engines build | list | verify``: a field engineer's tools for models and engines."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from engines.build import EngineBuildError, ShapeProfile, build_engine, local_compute_capability
from engines.cache import EngineCache, cache_key
from engines.card import CardError, load_card


def verify(card_path: Path) -> str:
    """Load the card and model the way the daemon does and run one small batch on the CPU twin.
    Returns a one-line summary; raises CardError with the reason when the model is unusable."""
    from engines.runtime import OnnxRuntimeBackend

    card, onnx_path = load_card(card_path)
    session = OnnxRuntimeBackend().load(onnx_path, card)
    out = session.run(np.zeros((1, card.input.channels, 64, 64), dtype=np.float32))
    if out.shape != (1, 1, 64, 64) or not np.all(np.isfinite(out)):
        raise CardError(f"{onnx_path}: a 64x64 test batch gave shape {out.shape} or non-finite values")
    clinical = "clinical use" if card.clinical_use else "NOT for clinical use"
    return (f"{card.name} {card.version}: OK ({card.input.channels} input channel(s), output {card.output.meaning}, "
            f"{clinical}; {onnx_path.name} sha256 {card.sha256[:12]}...)")


@contextmanager
def progress(what: str, out=sys.stderr):
    """Elapsed time while a long step runs: a live counter on a terminal, a line every 10 s in a log."""
    done = threading.Event()
    started = time.monotonic()
    tty = hasattr(out, "isatty") and out.isatty()

    def tick() -> None:
        while not done.wait(1.0 if tty else 10.0):
            elapsed = time.monotonic() - started
            out.write(f"\r{what}: {elapsed:.0f} s" if tty else f"{what}: still running, {elapsed:.0f} s\n")
            out.flush()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        out.write(f"{chr(13) if tty else ''}{what}: done in {time.monotonic() - started:.1f} s\n")
        out.flush()


def build(card_path: Path, cache_root: Path, compute_capability: str | None, precision: str,
          max_batch: int = 16, flavour: str | None = None) -> tuple[str, Path]:
    """Build (or find) the engine for a model into the cache; returns (key, engine path).
    With TensorRT-RTX a compute capability can be named to build ahead of time on any machine.

    The engine is the one the daemon's TensorRT backend looks for: with the HU kernels embedded as plugins
    where the TensorRT flavour has ahead-of-time plugins (io "hu"), else without (io "network", the kernels
    then run on the engine's stream). Raises CardError when the card does not allow ``precision``."""
    from engines.hu_io import plugin_support
    from engines.runtime import trt_flavour

    card, onnx_path = load_card(card_path)
    if not card.allows(precision):
        allowed = ", ".join(card.precisions)
        raise CardError(f"{card_path}: card '{card.name}' allows precision(s) {allowed} only, not {precision}: "
                        f"its author has not validated the model at {precision}; build with --precision "
                        f"{card.precisions[0]}")
    trt = trt_flavour(flavour)
    io = "network" if plugin_support(trt.module) else "hu"
    cc = compute_capability or local_compute_capability()
    if cc is None:
        raise EngineBuildError("no GPU here: name the target with --compute-capability (TensorRT-RTX builds "
                               "ahead of time for 7.5, 8.0, 8.6, 8.9, 12.0, 12.1)")
    profile = ShapeProfile(channels=card.input.channels, max_batch=max_batch)
    key = cache_key(card.sha256, trt.name, trt.version, cc, precision, profile, io)
    cache = EngineCache(cache_root)
    if cache.get(key) is not None:
        return key, cache.path_for(key)
    started = time.perf_counter()
    with progress(f"building {card.name} for sm {cc} ({precision}, io {io}, {trt.name} {trt.version})"):
        engine = build_engine(onnx_path, flavour_module=trt.module, compute_capability=compute_capability,
                              precision=precision, max_batch=max_batch, channels=card.input.channels, io=io,
                              card=card)
    path = cache.put(key, engine, {"onnx_sha256": card.sha256, "flavour": trt.name, "trt_version": trt.version,
                                   "compute_capability": cc, "precision": precision, "profile": profile, "io": io,
                                   "model": f"{card.name} {card.version}",
                                   "build_seconds": round(time.perf_counter() - started, 2)})
    return key, path


def listing(cache_root: Path) -> list[str]:
    rows = []
    for meta in EngineCache(cache_root).list():
        rows.append(f"{meta['key']}  {meta.get('model', meta['onnx_sha256'][:12])}  {meta['flavour']} "
                    f"{meta['trt_version']}  sm {meta['compute_capability']}  {meta['precision']}  "
                    f"io {meta.get('io', 'network')}  "
                    f"{meta['engine_bytes']} B  {meta['created_utc']}")
    return rows
