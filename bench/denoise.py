"""Denoising latency per volume, the stage alone, per backend available: ONNX Runtime (the CPU
twin) always, TensorRT when a GPU is present.

A sample is one `engines.tiling.denoise_volume` call on an in-memory CT volume in HU (the
configured model, slabs as configured), after a warm-up call of one slab that loads or builds
the engine and allocates its buffers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from appliance.config import ApplianceConfig
from bench.plan import Plan
from bench.progress import Progress
from bench.schema import Result, measured
from engines.card import load_card
from engines.runtime import BackendUnavailable, select_backend
from engines.tiling import denoise_volume


def backends() -> list[str]:
    from kernels import gpu

    return ["onnxruntime", "tensorrt"] if gpu.available() else ["onnxruntime"]


def steps(plan: Plan) -> int:
    return len(backends()) * sum(plan.denoise_slices.values())


def _volume(slices: int, rows: int, cols: int) -> np.ndarray:
    """Soft tissue with quarter-dose-like noise: the network's cost does not depend on content."""
    rng = np.random.default_rng(slices)
    return rng.normal(40.0, 25.0, (slices, rows, cols)).astype(np.float32)


def run(cfg: ApplianceConfig, plan: Plan, work: Path, progress: Progress) -> tuple[list[Result], dict[str, str]]:
    card, onnx_path = load_card(cfg.model_store().resolve(cfg.denoise.model).card)
    results, skipped = [], {}
    for backend in backends():
        try:
            session = select_backend(backend, engine_cache=Path(work) / "engines").load(onnx_path, card)
        except (BackendUnavailable, Exception) as exc:  # a GPU backend that cannot load is a finding, not a crash
            skipped[f"denoise/{backend}"] = f"{type(exc).__name__}: {exc}"
            progress.note(f"denoise: {backend} skipped: {exc}")
            continue
        rows, cols = plan.denoise_in_plane
        progress.status(f"denoise {backend}: warm-up")
        denoise_volume(_volume(cfg.denoise.slab, rows, cols), session, card, slab=cfg.denoise.slab,
                       tile_hw=cfg.denoise.tile)
        for slices, n in sorted(plan.denoise_slices.items()):
            volume = _volume(slices, rows, cols)
            label = f"{cols}x{rows}x{slices}"
            times = []
            for i in range(n):
                progress.status(f"denoise {backend} {label}: sample {i + 1}/{n}")
                t0 = time.perf_counter()
                denoise_volume(volume, session, card, slab=cfg.denoise.slab, tile_hw=cfg.denoise.tile)
                times.append(time.perf_counter() - t0)
                progress.sample(f"denoise {backend} {label}", times[-1], "s")
            p50 = float(np.median(times))
            results.append(measured(
                f"denoise/{backend}/{label}", "denoise", f"denoise {label} CT with {card.name} {card.version} on {backend}",
                times, metric="latency", unit="s", better="lower", warmup=1,
                params={"backend": backend, "model": f"{card.name} {card.version}", "slices": slices, "rows": rows,
                        "cols": cols, "slab": cfg.denoise.slab},
                extra={"ms_per_slice": 1000 * p50 / slices, "mvoxels_per_s": slices * rows * cols / p50 / 1e6}))
        close = getattr(session, "close", None)
        if close:
            close()
    return results, skipped
