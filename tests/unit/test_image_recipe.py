"""The image recipe's fast check (`make test`; the image build itself is `make image`, its
reproducibility `make image-check`, its boot `make boot-test`): the lock file covers pyproject's
run-time dependencies, the partition layout and boot entries agree, the image's default
configuration is valid, and the two file-system steps give the same bytes twice from trees that
differ only in what user space cannot control (ctime, atime, build folder).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "image-build"))

import build  # noqa: E402

EPOCH = 1_780_000_000


def _locked(lock: Path = build.LOCK) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==([^ \\]+) \\\n\s+--hash=sha256:[0-9a-f]{64}$",
                      lock.read_text(), re.M)
    return {name.lower().replace("_", "-"): version for name, version in pins}


def test_the_arm64_lock_pins_the_same_versions_with_its_own_hashes():
    amd64, arm64 = build.ARCHES["amd64"]["lock"], build.ARCHES["arm64"]["lock"]
    assert _locked(arm64) == _locked(amd64), "run `python3.11 image-build/lock.py --arch arm64`"
    hashes = {lock: set(re.findall(r"sha256:([0-9a-f]{64})", lock.read_text())) for lock in (amd64, arm64)}
    shared = hashes[amd64] & hashes[arm64]  # pure-Python wheels are the same file on both
    assert len(hashes[arm64]) == len(_locked(arm64)) and len(shared) < len(hashes[arm64])


def test_the_architectures_differ_only_where_they_must(monkeypatch, tmp_path):
    import gzip

    import bundle

    monkeypatch.setenv(build.ARCH_ENV, "arm64")
    assert "linux-image-arm64" in build.packages() and "linux-image-amd64" not in build.packages()
    assert "console=ttyAMA0,115200" in build.loader_entry("a", "6.1.0-test")
    assert bundle.compatible() == "scanner-appliance-aarch64"
    monkeypatch.setenv(build.ARCH_ENV, "amd64")
    assert "console=ttyS0,115200" in build.loader_entry("a", "6.1.0-test")
    assert bundle.compatible() == bundle.COMPATIBLE == "scanner-appliance-x86_64"
    monkeypatch.setenv(build.ARCH_ENV, "sparc")
    with pytest.raises(SystemExit):
        build.spec()
    # arm64's gzip-compressed Image goes onto the ESP uncompressed; an x86 bzImage as it is.
    image = b"MZ" + os.urandom(4096)
    (tmp_path / "vmlinuz-arm64").write_bytes(gzip.compress(image))
    (tmp_path / "vmlinuz-amd64").write_bytes(image)
    for name in ("arm64", "amd64"):
        build.efi_kernel(tmp_path / f"vmlinuz-{name}", tmp_path / f"esp-{name}")
        assert (tmp_path / f"esp-{name}").read_bytes() == image


def test_the_lock_pins_every_run_time_dependency_with_a_hash():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    locked = _locked()
    entries = [line for line in build.LOCK.read_text().splitlines() if "==" in line]
    assert len(locked) == len(entries), "every pin has exactly one sha256"
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["codecs"]]
    for req in wanted:
        name = req.name.lower().replace("_", "-")
        assert name in locked, f"{req} is not in {build.LOCK.name}: run `python3.11 image-build/lock.py`"
        assert req.specifier.contains(locked[name], prereleases=True), f"{name}=={locked[name]} does not satisfy {req}"
    assert "torch" not in locked and "pytest" not in locked  # training and tests stay off the box


def test_partitions_boot_entries_and_fstab_agree():
    names = [name for name, _, _ in build.PARTITIONS]
    assert names == ["esp", "root-a", "root-b", "data"]
    uuids = {build.partuuid(n) for n in names} | {build.guid("disk")}
    assert len(uuids) == 5
    assert build.partuuid("root-a") == build.partuuid("root-a")  # fixed, not random
    for slot in ("a", "b"):
        entry = build.loader_entry(slot, "6.1.0-test")
        assert f"root=PARTUUID={build.partuuid(f'root-{slot}')}" in entry and f"linux /{slot}/vmlinuz" in entry
    fstab = build.fstab()
    assert f"PARTUUID={build.partuuid('data')}  /data" in fstab
    assert "/data/etc  /etc/appliance" in fstab and "/data/appliance  /var/lib/appliance" in fstab
    unit = (REPO / "systemd" / "appliance.service").read_text()
    assert f"ExecStart={build.VENV}/bin/appliance run" in unit


def test_the_images_default_configuration_is_valid():
    res = subprocess.run([sys.executable, "-m", "appliance", "config", "check",
                          str(build.DATA_FILES / "etc" / "appliance.toml")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _tree(root: Path) -> Path:
    """A small root file system: files, a symlink, an empty folder, modes."""
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "var" / "empty").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("appliance\n")
    (root / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n" * 100)
    (root / "usr" / "bin" / "tool").chmod(0o755)
    (root / "usr" / "bin" / "link").symlink_to("tool")
    return root


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None,
                    reason="e2fsprogs not installed (make test installs it)")
def test_the_ext4_step_gives_the_same_bytes_twice(tmp_path):
    digests = []
    for n in (1, 2):
        tree = _tree(tmp_path / f"src{n}")
        time.sleep(1.1)  # the second tree's ctimes differ from the first's
        build.clamp_times(tree, EPOCH)
        img = tmp_path / f"fs{n}.img"
        build.ext4(img, 16, "root-a", tree, EPOCH)
        digests.append(_sha(img))
        listing = subprocess.run(["debugfs", "-R", "stat /usr/bin/tool", str(img)], capture_output=True, text=True)
        for field in ("ctime", "atime", "mtime", "crtime"):  # every time of the file is the epoch
            assert f"{field}: {EPOCH:#010x}:00000000" in listing.stdout, listing.stdout
    assert digests[0] == digests[1]


@pytest.mark.skipif(any(shutil.which(t) is None for t in ("mkfs.vfat", "mcopy", "mmd"))
                    or not build.SYSTEMD_BOOT.exists(),
                    reason="dosfstools, mtools or systemd-boot-efi not installed (make test installs them)")
def test_the_esp_step_gives_the_same_bytes_twice(tmp_path):
    digests = []
    for n in (1, 2):
        root = tmp_path / f"root{n}"
        (root / "boot").mkdir(parents=True)
        (root / "boot" / "vmlinuz-6.1.0-test").write_bytes(b"kernel" * 1000)
        (root / "boot" / "initrd.img-6.1.0-test").write_bytes(b"initrd" * 1000)
        time.sleep(1.1)
        img = tmp_path / f"esp{n}.img"
        build.esp(img, root, EPOCH, tmp_path / f"work{n}")
        digests.append(_sha(img))
        entries = subprocess.run(["mdir", "-b", "-i", str(img), "::/loader/entries"], capture_output=True, text=True,
                                 env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
        assert "a.conf" in entries.stdout
    assert digests[0] == digests[1]


def test_files_from_the_checkout_get_the_epoch_not_their_checkout_time(tmp_path):
    """A checkout older than its last commit must not leak its own mtimes into the image."""
    src = _tree(tmp_path / "src")
    for path in [src, *src.rglob("*")]:
        os.utime(path, (1_000_000_000, 1_000_000_000), follow_symlinks=False)  # 2001: before the epoch
    dst = tmp_path / "dst"
    (dst / "etc").mkdir(parents=True)  # an existing folder, as in the root file system
    build.install_tree(src, dst, EPOCH)
    copied = [dst / p.relative_to(src) for p in src.rglob("*")]
    assert copied and all(p.lstat().st_mtime == EPOCH for p in copied)
    assert (dst / "usr" / "bin" / "tool").read_bytes() == (src / "usr" / "bin" / "tool").read_bytes()
    assert (dst / "usr" / "bin" / "tool").stat().st_mode & 0o777 == 0o755
