"""Where a benchmark ran: machine, GPU and driver, package versions, git revision.

Recorded in every results document so that two runs are only compared knowingly.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

from bench.schema import Git, Machine

# Distribution names whose versions matter to the numbers (None when not installed).
PACKAGES = ("numpy", "pydicom", "pynetdicom", "pyzmq", "pydantic", "onnxruntime", "onnx", "tensorrt",
            "tensorrt-rtx-cu13", "tensorrt-lean-cu13", "pycuda", "torch", "matplotlib")
REPO = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def gpu_info() -> tuple[str | None, str | None, str | None]:
    """(name, driver version, compute capability) of GPU 0, or Nones without one."""
    from kernels import gpu

    if not gpu.available():
        return None, None, None
    import pycuda.driver as cuda

    dev = cuda.Device(0)
    drv = cuda.get_driver_version()  # e.g. 13000 (CUDA API level of the driver)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
        driver = f"{out[0]} (CUDA {drv // 1000}.{drv % 1000 // 10})" if out else f"CUDA {drv}"
    except (OSError, subprocess.TimeoutExpired):
        driver = f"CUDA {drv // 1000}.{drv % 1000 // 10}"
    major, minor = dev.compute_capability()
    return dev.name(), driver, f"{major}.{minor}"


def machine() -> Machine:
    name, driver, cc = gpu_info()
    return Machine(hostname=platform.node(), os=platform.platform(), cpu=_cpu_model(), cores=os.cpu_count() or 0,
                   memory_gib=_memory_gib(), gpu=name, gpu_driver=driver, compute_capability=cc)


def machine_tag(m: Machine) -> str:
    """A short file-name tag: the GPU (``h100``) or ``<cores>core``."""
    if m.gpu:
        words = re.findall(r"[A-Za-z]*\d+[A-Za-z]*", m.gpu)
        return (words[0] if words else "gpu").lower()
    return f"{m.cores}core"


def _tool_version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0][:120] if text else None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in PACKAGES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        out["appliance"] = metadata.version("appliance")
    except metadata.PackageNotFoundError:
        out["appliance"] = None
    out["dcmtk"] = _tool_version(["/usr/bin/storescu", "--version"])
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"release ([\d.]+)", nvcc)
        out["nvcc"] = m.group(1) if m else None
    except (OSError, subprocess.TimeoutExpired):
        out["nvcc"] = None
    return out


def git() -> Git:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    revision = run("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    return Git(revision=revision, dirty=dirty)
