"""The image's boot test: boot it headless in qemu and use it as a scanner would.

    python image-build/boot_test.py [--image build/image/appliance.img] [--out build/image/boot-test]

1. A copy of the image gets a site configuration on its data partition (the partition rebuilt
   as `build.py` builds it, with the console set to a dcmtk ``storescp`` on the host, reached
   from the guest at 10.0.2.2, and low-dose CT routed to the denoiser). The image itself is not
   changed.
2. qemu boots the copy (UEFI with OVMF, virtio disk, user networking with the host port forwarded
   to the guest's DICOM port 11112). It uses KVM when /dev/kvm runs this guest, TCG otherwise
   (the nested /dev/kvm on these machines does not run it: ../shared/IMAGE.md).
3. Passes when: ``echoscu`` is answered; a low-dose CT study sent with ``storescu`` comes back
   denoised; a projection-data (DICOM-CT-PD) study comes back reconstructed. All of it on the host's
   storescp.
4. Prints, and writes to ``OUT/boot-test.json``, the times from qemu's start: first console
   output, first C-ECHO answered, each derived series complete. The guest's serial console is in
   ``OUT/serial.log``.
Exit status 0 on a pass, 1 on a failure (the reason is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import build  # noqa: E402  (image-build/build.py: the partition layout and the file-system recipe)

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
GUEST_PORT = 11112
CT_SHAPE, PD_SHAPE = (8, 64, 64), (6, 64, 64)  # slices, rows, columns

SITE_CONFIG = """\
# Written by image-build/boot_test.py: the host's storescp is the console.
[node]
ae_title = "APPLIANCE"
port = {guest_port}

[destinations.console]
ae_title = "CONSOLE"
host = "10.0.2.2"
port = {console_port}

[[routes]]
name = "projection data"
data = "projections"
pipeline = "recon"
destinations = ["console"]

[[routes]]
name = "low-dose CT"
modalities = ["CT"]
pipeline = "denoise"
destinations = ["console"]

[completion]
idle_seconds = 5.0

[recon]
matrix = {pd_matrix}
slices = {pd_slices}
slice_mm = 2.5
iterations = 4
"""


class Failed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def site_disk(image: Path, manifest: dict, work: Path, console_port: int) -> Path:
    """A sparse copy of the image whose data partition holds the test's site configuration."""
    disk = work / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(disk)], check=True)
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(build.DATA_FILES, data)
    (data / "etc" / "appliance.toml").write_text(SITE_CONFIG.format(
        guest_port=GUEST_PORT, console_port=console_port, pd_matrix=PD_SHAPE[1], pd_slices=PD_SHAPE[0]))
    account = manifest["appliance_account"]
    (data / "appliance").mkdir(mode=0o750)
    os.chown(data / "appliance", account["uid"], account["gid"])
    epoch = manifest["source_date_epoch"]
    build.clamp_times(data, epoch)
    part = work / "data.img"
    (entry,) = [p for p in manifest["partitions"] if p["name"] == "data"]
    build.ext4(part, entry["mib"], "data", data, epoch)
    start = 1 + sum(p["mib"] for p in manifest["partitions"] if p["number"] < entry["number"])
    subprocess.run(["dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={start}", "conv=notrunc,sparse",
                    "status=none"], check=True)
    part.unlink()
    return disk


def qemu_command(disk: Path, vars_fd: Path, port: int, accel: str) -> list[str]:
    cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg,thread=multi", "-cpu", "max"]
    return ["qemu-system-x86_64", "-machine", "q35", "-m", "2048", "-smp", "2", *cpu,
            "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={vars_fd}",
            "-drive", f"if=virtio,format=raw,file={disk},cache=unsafe",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{GUEST_PORT}",
            "-device", "virtio-net-pci,netdev=n0", "-device", "virtio-rng-pci"]


class Guest:
    def __init__(self, disk: Path, work: Path, port: int, accel: str) -> None:
        self.vars_fd = work / "OVMF_VARS.fd"
        shutil.copy(OVMF_VARS, self.vars_fd)
        self.serial = work / "serial.log"
        self.accel = accel
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(qemu_command(disk, self.vars_fd, port, accel), stdin=subprocess.DEVNULL,
                                     stdout=open(self.serial, "wb"), stderr=subprocess.STDOUT)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def console(self) -> str:
        return self.serial.read_bytes().decode(errors="replace")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise Failed(f"qemu exited ({self.proc.returncode}); the end of its console:\n{self.console()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def kvm_runs(disk: Path, work: Path, port: int) -> bool:
    """Whether this machine's /dev/kvm boots the image: the kernel must reach systemd within 30 s."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    probe = Guest(disk, work, port, "kvm")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and probe.proc.poll() is None:
            if "Welcome to" in probe.console() or "systemd" in probe.console():
                return True
            time.sleep(0.5)
        return False
    finally:
        probe.stop()


def echo(port: int) -> bool:
    res = subprocess.run(["echoscu", "-to", "3", "-ta", "3", "-td", "3", "-aec", "APPLIANCE", "127.0.0.1", str(port)],
                         capture_output=True, env=DCMTK_ENV)
    return res.returncode == 0


def wait_for(what: str, done, guest: Guest, timeout_s: float, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        guest.check_alive()
        if result := done():
            return result
        time.sleep(poll_s)
    raise Failed(f"timed out after {timeout_s:.0f} s waiting for {what}; the end of the console:\n"
                 f"{guest.console()[-3000:]}")


def send(folder: Path, port: int) -> None:
    files = sorted(str(p) for p in folder.rglob("*.dcm"))
    res = subprocess.run(["storescu", "-aec", "APPLIANCE", "-aet", "BOOTTEST", "127.0.0.1", str(port), *files],
                         capture_output=True, text=True, env=DCMTK_ENV)
    if res.returncode != 0:
        raise Failed(f"storescu into the guest failed ({res.returncode}): {res.stderr[-2000:]}")


def derived_series(console_dir: Path, study_uid: str, n: int, pipeline: str) -> list[Path] | None:
    import pydicom

    mine = []
    for f in sorted(console_dir.rglob("*")):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:
            continue  # still being written
        if str(ds.StudyInstanceUID) == study_uid:
            mine.append((f, ds))
    if len(mine) < n:
        return None
    assert len(mine) == n, f"{len(mine)} instances of the {pipeline} study, expected {n}"
    for _, ds in mine:
        if pipeline not in str(ds.get("DerivationDescription", "")).lower():
            raise Failed(f"a derived instance does not say {pipeline!r}: {ds.get('DerivationDescription')!r}")
    return [f for f, _ in mine]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", type=Path, default=REPO / "build" / "image" / "appliance.img")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "image" / "boot-test")
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=os.environ.get("APPLIANCE_BOOT_ACCEL", "auto"))
    ap.add_argument("--timeout", type=float, default=420.0, help="seconds to the first C-ECHO answer")
    args = ap.parse_args()
    image = args.image.resolve()
    manifest = json.loads((image.parent / "manifest.json").read_text())
    work = args.out.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    from appliance.synth.projections import write_synthetic_projections
    from appliance.synth.study import write_synthetic_ct
    from bench.ingest import DcmtkStoreSCP

    result: dict = {"image_sha256": manifest["sha256"], "git": manifest["git"]}
    guest = None
    try:
        with DcmtkStoreSCP(work, name="console", ae_title="CONSOLE", by_study=True) as console:
            disk = site_disk(image, manifest, work, console.port)
            port = free_port()
            accel = args.accel
            if accel == "auto":
                accel = "kvm" if kvm_runs(disk, work, port) else "tcg"
            result["accel"] = accel
            print(f"booting {image.name} under {accel.upper()}; DICOM on 127.0.0.1:{port}", flush=True)
            guest = Guest(disk, work, port, accel)
            result["first_console_output_s"] = wait_for("console output", lambda: guest.console().strip() and guest.elapsed(),
                                                        guest, 120, 0.2)
            result["first_echo_s"] = wait_for("the first C-ECHO answer", lambda: echo(port) and guest.elapsed(), guest,
                                              args.timeout, 2.0)
            print(f"C-ECHO answered {result['first_echo_s']:.0f} s after qemu started", flush=True)

            ct = write_synthetic_ct(work / "ct", shape_zyx=CT_SHAPE, dose_fraction=0.25, seed=7)
            pd = write_synthetic_projections(work / "ctpd", shape_zyx=PD_SHAPE, dose_fraction=0.25, n_views=120,
                                             seed=8)
            for name, study, n, pipeline in (("denoise", ct, CT_SHAPE[0], "denoise"),
                                              ("recon", pd, PD_SHAPE[0], "recon")):
                t = guest.elapsed()
                send(work / ("ct" if name == "denoise" else "ctpd"), port)
                sent = guest.elapsed()
                wait_for(f"the {name} study's derived series", lambda: derived_series(
                    console.out, study.study_uid, n, pipeline), guest, 600, 2.0)
                result[name] = {"sent_at_s": t, "sent_s": sent - t, "derived_series_back_s": guest.elapsed() - sent,
                                "instances": n}
                print(f"{name}: {n} instances sent in {sent - t:.1f} s, the derived series back "
                      f"{guest.elapsed() - sent:.1f} s later", flush=True)
        result["passed"] = True
        return 0
    except Failed as exc:
        result["passed"], result["failure"] = False, str(exc)[:4000]
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if guest is not None:
            guest.stop()
        (work / "disk.img").unlink(missing_ok=True)
        (work / "boot-test.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "failure"}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
