"""The image's boot test: boot it headless in qemu and use it as a scanner would.

    python image-build/boot_test.py [--image build/image/appliance.img] [--out build/image/boot-test]

1. A copy of the image gets a site configuration on its data partition (the partition rebuilt
   as `build.py` builds it, with the console set to a dcmtk ``storescp`` on the host, reached
   from the guest at 10.0.2.2, and low-dose CT routed to the denoiser). The image itself is not
   changed. The copy is 2 GiB larger than the image, as a box's disk is: the data partition must
   grow onto it (`appliance-grow-data.service`; checked in the diagnostic bundle's disk size).
2. qemu boots the copy (UEFI with OVMF, virtio disk, user networking with the host port forwarded
   to the guest's DICOM port 11112). It uses KVM when /dev/kvm runs this guest, TCG otherwise
   (the nested /dev/kvm on these machines does not run it: ../shared/IMAGE.md).
3. Passes when: ``echoscu`` is answered; a low-dose CT study sent with ``storescu`` comes back
   denoised; a projection-data (DICOM-CT-PD) study comes back reconstructed. All of it on the host's
   storescp; a stick with a signed model (models/*.toml) makes that model active without a reboot,
   and the next CT study comes back made by it (its version in DerivationDescription, its output
   its input: the boot test's model is `engines.train.identity`). Then (unless --no-update), as a
   field engineer would, with USB sticks hot-plugged through qemu's monitor:
   - a stick with a bundle signed by a stranger and the image's own update bundle: the first is
     refused, the second installed into slot B; B boots on trial, is healthy and committed, and
     denoises a study;
   - a stick with a bundle whose appliance cannot start: installed into slot A, A boots on trial,
     the health check rolls it back, and the box is on slot B again, answering C-ECHO, its spool
     and configuration intact, and denoises a study.
   The host checks too that the update bundle verifies with the image's keyring and the stranger's
   does not.
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
from appliance.loopback import free_port  # noqa: E402
from bench.e2e import DCMTK_ENV  # noqa: E402  (dcmtk with TCP_NODELAY=1, as the bench runs it)
import bundle  # noqa: E402  (image-build/bundle.py: signed update bundles)
import site_image  # noqa: E402  (image-build/site_image.py: a site's configuration on the data partition)

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# The machine and UEFI firmware per architecture (the image's manifest says which it is).
MACHINES = {
    "amd64": {"qemu": "qemu-system-x86_64", "machine": ["-machine", "q35"], "code": OVMF_CODE, "vars": OVMF_VARS},
    # arm64: qemu's "virt" board with AAVMF (EDK2 for AArch64); TCG only here (an x86 host).
    "arm64": {"qemu": "qemu-system-aarch64", "machine": ["-machine", "virt"],
              "code": Path("/usr/share/AAVMF/AAVMF_CODE.fd"), "vars": Path("/usr/share/AAVMF/AAVMF_VARS.fd")},
}
GUEST_PORT = 11112
DISK_EXTRA_GIB = 2  # the guest's disk is this much larger than the image (sparse)
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


def site_disk(image: Path, manifest: dict, work: Path, console_port: int) -> Path:
    """The image as a site would flash it (image-build/site.py), configured for this test."""
    config = SITE_CONFIG.format(guest_port=GUEST_PORT, console_port=console_port, pd_matrix=PD_SHAPE[1],
                                pd_slices=PD_SHAPE[0])
    disk = site_image.site_image(image, config, work / "disk.img")
    # Flashed onto a disk larger than the image, as on a box: the data partition must take the rest.
    with open(disk, "r+b") as f:
        f.truncate(f.seek(0, 2) + DISK_EXTRA_GIB * (1 << 30))
    return disk


def qemu_command(disk: Path, vars_fd: Path, port: int, accel: str, monitor: Path, arch: str = "amd64") -> list[str]:
    m = MACHINES[arch]
    cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg,thread=multi", "-cpu", "max"]
    return [m["qemu"], *m["machine"], "-m", "2048", "-smp", "2", *cpu,
            "-display", "none", "-serial", "stdio", "-monitor", f"unix:{monitor},server,nowait",
            "-device", "qemu-xhci,id=xhci", "-device", "qemu-xhci,id=xhci2", "-device", "qemu-xhci,id=xhci3",
            "-drive", f"if=pflash,format=raw,readonly=on,file={m['code']}",
            "-drive", f"if=pflash,format=raw,file={vars_fd}",
            "-drive", f"if=virtio,format=raw,file={disk},cache=unsafe",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{GUEST_PORT}",
            "-device", "virtio-net-pci,netdev=n0", "-device", "virtio-rng-pci"]


class Guest:
    def __init__(self, disk: Path, work: Path, port: int, accel: str, arch: str = "amd64") -> None:
        self.vars_fd = work / "OVMF_VARS.fd"
        shutil.copy(MACHINES[arch]["vars"], self.vars_fd)
        self.serial = work / "serial.log"
        self.accel = accel
        self.t0 = time.monotonic()
        self.monitor = work / f"monitor-{accel}.sock"
        self._cmd = qemu_command(disk, self.vars_fd, port, accel, self.monitor, arch)
        self.proc = subprocess.Popen(self._cmd, stdin=subprocess.DEVNULL,
                                     stdout=open(self.serial, "wb"), stderr=subprocess.STDOUT)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def console(self) -> str:
        return self.serial.read_bytes().decode(errors="replace")

    def hmp(self, command: str) -> str:
        """One human-monitor command (drive_add, device_add, device_del); returns its output."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.monitor))
            sock.settimeout(10)
            out = b""
            while not out.rstrip().endswith(b"(qemu)"):
                out += sock.recv(4096)
            sock.sendall(command.encode() + b"\n")
            out = b""
            while not out.rstrip().endswith(b"(qemu)"):
                out += sock.recv(4096)
        text = out.decode(errors="replace").replace("(qemu)", "").strip()
        return text.split("\n", 1)[1].strip() if "\n" in text else ""

    def plug(self, name: str, image: Path, bus: str = "xhci.0", writable: bool = False) -> None:
        """A USB stick: what a field engineer plugs into the box."""
        for cmd in (f"drive_add 0 if=none,id={name},format=raw,readonly={'off' if writable else 'on'},file={image}",
                    f"device_add usb-storage,bus={bus},drive={name},id={name}-dev"):
            out = self.hmp(cmd)
            if "rror" in out:
                raise Failed(f"qemu monitor: {cmd}: {out}")

    def unplug(self, name: str) -> None:
        if getattr(self, "power_cycles", 0) == 0:  # a power cycle took the sticks out already
            self.hmp(f"device_del {name}-dev")

    def events(self) -> list[dict]:
        """The image's slot events (appliance-slots lines on the console), in order."""
        out = []
        for line in self.console().splitlines():
            _, sep, rest = line.partition("appliance-slots: ")
            if sep:
                try:
                    out.append(json.loads(rest.strip()))
                except json.JSONDecodeError:
                    pass  # a line cut by another console writer
        return out

    def wait_event(self, event: str, timeout_s: float, after: int = 0, **match) -> tuple[int, dict]:
        def found():
            for i, e in enumerate(self.events()):
                if i >= after and e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
                    return i, e
            return None
        return wait_for(f"slot event {event} {match or ''}", found, self, timeout_s, 1.0)

    # A guest reboot under TCG sometimes leaves OVMF hung right after its reset: no output after the
    # firmware's first screen clears (seen in 2 of 8 reboots, each time with a USB stick that had
    # been hot-plugged into the xhci controller after another one was removed; a reset from the
    # monitor did not help). On a box that is a power cycle; here too: qemu is restarted on the same
    # disk and UEFI variables, without the sticks, and the test counts it.
    STALL_S = 120.0

    def _watch_reboots(self) -> None:
        size = self.serial.stat().st_size
        now = time.monotonic()
        if size != getattr(self, "_size", None):
            self._size, self._since = size, now
            return
        tail = self.serial.read_bytes()[-400:]
        cut = tail.rfind(b"Restarting system")
        after = tail[cut:] if cut >= 0 else b""
        if cut >= 0 and b"Welcome" not in after and b"BdsDxe: starting" not in after and now - self._since > self.STALL_S:
            print(f"the guest hung {now - self._since:.0f} s after a reboot: power cycle", flush=True)
            self.power_cycles = getattr(self, "power_cycles", 0) + 1
            self.proc.kill()
            self.proc.wait()
            with open(self.serial, "ab") as f:
                f.write(b"\r\n[boot test: power cycle]\r\n")
            self.monitor.unlink(missing_ok=True)
            self.proc = subprocess.Popen(self._cmd, stdin=subprocess.DEVNULL, stdout=open(self.serial, "ab"),
                                         stderr=subprocess.STDOUT)
            self._since = now

    def check_alive(self) -> None:
        self._watch_reboots()
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


BROKEN_APPLIANCE = "#!/bin/sh\necho 'appliance: broken on purpose by the boot test' >&2\nexit 1\n"


def root_slot(image: Path, manifest: dict, work: Path) -> Path:
    """Slot A's file system, cut out of the image (what the update bundle carries)."""
    start, size = build.manifest_layout(manifest)["root-a"]
    out = work / "rootfs.ext4"
    subprocess.run(["dd", f"if={image}", f"of={out}", "bs=1M", f"skip={start}", f"count={size}",
                    "conv=sparse", "status=none"], check=True)
    return out


def break_appliance(rootfs: Path, work: Path) -> None:
    """The appliance in this root file system exits 1 at once: an update whose appliance cannot start."""
    script = work / "broken-appliance"
    script.write_text(BROKEN_APPLIANCE)
    cmds = work / "break.debugfs"
    cmds.write_text(f"cd {build.VENV}/bin\nrm appliance\nwrite {script} appliance\nsif appliance mode 0100755\n")
    subprocess.run(["debugfs", "-w", "-f", str(cmds), str(rootfs)], check=True, capture_output=True)
    listing = subprocess.run(["debugfs", "-R", f"cat {build.VENV}/bin/appliance", str(rootfs)], capture_output=True,
                             text=True).stdout
    if "broken on purpose" not in listing:
        raise Failed("could not break the appliance in the test's root file system")


def stick(work: Path, name: str, files: dict[str, Path]) -> Path:
    """A USB stick's file system (ext4, label APPUPDATE) holding ``files``."""
    tree = work / name
    tree.mkdir()
    for target, src in files.items():
        (tree / target).parent.mkdir(parents=True, exist_ok=True)
        os.link(src, tree / target)
    mib = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file()) // (1 << 20) + 64
    img = work / f"{name}.img"
    subprocess.run(["mkfs.ext4", "-q", "-L", "APPUPDATE", "-d", str(tree), str(img), f"{mib}M"], check=True,
                   stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    return img


def study_back(guest: Guest, console, port: int, folder: Path, study_uid: str, n: int, pipeline: str,
               name: str) -> dict:
    """Send ``folder`` into the guest; wait for the study's ``n`` derived instances (made by ``pipeline``)
    at the host's console."""
    t = guest.elapsed()
    send(folder, port)
    sent = guest.elapsed()
    files = wait_for(f"the {name} study's derived series",
                     lambda: derived_series(console.out, study_uid, n, pipeline), guest, 600, 2.0)
    back = guest.elapsed() - sent
    print(f"{name}: {n} instances sent in {sent - t:.1f} s, the {pipeline} series back {back:.1f} s later", flush=True)
    import pydicom

    made_by = sorted({str(pydicom.dcmread(f, stop_before_pixels=True).DerivationDescription) for f in files})
    return {"sent_at_s": t, "sent_s": sent - t, "derived_series_back_s": back, "instances": n,
            "derivation": made_by}


def ct_back(guest: Guest, console, port: int, work: Path, name: str, seed: int) -> dict:
    ct = write_ct(work / name, seed)
    return study_back(guest, console, port, work / name, ct.study_uid, CT_SHAPE[0], "denoise", name)


def write_ct(folder: Path, seed: int):
    from appliance.synth.study import write_synthetic_ct

    return write_synthetic_ct(folder, shape_zyx=CT_SHAPE, dose_fraction=0.25, seed=seed)


MODEL_VERSION = "2.0.0-boot"  # the boot test's model: the reference card with a network that returns its input


def model_stick(guest: Guest, console, port: int, work: Path, result: dict) -> None:
    """A field engineer installs a model without a firmware update: a stick with a signed model card
    (models/*.toml, its ONNX file and signature beside it). The running appliance denoises the next
    study with it, and says so in DerivationDescription; no reboot."""
    import numpy as np

    from appliance.config import AssemblyConfig
    from appliance.dicom.assemble import assemble_series
    from engines.train.identity import write_identity_model

    card = write_identity_model(work / "model", MODEL_VERSION)
    onnx = card.with_suffix(".onnx")
    sig = card.with_name(card.name + ".sig")
    subprocess.run(["openssl", "cms", "-sign", "-binary", "-outform", "DER", "-in", str(card), "-signer",
                    str(bundle.CERT), "-inkey", str(bundle.KEY), "-out", str(sig)], check=True, capture_output=True)
    (work / "collect-diagnostics").write_text("")
    img = stick(work, "stick-model", {**{f"models/{p.name}": p for p in (card, onnx, sig)},
                                      "collect-diagnostics": work / "collect-diagnostics"})
    n = len(guest.events())
    t = guest.elapsed()
    guest.plug("stick-model", img, bus="xhci3.0", writable=True)
    _, diag = guest.wait_event("diagnostics", 600, after=n)
    diag_s = guest.elapsed() - t
    guest.wait_event("model-activated", 600, after=n, version=MODEL_VERSION)
    activated = guest.elapsed() - t
    print(f"model: {card.stem} installed and active {activated:.0f} s after its stick was plugged in", flush=True)
    ct = write_ct(work / "ct-model", 9)
    back = study_back(guest, console, port, work / "ct-model", ct.study_uid, CT_SHAPE[0],
                      f"reference-redcnn-{MODEL_VERSION}", "ct-model")
    (vol,) = assemble_series(derived_series(console.out, ct.study_uid, CT_SHAPE[0], "denoise"),
                             AssemblyConfig()).volumes
    worst = float(np.abs(vol.voxels[::-1] - ct.hu).max())
    if worst > 1.0:  # the model returns its input: anything else is not the model the stick carried
        raise Failed(f"the study denoised with {MODEL_VERSION} differs from its input by up to {worst:.1f} HU")
    guest.unplug("stick-model")
    result["model"] = {"version": MODEL_VERSION, "active_s": activated, "study": back, "max_abs_diff_hu": worst}
    result["diagnostics"] = {"written_s": diag_s, **check_diagnostics(img, work)}


def check_diagnostics(img: Path, work: Path) -> dict:
    """The diagnostic bundle the guest wrote onto the stick: logs, state and versions are in it, and
    none of the patient names, IDs or UIDs of the studies sent so far."""
    import tarfile

    import pydicom

    listing = subprocess.run(["debugfs", "-R", "ls /", str(img)], capture_output=True, text=True).stdout
    names = [w for w in listing.split() if w.startswith("appliance-diag-") and w.endswith(".tar.gz")]
    if len(names) != 1:
        raise Failed(f"expected one diagnostic bundle on the stick, found {names}: {listing[-400:]}")
    local = work / names[0]
    subprocess.run(["debugfs", "-R", f"dump /{names[0]} {local}", str(img)], check=True, capture_output=True)
    with tarfile.open(local) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode("utf-8", "replace")
                 for m in tar.getmembers() if m.isfile()}
    secrets = set()
    for f in [*work.glob("ct/**/*.dcm"), *work.glob("ctpd/**/*.dcm"), *work.glob("console/**/*")]:
        if f.is_file():
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception:
                continue
            secrets |= {str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                                     "PatientID", "PatientName")}
    secrets.discard("")
    everything = "\n".join(files.values())
    leaked = sorted(s for s in secrets if s in everything)
    journal = files.get("logs/journal.log", "")
    system = json.loads(files.get("system.json", "{}"))
    spool_bytes = (system.get("disk") or {}).get("total_bytes") or 0
    if spool_bytes < (1 + DISK_EXTRA_GIB * 0.9) * (1 << 30):
        raise Failed(f"the data partition did not grow onto the larger disk: the spool's file system has "
                     f"{spool_bytes} bytes (image 1 GiB + {DISK_EXTRA_GIB} GiB of disk)")
    if leaked or not journal.strip() or system.get("booted_slot") != "a" or "image-build.json" not in files:
        raise Failed(f"diagnostic bundle {names[0]}: leaked {leaked[:5]}, journal lines {len(journal.splitlines())}, "
                     f"booted slot {system.get('booted_slot')}, files {sorted(files)}")
    print(f"diagnostics: {names[0]} ({local.stat().st_size} bytes, {len(journal.splitlines())} journal lines), "
          f"none of {len(secrets)} patient values and UIDs in it", flush=True)
    print(f"data partition: the spool's file system has {spool_bytes / (1 << 30):.2f} GiB on a disk "
          f"{DISK_EXTRA_GIB} GiB larger than the image", flush=True)
    return {"bundle": names[0], "bytes": local.stat().st_size, "files": sorted(files), "spool_fs_bytes": spool_bytes,
            "journal_lines": len(journal.splitlines()), "patient_values_and_uids_checked": len(secrets)}


def updates(guest: Guest, console, port: int, image: Path, manifest: dict, work: Path, result: dict) -> None:
    """Update to a bundle that works (refusing a stranger's first), then to one whose appliance cannot
    start: the box must come back on the slot it came from, configuration and spool intact."""
    good = image.parent / "appliance-update.raucb"
    if not good.exists():
        raise Failed(f"{good} is missing: make image builds it")
    rootfs = root_slot(image, manifest, work)
    t = time.monotonic()
    stranger = bundle.make(rootfs, work / "stranger.raucb", f"{manifest['git']}-stranger",
                           cert=bundle.KEYS / "other.cert.pem", key=bundle.KEYS / "other.key.pem")
    break_appliance(rootfs, work)
    broken = bundle.make(rootfs, work / "broken.raucb", f"{manifest['git']}-broken")
    rootfs.unlink()
    verifies, _ = bundle.verify(good)
    stranger_ok, stranger_why = bundle.verify(stranger)
    result["keyring"] = {"update_verifies": verifies, "stranger_refused": not stranger_ok,
                         "stranger_reason": stranger_why.splitlines()[-1:] if stranger_why else None,
                         "bundles_made_s": round(time.monotonic() - t, 1)}
    if not verifies or stranger_ok:
        raise Failed(f"keyring check on the host: update verifies {verifies}, stranger's bundle verifies {stranger_ok}")
    stick1 = stick(work, "stick1", {"1-stranger.raucb": stranger, "2-update.raucb": good})
    stick2 = stick(work, "stick2", {"update-broken.raucb": broken})

    # A working update: the stranger's bundle is refused, ours installs into B, B boots on trial and is committed.
    n = len(guest.events())
    t = guest.elapsed()
    guest.plug("stick1", stick1)
    guest.wait_event("refused", 600, after=n, bundle="1-stranger.raucb")
    _, inst = guest.wait_event("installed", 900, after=n, bundle="2-update.raucb")
    installed_s = guest.elapsed()
    i, boot = guest.wait_event("boot", 600, after=n, slot="b")
    if not boot["trial"]:
        raise Failed(f"slot B booted but not as a trial: {boot}")
    guest.wait_event("healthy", 400, after=i, slot="b")
    healthy_s = guest.elapsed()
    wait_for("C-ECHO on slot B", lambda: echo(port), guest, 120, 2.0)
    result["update"] = {"into": inst["slot"], "installed_s": installed_s - t, "healthy_on_new_slot_s": healthy_s - t,
                        "spool_at_boot": boot["spool"]}
    print(f"update: installed into slot {inst['slot']} {installed_s - t:.0f} s after the stick was plugged in, "
          f"slot B healthy and committed {healthy_s - t:.0f} s after", flush=True)
    result["update"]["study"] = ct_back(guest, console, port, work, "ct-on-b", 11)
    guest.unplug("stick1")

    # A broken update: installed into A, A boots on trial, its appliance never starts, the box rolls back to B.
    n = len(guest.events())
    t = guest.elapsed()
    guest.plug("stick2", stick2, bus="xhci2.0")  # another port: the first stick's was hot-unplugged
    _, inst = guest.wait_event("installed", 900, after=n, bundle="update-broken.raucb")
    i, boot = guest.wait_event("boot", 900, after=n, slot="a")
    if not boot["trial"]:
        raise Failed(f"slot A booted with the broken update but not as a trial: {boot}")
    i, rollback = guest.wait_event("rollback", 600, after=i, slot="a")
    i, back = guest.wait_event("boot", 600, after=i, slot="b")
    guest.wait_event("healthy", 400, after=i, slot="b")
    wait_for("C-ECHO after the rollback", lambda: echo(port), guest, 120, 2.0)
    back_s = guest.elapsed()
    # The broken slot never ran an appliance: the spool it booted with is the spool the box comes back to.
    before, after = boot["spool"], back["spool"]
    if after["index_bytes"] is None or after["files"] < before["files"]:
        raise Failed(f"the spool changed across the rollback: {before} -> {after}")
    result["rollback"] = {"installed_into": inst["slot"], "rolled_back_s": back_s - t, "reason": rollback["reason"],
                          "back_on": back["slot"], "committed_after": back["committed"], "spool_before": before,
                          "spool_after": after}
    print(f"rollback: broken update installed into slot {inst['slot']}, back on slot {back['slot']} and answering "
          f"{back_s - t:.0f} s after the stick was plugged in; spool {before} -> {after}", flush=True)
    result["rollback"]["study"] = ct_back(guest, console, port, work, "ct-after-rollback", 12)
    guest.unplug("stick2")
    result["audit"] = [e for e in guest.events() if e.get("event") != "skip"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", type=Path, default=REPO / "build" / "image" / "appliance.img")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "image" / "boot-test")
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=os.environ.get("APPLIANCE_BOOT_ACCEL", "auto"))
    ap.add_argument("--timeout", type=float, default=420.0, help="seconds to the first C-ECHO answer")
    ap.add_argument("--no-update", action="store_true", help="only boot and process studies; no update/rollback")
    args = ap.parse_args()
    image = args.image.resolve()
    manifest = json.loads((image.parent / "manifest.json").read_text())
    work = args.out.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    from appliance.synth.projections import write_synthetic_projections
    from bench.ingest import DcmtkStoreSCP

    result: dict = {"image_sha256": manifest["sha256"], "git": manifest["git"]}
    guest = None
    try:
        with DcmtkStoreSCP(work, name="console", ae_title="CONSOLE", by_study=True) as console:
            disk = site_disk(image, manifest, work, console.port)
            port = free_port()
            arch = manifest.get("architecture", "amd64")
            accel = args.accel
            if accel == "auto":  # KVM runs only the build machine's own architecture
                accel = "kvm" if arch == "amd64" and kvm_runs(disk, work, port) else "tcg"
            result["accel"], result["architecture"] = accel, arch
            print(f"booting {image.name} ({arch}) under {accel.upper()}; DICOM on 127.0.0.1:{port}", flush=True)
            guest = Guest(disk, work, port, accel, arch)
            result["first_console_output_s"] = wait_for("console output", lambda: guest.console().strip() and guest.elapsed(),
                                                        guest, 120, 0.2)
            result["first_echo_s"] = wait_for("the first C-ECHO answer", lambda: echo(port) and guest.elapsed(), guest,
                                              args.timeout, 2.0)
            print(f"C-ECHO answered {result['first_echo_s']:.0f} s after qemu started", flush=True)

            result["denoise"] = ct_back(guest, console, port, work, "ct", 7)
            pd = write_synthetic_projections(work / "ctpd", shape_zyx=PD_SHAPE, dose_fraction=0.25, n_views=120,
                                             seed=8)
            result["recon"] = study_back(guest, console, port, work / "ctpd", pd.study_uid, PD_SHAPE[0], "recon",
                                         "ctpd")
            model_stick(guest, console, port, work, result)
            if not args.no_update:
                updates(guest, console, port, image, manifest, work, result)
        result["power_cycles_after_a_hung_reboot"] = getattr(guest, "power_cycles", 0)
        result["passed"] = True
        return 0
    except Failed as exc:
        result["passed"], result["failure"] = False, str(exc)[:4000]
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if guest is not None:
            guest.stop()
        for big in ("disk.img", "stick1.img", "stick2.img", "stick-model.img", "stranger.raucb", "broken.raucb", "rootfs.ext4"):
            (work / big).unlink(missing_ok=True)
        (work / "boot-test.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k not in ("failure", "audit")}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
