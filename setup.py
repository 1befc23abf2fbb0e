"""Package-time build of what an installed appliance cannot build itself (a box has no compiler):
the kernels' host twin (g++ + OpenMP) and GPU fatbins (nvcc), written into the wheel's
``kernels/prebuilt/`` by `kernels.build.prebuild`. Everything else is in pyproject.toml.

The wheel is therefore platform-specific (it holds a shared library for this machine's
architecture). An editable install (``pip install -e``, the development venv) builds nothing here:
the kernels are then built on first use into the cache, as in a checkout.

``APPLIANCE_WHEEL_GPU=0`` builds a wheel without fatbins (a CPU-only box); by default nvcc is
required, so a wheel is never silently missing its GPU kernels. ``APPLIANCE_WHEEL_ARCH=aarch64``
builds the wheel of another architecture (an arm64 image on an x86 build machine): the host twin
with the ``aarch64-linux-gnu-g++`` cross compiler, the wheel tagged ``linux_aarch64``.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution


def _kernels_build():
    """kernels/build.py, loaded by path (the package itself imports numpy, not a build requirement)."""
    spec = importlib.util.spec_from_file_location("_appliance_kernels_build", Path(__file__).parent / "kernels" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithKernels(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        build = _kernels_build()
        gpu = os.environ.get("APPLIANCE_WHEEL_GPU", "1") != "0"
        if gpu and build.nvcc_path() is None:
            sys.exit("nvcc not found: the wheel's GPU fatbins cannot be built (APPLIANCE_WHEEL_GPU=0 for a CPU-only wheel)")
        dest = Path(self.build_lib) / "kernels" / "prebuilt"
        arch = _target_arch()
        compiler = "g++" if arch == platform.machine() else f"{arch}-linux-gnu-g++"
        for path in build.prebuild(dest, gpu=gpu, compiler=compiler):
            print(f"prebuilt {path.relative_to(dest)}")


class PlatformDistribution(Distribution):
    def has_ext_modules(self) -> bool:  # a linux_<arch> wheel, not py3-none-any
        return True


def _target_arch() -> str:
    return os.environ.get("APPLIANCE_WHEEL_ARCH") or platform.machine()


setup(cmdclass={"build_py": BuildPyWithKernels}, distclass=PlatformDistribution,
      options={"bdist_wheel": {"plat_name": f"linux_{_target_arch()}"}})
