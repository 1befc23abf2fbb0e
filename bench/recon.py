"""Reconstruction time per volume, the stage alone, on the host twin (and the GPU when present):
FDK, and PWLS-TV with a fixed number of iterations (4 ordered subsets), on a cone-beam curved-
detector geometry, from projections in memory to a volume in memory (on the host)."""

from __future__ import annotations

import numpy as np

from bench.kernels import backends, geometry, operator, synced, timed
from bench.plan import Plan
from bench.progress import Progress
from bench.schema import Result, measured
from kernels.recon.fbp import fbp
from kernels.recon.pwls import pwls_tv

ALGORITHMS = ("fdk", "pwls-tv")


def steps(plan: Plan) -> int:
    return len(backends()) * len(ALGORITHMS) * plan.recon_samples


def run(plan: Plan, progress: Progress) -> list[Result]:
    geom, grid = geometry(plan)
    n = plan.recon_n
    rows, cols = plan.recon_detector
    results = []
    for backend in backends():
        op = operator(backend, geom, grid)
        rng = np.random.default_rng(1)
        y = op.to_host(op.forward(op.asarray(rng.random(grid.shape_zyx, dtype=np.float32))))
        weights = np.exp(-y / y.max()).astype(np.float32)
        runs = {
            "fdk": (lambda: op.to_host(fbp(y, op)), {}),
            "pwls-tv": (lambda: op.to_host(pwls_tv(y, weights, op, beta=0.03, eps=1e-4, n_iter=plan.pwls_iterations,
                                                   n_subsets=4)[0]), {"iterations": plan.pwls_iterations,
                                                                      "subsets": 4}),
        }
        for algorithm in ALGORITHMS:
            fn, extra_params = runs[algorithm]
            progress.status(f"recon {backend} {algorithm} {n}^3")
            # The kernels scenario (or FDK) has warmed the host-twin build up; PWLS-TV is long, no extra warm-up.
            times = timed(synced(backend, fn), plan.warmup if algorithm == "fdk" else 0, plan.recon_samples,
                          lambda t: progress.sample(f"recon {backend} {algorithm}", t, "s"))
            extra = {"seconds_per_iteration": float(np.median(times)) / plan.pwls_iterations} if algorithm == "pwls-tv" else {}
            results.append(measured(
                f"recon/{backend}/{algorithm}/{n}^3", "recon",
                f"{algorithm} of a {n}^3 volume from {plan.recon_views} views of {rows}x{cols} on {backend}",
                times, metric="latency", unit="s", better="lower", warmup=plan.warmup if algorithm == "fdk" else 0,
                params={"backend": backend, "algorithm": algorithm, "n": n, "views": plan.recon_views,
                        "detector": [rows, cols], **extra_params}, extra=extra))
    return results
