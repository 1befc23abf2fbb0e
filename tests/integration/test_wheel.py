"""The installable package: the wheel built from this checkout (image-build/wheel.sh), installed into
a fresh venv outside the checkout from the lock file (image-build/requirements.lock, hashes
required), denoises a low-dose CT study on its default model and reconstructs a projection-data
study with the host twin it carries, without compiling anything (a box has no compiler).

This is what the image installs (image-build/), minus the image.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

CHECK = r"""
import sys
from pathlib import Path
import pydicom
import appliance, engines, kernels
from appliance.config import ApplianceConfig
from kernels import build

venv = Path(sys.argv[1]).resolve()
for module in (appliance, engines, kernels):
    assert Path(module.__file__).resolve().is_relative_to(venv), module.__file__
cfg = ApplianceConfig()
card = cfg.model_store().resolve(cfg.denoise.model).card
assert card.is_file() and card.resolve().is_relative_to(venv), card
host = build.build_host()
assert host.resolve().is_relative_to(build.PREBUILT_DIR.resolve()), host
fatbins = sorted(p.name for p in build.PREBUILT_DIR.glob("gpu-*/*.fatbin"))
assert fatbins == sorted(f"{s.stem}.fatbin" for s in build.sources()), fatbins
for name, n, comment in (("denoised", 8, "denoise"), ("recon", 6, "recon")):
    (series,) = [d for d in Path(name).iterdir() if d.is_dir()]
    files = sorted(series.glob("*.dcm"))
    assert len(files) == n, (name, len(files))
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "CT" and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"], name
    assert comment in str(ds.get("DerivationDescription", "")).lower(), ds.get("DerivationDescription")
    ds.pixel_array
print("ok")
"""


def _run(cmd: list, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}: exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def test_the_wheel_installs_into_a_fresh_venv_and_runs_denoise_and_recon(tmp_path):
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: image-build/wheel.sh builds from the checkout's files")
    wheels = tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "APPLIANCE_"))}
    _run(["bash", REPO / "image-build" / "wheel.sh", wheels], tmp_path, {**env, "PY": sys.executable}, 600)
    (wheel,) = wheels.glob("appliance-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path, env, 120)
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check", "--quiet"]
    _run([*pip, "install", "--require-hashes", "--only-binary=:all:", "-r", REPO / "image-build" / "requirements.lock"],
         tmp_path, env, 600)
    _run([*pip, "install", "--no-deps", "--no-index", wheel], tmp_path, env, 120)
    _run([*pip, "check"], tmp_path, env, 60)

    run_env = {**env, "APPLIANCE_KERNEL_CACHE": str(tmp_path / "kernel-cache"), "PYTHONNOUSERSITE": "1"}
    app = venv / "bin" / "appliance"
    _run([app, "synth", "ct", "--out", "ct", "--shape", "64x64x8", "--dose", "0.25", "--seed", "3"],
         tmp_path, run_env, 120)
    _run([app, "process", "--pipeline", "denoise", "ct", "denoised"], tmp_path, run_env, 300)
    (tmp_path / "recon.toml").write_text("[recon]\nmatrix = 64\nslices = 6\nslice_mm = 2.5\niterations = 4\n")
    _run([app, "synth", "ct-pd", "--out", "pd", "--shape", "64x64x6", "--views", "120", "--dose", "0.25",
          "--slice-spacing", "2.5"], tmp_path, run_env, 300)
    _run([app, "process", "--pipeline", "recon", "--config", "recon.toml", "pd", "recon"], tmp_path, run_env, 300)

    res = _run([venv / "bin" / "python", "-c", CHECK, venv], tmp_path, run_env, 120)
    assert res.stdout.strip().endswith("ok")
    # Nothing was compiled on the "box": the kernel cache was never created.
    assert not (tmp_path / "kernel-cache").exists()
