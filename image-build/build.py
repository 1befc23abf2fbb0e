"""`make image`: the appliance's bootable disk image, reproducible from its inputs.

    python image-build/build.py [--out build/image] [--arch amd64|arm64]

``--arch arm64`` (`make image ARCH=arm64`) builds the same recipe for a Jetson-class box's CPU: the
arm64 Debian root file system (through qemu-user-static and binfmt on an x86 build machine), the
arm64 kernel, systemd-boot for AA64 UEFI, the aarch64 wheels of image-build/requirements-arm64.lock
and the appliance's wheel with its host twin cross-compiled (`setup.py`). README "arm64" says
what a JetPack-based image would change.

Inputs: this checkout (its files, as `git status` sees them), image-build/requirements.lock, the
Debian archive's state at build time (bookworm, bookworm-updates, bookworm-security; the packages
and versions land in the manifest) and SOURCE_DATE_EPOCH (default: the last commit's time). The
same inputs give the same bytes: every timestamp is clamped to SOURCE_DATE_EPOCH, file systems get
fixed UUIDs and hash seeds, every inode's times are reset after mkfs, Python byte code is
hash-based, and the disk's GUIDs are fixed.

Output (``--out``): ``appliance.img`` (raw GPT disk: dd it onto the box's disk),
``appliance.img.zst`` (the same, compressed, for flashing tools that take zstd), ``manifest.json``
(the bill of materials: every Debian package and Python wheel with its version and hash, the
partitions, the image's sha256) and ``SHA256SUMS``.

The disk:
  1 esp     256 MiB  vfat: systemd-boot, a kernel + initrd per slot under /a and /b, loader entries
  2 root-a  2 GiB    ext4: Debian 12 minbase, systemd, the appliance in /opt/appliance/venv
  3 root-b  2 GiB    ext4: the other slot, empty until the first update writes it
  4 data    1 GiB    ext4: never touched by updates; mounted at /data, holding the configuration
                     (/data/etc -> /etc/appliance) and the spool (/data/appliance -> /var/lib/appliance);
                     at boot it grows to the end of the disk it was flashed onto (grow-data)
Boot: UEFI -> systemd-boot -> the default entry's kernel with root=PARTUUID=<slot>.

Needs root (mmdebstrap --mode=root, chroot) and the Debian packages `make image` installs.
What was checked on these machines: ../shared/IMAGE.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bundle  # noqa: E402  (image-build/bundle.py)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOCK = HERE / "requirements.lock"
# What differs between architectures; everything else is one recipe.
ARCHES = {
    "amd64": {"kernel": "linux-image-amd64", "packages": [], "lock": LOCK, "wheel_arch": "x86_64",
              "efi": "x64", "console": "ttyS0", "pip_platform": []},
    "arm64": {"kernel": "linux-image-arm64", "packages": ["systemd-boot-efi"],
              "lock": HERE / "requirements-arm64.lock", "wheel_arch": "aarch64", "efi": "aa64",
              "console": "ttyAMA0",
              "pip_platform": ["--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_27_aarch64",
                               "--platform", "manylinux_2_26_aarch64", "--platform", "manylinux_2_24_aarch64",
                               "--platform", "manylinux_2_17_aarch64", "--platform", "manylinux2014_aarch64",
                               "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]},
}
ARCH_ENV = "APPLIANCE_IMAGE_ARCH"


def arch() -> str:
    """The architecture being built (``--arch``; the customize hook inherits it through the environment)."""
    value = os.environ.get(ARCH_ENV, "amd64")
    if value not in ARCHES:
        raise SystemExit(f"{ARCH_ENV}={value}: one of {', '.join(ARCHES)}")
    return value


def spec() -> dict:
    return ARCHES[arch()]
ROOTFS_FILES = HERE / "rootfs"  # copied over the root file system as they are
DATA_FILES = HERE / "data"  # the data partition's first content
SUITE = "bookworm"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY = os.environ.get("DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
PACKAGES = [  # and the architecture's kernel and `ARCHES` packages (`packages`)
    "systemd", "systemd-sysv", "udev", "dbus", "initramfs-tools", "zstd", "kmod",
    "e2fsprogs", "dosfstools", "iproute2", "python3", "python3-venv", "libgomp1", "ca-certificates",
    "rauc", "rauc-service",
    "openssl",  # `appliance models install` verifies a model's signature with it (engines/store.py)
    "cloud-guest-utils",  # growpart: the data partition takes the rest of the disk at boot (grow-data)
]
# Modules the initrd needs to find a root file system on the boxes and in qemu (a list, not
# Debian's "most": its all-modules initrd cost 50 s of a TCG boot, ../shared/IMAGE.md).
INITRD_MODULES = ["virtio_pci", "virtio_blk", "virtio_scsi", "nvme", "ahci", "sd_mod", "usb_storage", "uas",
                  "xhci_pci", "ext4", "crc32c_generic", "vfat", "nls_cp437", "nls_ascii"]
VENV = "/opt/appliance/venv"
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
KERNEL_CMDLINE = "rw rootwait panic=10 console=tty0 console=ttyS0,115200 quiet systemd.show_status=1"


def packages() -> list[str]:
    return [*PACKAGES, spec()["kernel"], *spec()["packages"]]


def kernel_cmdline() -> str:
    return KERNEL_CMDLINE.replace("console=ttyS0,", f"console={spec()['console']},")

MiB = 1 << 20
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"  # generic: no gpt-auto mounting surprises
# (name, size in MiB, type): the order is the partition number
PARTITIONS = [("esp", 256, ESP_TYPE), ("root-a", 2048, LINUX_TYPE), ("root-b", 2048, LINUX_TYPE),
              ("data", 1024, LINUX_TYPE)]
_NS = uuid.UUID("6f1b3c52-0d8a-4c1e-9a57-2f4d1e0b7a11")  # the appliance image's GUID namespace


def guid(name: str) -> str:
    """Fixed GUIDs: partitions, file systems and the disk are named, not random."""
    return str(uuid.uuid5(_NS, name))


def partuuid(name: str) -> str:
    return guid(f"partition/{name}")


def run(*cmd, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, env={**os.environ, **(env or {})}, **kw)


def chroot(root: Path, *cmd, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """A command in the image's root under a clean environment (the host's PIP_*, PYTHON* must not leak in)."""
    clean = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
             "SOURCE_DATE_EPOCH": os.environ["SOURCE_DATE_EPOCH"], **(env or {})}
    return subprocess.run(["chroot", str(root), "env", "-i", *(f"{k}={v}" for k, v in clean.items()),
                           *map(str, cmd)], check=True, **kw)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---- the Python wheelhouse ----------------------------------------------------------------
def wheelhouse(dest: Path) -> Path:
    """The appliance's wheel (image-build/wheel.sh) and every locked dependency, downloaded on the
    host (hash-checked); installed offline inside the image."""
    run("bash", HERE / "wheel.sh", dest, env={"PY": sys.executable, "APPLIANCE_WHEEL_ARCH": spec()["wheel_arch"]})
    run(sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
        "--require-hashes", "--only-binary=:all:", *spec()["pip_platform"], "-d", dest, "-r", spec()["lock"])
    shutil.copy(spec()["lock"], dest / "requirements.lock")
    (wheel,) = dest.glob("appliance-*.whl")
    return wheel


# ---- inside the root file system (mmdebstrap's customize hook) ------------------------------
def customize(root: Path, wheels: Path) -> None:
    epoch = os.environ["SOURCE_DATE_EPOCH"]
    inside = root / "tmp" / "wheelhouse"
    shutil.copytree(wheels, inside)
    (wheel,) = inside.glob("appliance-*.whl")
    pip = [f"{VENV}/bin/python", "-m", "pip", "--disable-pip-version-check", "--no-cache-dir", "--quiet"]
    chroot(root, "python3", "-m", "venv", VENV)
    chroot(root, *pip, "install", "--no-index", "--no-compile", "--find-links", "/tmp/wheelhouse",
           "--require-hashes", "-r", "/tmp/wheelhouse/requirements.lock")
    chroot(root, *pip, "install", "--no-index", "--no-compile", "--no-deps", f"/tmp/wheelhouse/{wheel.name}")
    chroot(root, *pip, "check")
    wheels_in = {p.name: sha256(p) for p in sorted(inside.glob("*.whl"))}
    (wheels.parent / "wheels.json").write_text(json.dumps(wheels_in))  # mmdebstrap empties /tmp
    # The box installs nothing with pip: the installer goes, and so does the venv module's copy.
    chroot(root, *pip, "uninstall", "--yes", "pip", "setuptools")
    shutil.rmtree(inside)
    # Byte code keyed by the sources' hashes, not their mtimes: reproducible, and valid on a
    # read-only /opt (the unit sets PYTHONDONTWRITEBYTECODE).
    for tree in ("/usr/lib/python3", "/usr/lib/python3.11", VENV):
        for cache in (root / tree.lstrip("/")).rglob("__pycache__"):
            shutil.rmtree(cache)
        chroot(root, "python3", "-m", "compileall", "-q", "-j", "1", "--invalidation-mode", "unchecked-hash",
               tree, stdout=subprocess.DEVNULL)

    # systemd: the unit, its account and folders, from the checkout's systemd/.
    lib = root / "usr" / "lib"
    shutil.copy(REPO / "systemd" / "appliance.service", lib / "systemd" / "system" / "appliance.service")
    shutil.copy(REPO / "systemd" / "appliance.sysusers", lib / "sysusers.d" / "appliance.conf")
    shutil.copy(REPO / "systemd" / "appliance.tmpfiles", lib / "tmpfiles.d" / "appliance.conf")
    install_tree(ROOTFS_FILES, root, int(epoch))
    (root / "etc" / "fstab").write_text(fstab())
    for mountpoint in ("data", "efi"):
        (root / mountpoint).mkdir(exist_ok=True)
    (root / "etc" / "hostname").write_text("appliance\n")
    (root / "usr" / "local" / "bin").mkdir(parents=True, exist_ok=True)
    (root / "usr" / "local" / "bin" / "appliance").symlink_to(f"{VENV}/bin/appliance")
    chroot(root, "systemd-sysusers")
    chroot(root, "systemd-tmpfiles", "--create", "--prefix=/var/lib/appliance", "--prefix=/etc/appliance")
    (root / "usr" / "lib" / "appliance-image" / "kernel-cmdline").write_text(kernel_cmdline() + "\n")
    (root / "etc" / "rauc").mkdir(exist_ok=True)
    (root / "etc" / "rauc" / "system.conf").write_text(rauc_system_conf())
    shutil.copy(bundle.KEYRING, root / "etc" / "rauc" / "keyring.pem")
    chroot(root, "systemctl", "enable", "appliance.service", "systemd-networkd.service",
           "appliance-slot-check.service", "appliance-grow-data.service")
    for unit in ("e2scrub_reap.service", "e2scrub_all.timer", "apt-daily.timer", "apt-daily-upgrade.timer"):
        chroot(root, "systemctl", "mask", unit)
    # A box with its root locked: no password to guess. Field engineers reach it over DICOM,
    # the data partition and (a later issue) a signed service login.
    chroot(root, "passwd", "--lock", "root", stdout=subprocess.DEVNULL)
    # The python3-venv machinery was needed only to make the venv.
    chroot(root, "apt-get", "purge", "--yes", "--quiet", "python3-venv", "python3.11-venv", "python3-pip-whl",
           "python3-setuptools-whl", stdout=subprocess.DEVNULL, env={"DEBIAN_FRONTEND": "noninteractive"})
    # The initrd: a module list, regenerated with SOURCE_DATE_EPOCH (reproducible cpio).
    conf = root / "etc" / "initramfs-tools"
    (conf / "modules").write_text("\n".join(INITRD_MODULES) + "\n")
    (conf / "conf.d" / "appliance").write_text("MODULES=list\nCOMPRESS=zstd\n")
    chroot(root, "update-initramfs", "-u", "-k", "all", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    packages = chroot(root, "dpkg-query", "-W", "-f", "${Package}\t${Version}\t${Architecture}\n",
                      capture_output=True, text=True).stdout
    (wheels.parent / "packages.tsv").write_text(packages)
    print(f"customized: {len(packages.splitlines())} Debian packages, {len(wheels_in)} wheels, epoch {epoch}")


def rauc_system_conf() -> str:
    """RAUC on the box: two root slots by PARTUUID, our boot backend (EFI variables of systemd-boot,
    image-build/rootfs/usr/lib/appliance-image/slots), status on the data partition."""
    slots = "".join(f"\n[slot.rootfs.{i}]\ndevice=/dev/disk/by-partuuid/{partuuid(f'root-{s}')}\ntype=ext4\nbootname={s}\n"
                    for i, s in enumerate("ab"))
    return ("[system]\n"
            f"compatible={bundle.compatible()}\n"
            "bootloader=custom\nbundle-formats=-plain\nmountprefix=/run/rauc\nstatusfile=/data/rauc/status.raucs\n\n"
            "[keyring]\npath=/etc/rauc/keyring.pem\n\n"
            "[handlers]\nbootloader-custom-backend=/usr/lib/appliance-image/slots\n" + slots)


def fstab() -> str:
    esp, data = partuuid("esp"), partuuid("data")
    return (
        "# The appliance image. / is the slot the boot entry names (root=PARTUUID=..., mounted rw by the\n"
        "# initrd), so this file is the same in both slots.\n"
        f"PARTUUID={esp}  /efi  vfat  umask=0077,noatime  0 2\n"
        f"PARTUUID={data}  /data  ext4  noatime,nosuid,nodev  0 2\n"
        "# Configuration and spool live on the data partition: updates never touch them.\n"
        "/data/etc  /etc/appliance  none  bind,x-systemd.requires-mounts-for=/data  0 0\n"
        "/data/appliance  /var/lib/appliance  none  bind,x-systemd.requires-mounts-for=/data  0 0\n"
    )


# ---- file systems and the disk --------------------------------------------------------------
def install_tree(src: Path, dst: Path, epoch: int) -> None:
    """Copy a tree of the checkout over ``dst`` with every copied path's times at ``epoch``: a
    checkout's mtimes say when it was checked out, which is not an input of the image (`clamp_times`
    only lowers times above the epoch, so an older checkout would leak its own)."""
    shutil.copytree(src, dst, dirs_exist_ok=True, symlinks=True)
    for path in sorted(src.rglob("*"), reverse=True):  # children before their folder
        os.utime(dst / path.relative_to(src), (epoch, epoch), follow_symlinks=False)


def clamp_times(tree: Path, epoch: int) -> None:
    for path in [tree, *tree.rglob("*")]:
        st = path.lstat()
        if st.st_mtime > epoch or st.st_atime != epoch:
            os.utime(path, (epoch, min(st.st_mtime, epoch)), follow_symlinks=False)


def _used_inodes(img: Path) -> list[int]:
    """Allocated inodes, from dumpe2fs's free ranges per group (what debugfs must touch)."""
    out = run("dumpe2fs", img, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    per_group = int(re.search(r"^Inodes per group:\s+(\d+)", out, re.M).group(1))
    count = int(re.search(r"^Inode count:\s+(\d+)", out, re.M).group(1))
    free: set[int] = set()
    for field in re.findall(r"^\s+Free inodes: (.*)$", out, re.M):
        for part in filter(None, (p.strip() for p in field.split(","))):
            lo, _, hi = part.partition("-")
            free.update(range(int(lo), int(hi or lo) + 1))
    assert count % per_group == 0
    return [i for i in range(1, count + 1) if i not in free]


def ext4(img: Path, size_mib: int, label: str, tree: Path | None, epoch: int) -> None:
    img.unlink(missing_ok=True)
    env = {"E2FSPROGS_FAKE_TIME": str(epoch)}
    args = ["-q", "-t", "ext4", "-L", label, "-U", guid(f"fs/{label}"), "-E",
            f"hash_seed={guid(f'hash/{label}')},lazy_itable_init=0,lazy_journal_init=0", "-I", "256", "-b", "4096"]
    if tree is not None:
        args += ["-d", tree]
    run("mkfs.ext4", *args, img, f"{size_mib}M", env=env, stdout=subprocess.DEVNULL)
    # mkfs.ext4 -d copies each file's ctime and atime, which user space cannot set on the source:
    # reset them (and the creation time) on every allocated inode.
    script = img.with_suffix(".debugfs")
    with open(script, "w") as f:
        for ino in _used_inodes(img):
            for field in ("ctime", "atime", "crtime"):
                f.write(f"sif <{ino}> {field} @{epoch}\n")
                f.write(f"sif <{ino}> {field}_extra 0\n")
    run("debugfs", "-w", "-f", script, img, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    script.unlink()
    run("e2fsck", "-fn", img, stdout=subprocess.DEVNULL, env=env)  # read-only check: a clean file system


def loader_entry(slot: str, kernel_version: str) -> str:
    return (f"title Appliance (slot {slot.upper()}, kernel {kernel_version})\n"
            f"linux /{slot}/vmlinuz\ninitrd /{slot}/initrd.img\n"
            f"options root=PARTUUID={partuuid(f'root-{slot}')} rauc.slot={slot} {kernel_cmdline()}\n")


def efi_kernel(src: Path, dst: Path) -> None:
    """The kernel as UEFI loads it: systemd-boot starts it as a PE image through its EFI stub, which
    a gzip-compressed kernel (how some distributions ship arm64's Image) does not have, so one is
    decompressed; an x86-64 bzImage and Debian 12's arm64 vmlinuz (an uncompressed Image) are
    copied as they are. The update bundle's hook does the same (image-build/bundle/hook)."""
    import gzip

    with open(src, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    if compressed:
        with gzip.open(src, "rb") as f, open(dst, "wb") as out:
            shutil.copyfileobj(f, out)
    else:
        shutil.copy(src, dst)


def esp(img: Path, root: Path, epoch: int, work: Path) -> None:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    assert len(kernels) == 1, kernels
    version = kernels[0].name.removeprefix("vmlinuz-")
    stage = work / "esp"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "EFI" / "BOOT").mkdir(parents=True)
    (stage / "EFI" / "systemd").mkdir()
    (stage / "loader" / "entries").mkdir(parents=True)
    (stage / "a").mkdir()
    efi = spec()["efi"]
    # x86-64 takes systemd-boot from the build machine (the same Debian 12 package), another
    # architecture from its own root file system.
    loader = SYSTEMD_BOOT if arch() == "amd64" else root / "usr/lib/systemd/boot/efi" / f"systemd-boot{efi}.efi"
    shutil.copy(loader, stage / "EFI" / "BOOT" / f"BOOT{efi.upper()}.EFI")
    shutil.copy(loader, stage / "EFI" / "systemd" / f"systemd-boot{efi}.efi")
    efi_kernel(kernels[0], stage / "a" / "vmlinuz")
    shutil.copy(root / "boot" / f"initrd.img-{version}", stage / "a" / "initrd.img")
    (stage / "loader" / "loader.conf").write_text("default a.conf\ntimeout 0\nconsole-mode keep\neditor no\n")
    (stage / "loader" / "entries" / "a.conf").write_text(loader_entry("a", version))
    clamp_times(stage, epoch)
    img.unlink(missing_ok=True)
    size_kib = PARTITIONS[0][1] * 1024
    run("mkfs.vfat", "-C", "--invariant", "-i", guid("fs/esp")[:8], "-n", "ESP", img, size_kib,
        stdout=subprocess.DEVNULL)
    env = {"MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": str(epoch)}
    for d in sorted(p for p in stage.rglob("*") if p.is_dir()):
        run("mmd", "-i", img, f"::/{d.relative_to(stage)}", env=env)
    for f in sorted(p for p in stage.rglob("*") if p.is_file()):
        run("mcopy", "-m", "-i", img, f, f"::/{f.relative_to(stage)}", env=env)


def disk(out: Path, parts: dict[str, Path]) -> None:
    """A GPT disk with the partitions at MiB boundaries; written sparse, without loop devices."""
    out.unlink(missing_ok=True)
    total = 1 + sum(size for _, size, _ in PARTITIONS) + 1  # GPT before and its backup after
    with open(out, "wb") as f:
        f.truncate(total * MiB)
    spans = layout([(name, size) for name, size, _ in PARTITIONS])
    lines = ["label: gpt", f"label-id: {guid('disk')}", "unit: sectors", "first-lba: 2048", ""]
    for name, _, ptype in PARTITIONS:
        start, size = spans[name]
        lines.append(f"start={start * 2048}, size={size * 2048}, type={ptype}, uuid={partuuid(name)}, name=\"{name}\"")
    run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", out, input="\n".join(lines) + "\n", text=True)
    for name, _, _ in PARTITIONS:
        place(parts[name], out, spans[name][0])


def layout(partitions: list[tuple[str, int]]) -> dict[str, tuple[int, int]]:
    """(start, size) in MiB of each (name, size in MiB), in order after the GPT's first MiB: the
    disk's layout, from `PARTITIONS` or from an image's manifest."""
    spans, start = {}, 1
    for name, size in partitions:
        spans[name] = (start, size)
        start += size
    return spans


def manifest_layout(manifest: dict) -> dict[str, tuple[int, int]]:
    """The layout of the image a manifest describes (the image's own, whatever `PARTITIONS` says now)."""
    return layout([(p["name"], p["mib"]) for p in sorted(manifest["partitions"], key=lambda p: p["number"])])


def place(part: Path, disk_img: Path, start_mib: int) -> None:
    """Write a partition's file system into the disk image at ``start_mib``, sparse."""
    run("dd", f"if={part}", f"of={disk_img}", "bs=1M", f"seek={start_mib}", "conv=notrunc,sparse", "status=none")


def data_partition(img: Path, size_mib: int, config: str, uid: int, gid: int, epoch: int, work: Path) -> None:
    """The data partition as a box first sees it: ``config`` at /data/etc/appliance.toml (beside
    the rest of `DATA_FILES`) and an empty spool folder owned by the appliance's account."""
    tree = work / "data"
    shutil.rmtree(tree, ignore_errors=True)
    install_tree(DATA_FILES, tree, epoch)
    (tree / "etc" / "appliance.toml").write_text(config)
    (tree / "appliance").mkdir()
    os.chown(tree / "appliance", uid, gid)
    os.chmod(tree / "appliance", 0o750)
    clamp_times(tree, epoch)
    ext4(img, size_mib, "data", tree, epoch)
    shutil.rmtree(tree)


# ---- the whole build ------------------------------------------------------------------------
def build(out: Path, reuse_rootfs: bool = False) -> dict:
    epoch = int(os.environ.setdefault(
        "SOURCE_DATE_EPOCH", run("git", "-C", REPO, "log", "-1", "--format=%ct", capture_output=True,
                                 text=True).stdout.strip()))
    # The checkout's version when the build starts (its files are read from here on).
    version = run("git", "-C", REPO, "describe", "--always", "--dirty", "--abbrev=12", capture_output=True,
                  text=True).stdout.strip()
    work = out / "work"
    root = work / "rootfs"
    if reuse_rootfs and (work / "packages.tsv").exists():
        (wheel,) = (work / "wheelhouse").glob("appliance-*.whl")
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        wheel = wheelhouse(work / "wheelhouse")
        debootstrap(root, work)
    return _finish(out, work, root, wheel, epoch, version)


def debootstrap(root: Path, work: Path) -> None:
    excludes = [f"--dpkgopt=path-exclude={p}" for p in ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*",
                                                        "/usr/share/locale/*", "/usr/share/lintian/*")]
    run("mmdebstrap", "--quiet", "--mode=root", "--variant=minbase", "--format=directory",
        f"--architectures={arch()}", f"--include={','.join(packages())}", *excludes,
        # Before any package: the initrd that kernel and udev installs build (several times, a few
        # minutes each under qemu-user for arm64) is a list-only one; customize writes the list
        # and builds the real one.
        "--setup-hook=mkdir -p \"$1/etc/initramfs-tools/conf.d\" && "
        "printf 'MODULES=list\\nCOMPRESS=zstd\\n' > \"$1/etc/initramfs-tools/conf.d/appliance\"", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        f"--customize-hook={sys.executable} {HERE / 'build.py'} --customize \"$1\" {work / 'wheelhouse'}",
        SUITE, root, f"deb {MIRROR} {SUITE} main", f"deb {MIRROR} {SUITE}-updates main",
        f"deb {SECURITY} {SUITE}-security main")


def _finish(out: Path, work: Path, root: Path, wheel: Path, epoch: int, version: str) -> dict:
    packages = [dict(zip(("package", "version", "architecture"), line.split("\t")))
                for line in (work / "packages.tsv").read_text().splitlines()]
    wheels = json.loads((work / "wheels.json").read_text())
    owner = next(line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()
                 if line.startswith("appliance:"))
    uid, gid = int(owner[2]), int(owner[3])
    # What this slot holds, for `appliance diag` on the box: the image's version and its bill of materials.
    (root / "usr" / "lib" / "appliance-image" / "build.json").write_text(json.dumps(
        {"git": version, "source_date_epoch": epoch, "debian": packages, "wheels": wheels}, indent=1) + "\n")
    clamp_times(root, epoch)
    imgs = {name: work / f"{name}.img" for name, _, _ in PARTITIONS}
    esp(imgs["esp"], root, epoch, work)
    ext4(imgs["root-a"], PARTITIONS[1][1], "root", root, epoch)
    ext4(imgs["root-b"], PARTITIONS[2][1], "root-b", None, epoch)
    data_partition(imgs["data"], PARTITIONS[3][1], (DATA_FILES / "etc" / "appliance.toml").read_text(), uid, gid, epoch, work)
    image = out / "appliance.img"
    disk(image, imgs)
    run("zstd", "--quiet", "--force", "-T2", "-10", image, "-o", out / "appliance.img.zst")
    update = bundle.make(imgs["root-a"], out / "appliance-update.raucb", version)
    ok, why = bundle.verify(update)
    if not ok:
        raise SystemExit(f"the update bundle does not verify against the image's keyring: {why}")
    manifest = {
        "architecture": arch(),
        "image": "appliance.img", "sha256": sha256(image), "bytes": image.stat().st_size,
        "compressed": {"file": "appliance.img.zst", "sha256": sha256(out / "appliance.img.zst")},
        "update_bundle": {"file": update.name, "sha256": sha256(update), "version": version,
                          "keyring_sha256": sha256(bundle.KEYRING)},
        "source_date_epoch": epoch,
        "appliance_account": {"uid": uid, "gid": gid},
        "git": version,
        "debian": {"suite": SUITE, "mirror": MIRROR, "security": SECURITY, "packages": packages},
        "python": {"wheels": [{"file": name, "sha256": digest} for name, digest in wheels.items()],
                   "appliance_wheel": wheel.name},
        "partitions": [{"number": i + 1, "name": name, "mib": size, "type": ptype, "partuuid": partuuid(name),
                        "sha256": sha256(imgs[name])} for i, (name, size, ptype) in enumerate(PARTITIONS)],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (out / "SHA256SUMS").write_text(f"{manifest['sha256']}  appliance.img\n"
                                    f"{manifest['compressed']['sha256']}  appliance.img.zst\n")
    if os.environ.get("APPLIANCE_IMAGE_KEEP_WORK") != "1":
        shutil.rmtree(work)
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "build" / "image")
    ap.add_argument("--reuse-rootfs", action="store_true",
                    help="development: keep the root file system of the last build with APPLIANCE_IMAGE_KEEP_WORK=1")
    ap.add_argument("--arch", choices=sorted(ARCHES), default=None,
                    help=f"the box's architecture (default: ${ARCH_ENV}, else amd64)")
    ap.add_argument("--customize", nargs=2, type=Path, metavar=("ROOT", "WHEELHOUSE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arch:
        os.environ[ARCH_ENV] = args.arch  # the customize hook and bundle.py read it from there
    if args.customize:
        customize(*args.customize)
        return
    if os.geteuid() != 0:
        sys.exit("make image needs root (mmdebstrap --mode=root, chroot)")
    import time

    t0 = time.monotonic()
    manifest = build(args.out.resolve(), args.reuse_rootfs)
    print(f"{args.out}/appliance.img: {manifest['bytes'] / MiB:.0f} MiB, sha256 {manifest['sha256']}, "
          f"{len(manifest['debian']['packages'])} Debian packages, {len(manifest['python']['wheels'])} wheels, "
          f"built in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
