"""What every benchmark writes: the results with the machine, versions and revision recorded."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = ""
    return {"hostname": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "git_revision": rev, "host_twin": "g++ -O3 -fopenmp", "gpu": gpu_name()}


def gpu_name() -> str | None:
    from kernels import gpu

    if not gpu.available():
        return None
    import pycuda.driver as cuda

    return f"{cuda.Device(0).name()} (driver {cuda.get_driver_version()})"


def publish(results: list[dict], out: Path | None) -> dict:
    """Print the results as JSON and, with ``out``, write them there (bench/results/...)."""
    document = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                "results": results}
    text = json.dumps(document, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return document
