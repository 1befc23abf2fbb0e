"""Projector throughput in giga voxel-updates per second (GUPS): voxels x views / seconds / 1e9,
the usual convention (a forward projection and a backprojection of the same volume and geometry
count the same updates). Host twin always; the CUDA kernels (pycuda) when a GPU is present. On
the GPU a sample lasts until the device has finished (launches are asynchronous)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from bench.plan import Plan
from bench.progress import Progress
from bench.schema import Result, measured
from kernels.geometry import ProjectionGeometry, VolumeGrid
from kernels.host import HostProjector

OPERATIONS = ("forward_joseph", "adjoint_joseph", "backproject_fdk")


def backends() -> list[str]:
    from kernels import gpu

    return ["host", "gpu"] if gpu.available() else ["host"]


def operator(backend: str, geom: ProjectionGeometry, grid: VolumeGrid):
    if backend == "gpu":
        from kernels.gpu import GpuProjector

        return GpuProjector(geom, grid)
    return HostProjector(geom, grid)


def synced(backend: str, fn: Callable[[], object]) -> Callable[[], None]:
    if backend != "gpu":
        return lambda: (fn(), None)[1]
    import pycuda.driver as cuda

    def call() -> None:
        fn()
        cuda.Context.synchronize()

    return call


def timed(fn: Callable[[], None], warmup: int, n: int, on_sample: Callable[[float], None] = lambda s: None) -> list[float]:
    """Seconds of ``n`` calls of ``fn`` after ``warmup`` uncounted ones; ``on_sample`` sees each as it comes."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        on_sample(out[-1])
    return out


def geometry(plan: Plan) -> tuple[ProjectionGeometry, VolumeGrid]:
    n = plan.recon_n
    rows, cols = plan.recon_detector
    grid = VolumeGrid((n, n, n), (1.0, 1.0, 1.0))
    return ProjectionGeometry.cone(plan.recon_views, cols, rows, 1.2, 1.2, 500.0, 900.0, "curved"), grid


def steps(plan: Plan) -> int:
    return len(backends()) * len(OPERATIONS) * plan.kernel_samples


def run(plan: Plan, progress: Progress) -> list[Result]:
    geom, grid = geometry(plan)
    n = plan.recon_n
    updates = n**3 * plan.recon_views
    rows, cols = plan.recon_detector
    results = []
    for backend in backends():
        op = operator(backend, geom, grid)
        rng = np.random.default_rng(0)
        x = op.asarray(rng.random(grid.shape_zyx, dtype=np.float32))
        y = op.asarray(op.to_host(op.forward(x)))
        ones = np.ones(plan.recon_views, np.float32)
        calls = {"forward_joseph": lambda: op.forward(x), "adjoint_joseph": lambda: op.adjoint(y),
                 "backproject_fdk": lambda: op.backproject(y, ones)}
        name = "gpu (pycuda)" if backend == "gpu" else "host twin (g++ -O3 -fopenmp)"
        for operation in OPERATIONS:
            progress.status(f"kernels {backend} {operation} {n}^3")
            gups = [updates / s / 1e9 for s in timed(
                synced(backend, calls[operation]), plan.warmup, plan.kernel_samples,
                lambda s: progress.sample(f"kernels {backend} {operation}", updates / s / 1e9, "GUPS"))]
            results.append(measured(
                f"kernels/{backend}/{operation}/{n}^3", "kernels",
                f"{operation} on {name}: {n}^3 volume, {plan.recon_views} views of {rows}x{cols}, curved cone beam",
                gups, metric="throughput", unit="GUPS", better="higher", warmup=plan.warmup,
                params={"backend": backend, "operation": operation, "n": n, "views": plan.recon_views,
                        "detector": [rows, cols]}))
    return results
