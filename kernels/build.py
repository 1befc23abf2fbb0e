"""Builds the kernels: the host twin (g++ + OpenMP, a shared library loaded with ctypes) and the
GPU fatbins (nvcc for sm_87, sm_89, sm_90). Both come from the same ``kernels/src/*.cu``.

Builds are cached under ``$APPLIANCE_KERNEL_CACHE`` (default ``~/.cache/appliance/kernels``),
keyed by the sources, the shim and the flags, so a changed kernel is rebuilt and an unchanged one
is not. A compile error, and for nvcc any register spill reported by ptxas, is a `KernelBuildError`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent
SOURCE_DIR = KERNELS_DIR / "src"
SHIM = KERNELS_DIR / "host_shim.h"
GPU_ARCHS = ("87", "89", "90")  # Jetson Orin, RTX Ada, H100/H200
HOST_FLAGS = ("-std=c++17", "-O3", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=off")
NVCC_FLAGS = ("-std=c++17", "-O3", "-Xptxas", "-v", "--fmad=false")

_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")


class KernelBuildError(RuntimeError):
    pass


def sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.cu"))


def cache_dir() -> Path:
    root = os.environ.get("APPLIANCE_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "appliance" / "kernels"


def _key(*parts: object) -> str:
    h = hashlib.sha256()
    for src in [*sources(), SHIM]:
        h.update(src.name.encode())
        h.update(src.read_bytes())
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:16]


def _publish(tmp: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)  # atomic: concurrent builders never load a half-written file
    return target


def build_host(compiler: str = "g++") -> Path:
    """The host-twin shared library (all kernels), built if not cached; returns its path."""
    target = cache_dir() / f"host-{_key(compiler, HOST_FLAGS)}" / "libkernels_host.so"
    if target.exists():
        return target
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"{compiler} not found: the host twin needs a C++17 compiler with OpenMP")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(dir=target.parent, suffix=".so")[1])
    cmd = [compiler, *HOST_FLAGS, "-I", str(KERNELS_DIR), "-include", str(SHIM), "-x", "c++",
           *map(str, sources()), "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise KernelBuildError(f"host twin build failed:\n{res.stderr[-4000:]}")
    return _publish(tmp, target)


def nvcc_path() -> str | None:
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None
    )


def build_fatbin(source: Path, archs: tuple[str, ...] = GPU_ARCHS) -> tuple[Path, dict[str, dict[str, int]]]:
    """Compile one .cu to a fatbin for ``archs`` (plus PTX of the newest for forward compatibility).
    Returns (path, registers per 'kernel@sm_XX'). Raises on errors and on any register spill."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise KernelBuildError("nvcc not found")
    gencode = []
    for arch in archs:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    target = cache_dir() / f"gpu-{_key(source.name, archs, NVCC_FLAGS)}" / f"{source.stem}.fatbin"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(dir=target.parent, suffix=".fatbin")[1])
    cmd = [nvcc, "-fatbin", *NVCC_FLAGS, *gencode, "-I", str(KERNELS_DIR), "-include", str(SHIM),
           "-o", str(tmp), str(source)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise KernelBuildError(f"nvcc failed on {source.name}:\n{log[-4000:]}")
    report: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = f"{m.group(1)}@{m.group(2)}"
        elif (m := _SPILL.search(line)) and current:
            report[current] = {"spill_stores": int(m.group(1)), "spill_loads": int(m.group(2))}
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            report.setdefault(current, {})["registers"] = int(m.group(1))
    spills = {k: v for k, v in report.items() if v.get("spill_stores") or v.get("spill_loads")}
    if spills:
        tmp.unlink(missing_ok=True)
        raise KernelBuildError(f"register spills in {source.name}: {spills}")
    return _publish(tmp, target), report


def build_ptx(source: Path, arch: str) -> Path:
    """Compile one .cu to PTX for ``compute_<arch>`` (e.g. '89'): what a TensorRT ahead-of-time plugin
    embeds in its engine, compiled to machine code by the driver for the GPU the engine runs on. PTX from
    this nvcc needs a driver of its CUDA version or newer; the compute capability must not exceed the GPU's.
    Register use is checked by the fatbin build (`build_fatbin`), which compiles the same kernels."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise KernelBuildError("nvcc not found: the plugin kernels' PTX is compiled from kernels/src")
    if not arch.isdigit():
        raise KernelBuildError(f"PTX architecture must be digits like '89', not {arch!r}")
    flags = tuple(f for f in NVCC_FLAGS if f not in ("-Xptxas", "-v"))  # no ptxas run for -ptx
    target = cache_dir() / f"ptx-{_key(source.name, arch, flags)}" / f"{source.stem}.compute_{arch}.ptx"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(dir=target.parent, suffix=".ptx")[1])
    cmd = [nvcc, "-ptx", *flags, f"-arch=compute_{arch}", "-I", str(KERNELS_DIR), "-include", str(SHIM),
           "-o", str(tmp), str(source)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        log = res.stdout + res.stderr
        raise KernelBuildError(f"nvcc -ptx failed on {source.name} for compute_{arch}:\n{log[-4000:]}")
    return _publish(tmp, target)


def build_all_fatbins(archs: tuple[str, ...] = GPU_ARCHS) -> dict[str, Path]:
    return {src.stem: build_fatbin(src, archs)[0] for src in sources()}
