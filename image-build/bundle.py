"""Signed RAUC update bundles for the appliance image: one root slot's ext4 file system plus the
hook that puts its kernel on the ESP (image-build/bundle/hook), signed with a certificate the
image's keyring trusts. `build.py` makes ``appliance-update.raucb`` from the image it builds;
the boot test also makes a broken one and one signed by a stranger.

    python image-build/bundle.py ROOTFS.ext4 OUT.raucb --version V [--cert C --key K]

Keys: APPLIANCE_UPDATE_CERT / APPLIANCE_UPDATE_KEY (default: image-build/test-keys, TEST ONLY).
A bundle is not byte-reproducible (its CMS signature carries the signing time); its payload is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS = HERE / "test-keys"
COMPATIBLE = "scanner-appliance-x86_64"  # RAUC's compatible string: a bundle installs only on its own kind of box


def compatible() -> str:
    """The compatible string of the architecture being built (build.py's APPLIANCE_IMAGE_ARCH)."""
    return {"amd64": COMPATIBLE, "arm64": "scanner-appliance-aarch64"}[os.environ.get("APPLIANCE_IMAGE_ARCH", "amd64")]
CERT = Path(os.environ.get("APPLIANCE_UPDATE_CERT", KEYS / "signing.cert.pem"))
KEY = Path(os.environ.get("APPLIANCE_UPDATE_KEY", KEYS / "signing.key.pem"))
KEYRING = Path(os.environ.get("APPLIANCE_UPDATE_KEYRING", KEYS / "ca.cert.pem"))


def manifest(version: str, description: str) -> str:
    return (f"[update]\ncompatible={compatible()}\nversion={version}\ndescription={description}\n\n"
            "[bundle]\nformat=verity\n\n[hooks]\nfilename=hook\n\n"
            "[image.rootfs]\nfilename=rootfs.ext4\nhooks=post-install\n")


def make(rootfs: Path, out: Path, version: str, description: str = "appliance root file system",
         cert: Path = CERT, key: Path = KEY) -> Path:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        content = Path(tmp) / "content"
        content.mkdir()
        os.link(rootfs, content / "rootfs.ext4") if rootfs.stat().st_dev == content.stat().st_dev \
            else shutil.copy(rootfs, content / "rootfs.ext4")
        shutil.copy(HERE / "bundle" / "hook", content / "hook")
        (content / "manifest.raucm").write_text(manifest(version, description))
        out.unlink(missing_ok=True)
        subprocess.run(["rauc", "bundle", f"--cert={cert}", f"--key={key}", "--mksquashfs-args=-comp zstd -Xcompression-level 6",
                        str(content), str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


def verify(bundle: Path, keyring: Path = KEYRING) -> tuple[bool, str]:
    """`rauc extract --keyring`: checks the signature and the payload (`rauc info` does not catch a
    tampered payload: ../shared/IMAGE.md)."""
    with tempfile.TemporaryDirectory(dir=bundle.parent) as tmp:
        res = subprocess.run(["rauc", "extract", f"--keyring={keyring}", str(bundle), str(Path(tmp) / "x")],
                             capture_output=True, text=True)
    return res.returncode == 0, (res.stderr or res.stdout).strip()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rootfs", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--version", required=True)
    ap.add_argument("--cert", type=Path, default=CERT)
    ap.add_argument("--key", type=Path, default=KEY)
    a = ap.parse_args()
    print(make(a.rootfs, a.out, a.version, cert=a.cert, key=a.key))
