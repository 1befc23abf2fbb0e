"""Builds the kernels: the host twin (g++ + OpenMP, a shared library loaded with ctypes) and the
GPU fatbins (nvcc for sm_87, sm_89, sm_90). Both come from the same ``kernels/src/*.cu``.

Builds are cached under ``$APPLIANCE_KERNEL_CACHE`` (default ``~/.cache/appliance/kernels``),
keyed by the sources, the shim and the flags, so a changed kernel is rebuilt and an unchanged one
is not. A compile error, and for nvcc any register spill reported by ptxas, is a `KernelBuildError`.

An installed appliance has no compiler: the wheel carries the builds made at package time
(`prebuild`, called by ``setup.py``'s build step) under ``kernels/prebuilt/``, in the same
``<kind>-<key>/`` layout as the cache. A build is looked up there first, then in the cache, and
only then compiled; the key still covers the shipped sources, so a prebuilt library is used only
for exactly the sources beside it.
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
PREBUILT_DIR = KERNELS_DIR / "prebuilt"
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


def _host_name(compiler: str) -> str:
    return f"host-{_key(compiler, HOST_FLAGS)}/libkernels_host.so"


def _fatbin_name(source: Path, archs: tuple[str, ...]) -> str:
    return f"gpu-{_key(source.name, archs, NVCC_FLAGS)}/{source.stem}.fatbin"


def build_host(compiler: str = "g++", cache: Path | None = None, name_as: str | None = None) -> Path:
    """The host-twin shared library (all kernels): the package's prebuilt one, else the cached one,
    else built into ``cache`` (default `cache_dir`); returns its path. ``name_as``: file it under
    another compiler's name (a cross compiler building the library a box will look up as g++'s)."""
    name = _host_name(name_as or compiler)
    if cache is None and (PREBUILT_DIR / name).exists():
        return PREBUILT_DIR / name
    target = (cache or cache_dir()) / name
    if target.exists():
        return target
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"{compiler} not found: the host twin needs a C++17 compiler with OpenMP")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(dir=target.parent, suffix=".so")[1])
    # Paths relative to kernels/ (run from there): the library's symbol table names its sources as
    # given, so a package built in any folder gives the same bytes.
    cmd = [compiler, *HOST_FLAGS, "-I", ".", "-include", SHIM.name, "-x", "c++",
           *(str(src.relative_to(KERNELS_DIR)) for src in sources()), "-o", str(tmp.resolve())]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=KERNELS_DIR)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise KernelBuildError(f"host twin build failed:\n{res.stderr[-4000:]}")
    return _publish(tmp, target)


def nvcc_path() -> str | None:
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None
    )


def build_fatbin(source: Path, archs: tuple[str, ...] = GPU_ARCHS,
                 cache: Path | None = None) -> tuple[Path, dict[str, dict[str, int]]]:
    """Compile one .cu to a fatbin for ``archs`` (plus PTX of the newest for forward compatibility)
    into ``cache`` (default `cache_dir`). Returns (path, registers per 'kernel@sm_XX'). Raises on
    errors and on any register spill. Always compiles (the register report comes from ptxas): use
    `fatbin` to load one."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise KernelBuildError("nvcc not found")
    gencode = []
    for arch in archs:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    target = (cache or cache_dir()) / _fatbin_name(source, archs)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(dir=target.parent, suffix=".fatbin")[1])
    cmd = [nvcc, "-fatbin", *NVCC_FLAGS, *gencode, "-I", ".", "-include", SHIM.name,
           "-o", str(tmp.resolve()), os.path.relpath(source.resolve(), KERNELS_DIR)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=KERNELS_DIR)
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


def fatbin(source: Path, archs: tuple[str, ...] = GPU_ARCHS) -> Path:
    """The fatbin of one .cu: the package's prebuilt one, else the cached one, else built."""
    name = _fatbin_name(source, archs)
    for root in (PREBUILT_DIR, cache_dir()):
        if (root / name).exists():
            return root / name
    return build_fatbin(source, archs)[0]


def build_all_fatbins(archs: tuple[str, ...] = GPU_ARCHS) -> dict[str, Path]:
    return {src.stem: fatbin(src, archs) for src in sources()}


def prebuild(dest: Path, gpu: bool = True, compiler: str = "g++") -> list[Path]:
    """Build what an installed appliance loads, into ``dest`` (a package's ``kernels/prebuilt``):
    the host twin (with ``compiler``: a cross compiler for another architecture's wheel) and, with
    ``gpu``, the fatbins for `GPU_ARCHS` (device code: the same for every host architecture).
    Returns the files written."""
    built = [build_host(compiler=compiler, cache=dest, name_as="g++")]
    if gpu:
        built += [build_fatbin(src, GPU_ARCHS, cache=dest)[0] for src in sources()]
    return built
