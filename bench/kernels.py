"""Projector throughput and per-volume reconstruction time, host twin (and GPU when present).

    python -m bench.kernels [--quick] [--out bench/results/DATE-host.json]

Throughput is in giga voxel-updates per second: voxels x views / seconds / 1e9, the usual
convention for projectors (a forward projection and a backprojection of the same volume and
geometry count the same updates). Each timing is the best of ``--repeats`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.report import publish
from kernels.geometry import ProjectionGeometry, VolumeGrid
from kernels.host import HostProjector
from kernels.recon.fbp import fbp
from kernels.recon.pwls import pwls_tv


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (and the one-off host-twin build)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _operator(backend: str, geom, grid):
    if backend == "gpu":
        from kernels.gpu import GpuProjector

        return GpuProjector(geom, grid)
    return HostProjector(geom, grid)


def _synced(backend: str, fn):
    """On the GPU, launches are asynchronous: time until the device has finished."""
    if backend != "gpu":
        return fn
    import pycuda.driver as cuda

    def call():
        fn()
        cuda.Context.synchronize()

    return call


def run(quick: bool, repeats: int, backend: str = "host") -> dict:
    n, views, cols, rows = (64, 90, 128, 32) if quick else (128, 180, 256, 64)
    grid = VolumeGrid((n, n, n), (1.0, 1.0, 1.0))
    geom = ProjectionGeometry.cone(views, cols, rows, 1.2, 1.2, 500.0, 900.0, "curved")
    op = _operator(backend, geom, grid)
    rng = np.random.default_rng(0)
    x = op.asarray(rng.random(grid.shape_zyx, dtype=np.float32))
    y_host = op.to_host(op.forward(x))
    y = op.asarray(y_host)
    updates = n**3 * views
    fp = _best(_synced(backend, lambda: op.forward(x)), repeats)
    bp = _best(_synced(backend, lambda: op.adjoint(y)), repeats)
    ones = np.ones(views, np.float32)
    fdk_bp = _best(_synced(backend, lambda: op.backproject(y, ones)), repeats)
    fdk = _best(_synced(backend, lambda: op.to_host(fbp(y_host, op))), repeats)
    iters = 3 if quick else 5
    w = np.exp(-y_host / y_host.max()).astype(np.float32)
    pwls = _best(_synced(backend, lambda: op.to_host(pwls_tv(y_host, w, op, beta=0.03, eps=1e-4, n_iter=iters,
                                                             n_subsets=4)[0])), 1)
    return {
        "scenario": "kernels",
        "backend": "gpu (pycuda)" if backend == "gpu" else "host twin",
        "volume": [n, n, n], "views": views, "detector": [rows, cols], "shape": "curved",
        "forward_joseph": {"seconds": fp, "gups": updates / fp / 1e9},
        "adjoint_joseph": {"seconds": bp, "gups": updates / bp / 1e9},
        "backproject_fdk": {"seconds": fdk_bp, "gups": updates / fdk_bp / 1e9},
        "fdk_volume_seconds": fdk,
        "pwls_tv": {"iterations": iters, "subsets": 4, "seconds": pwls, "seconds_per_iteration": pwls / iters},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (under a minute on 2 cores)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from kernels import gpu

    backends = ["host", "gpu"] if gpu.available() else ["host"]
    publish([run(args.quick, args.repeats, b) for b in backends], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
