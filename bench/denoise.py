"""Denoising latency per volume, per backend available (ONNX Runtime CPU twin; TensorRT on a GPU).

    python -m bench.denoise [--slices 300] [--size 512] [--out bench/results/DATE-denoise.json]

Times `engines.tiling.denoise_volume` on an in-memory CT volume (the reference model, slabs of
16 slices), best of ``--repeats`` after a warm-up slab.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.report import publish
from engines.card import load_card
from engines.runtime import select_backend
from engines.tiling import denoise_volume

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "engines" / "models" / "reference-redcnn.toml"


def run(model: Path, slices: int, size: int, repeats: int, backend: str) -> dict:
    card, onnx_path = load_card(model)
    chosen = select_backend(backend)
    session = chosen.load(onnx_path, card)
    rng = np.random.default_rng(0)
    volume = rng.normal(40.0, 20.0, (slices, size, size)).astype(np.float32)
    denoise_volume(volume[:16], session, card)  # warm-up (engine build/deserialise, allocations)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        denoise_volume(volume, session, card, slab=16)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"scenario": "denoise", "backend": chosen.name, "model": f"{card.name} {card.version}",
            "volume": [slices, size, size], "seconds_min": best, "seconds_all": times,
            "ms_per_slice": 1000 * best / slices}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from kernels import gpu

    backends = ["onnxruntime", "tensorrt"] if gpu.available() else ["onnxruntime"]
    publish([run(args.model, args.slices, args.size, args.repeats, b) for b in backends], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
