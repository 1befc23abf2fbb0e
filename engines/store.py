"""The model store: denoiser models installed, activated and rolled back on a running box.

A model is a card plus its ONNX file (`engines.card`). The appliance ships its models inside the
package (``engines/models``, "packaged"); a field engineer or a vendor's remote service installs
newer ones into the store, which lives beside the spool on the data partition, so firmware updates
never touch it::

    <store>/<name>/<version>/card.toml      the card's bytes, as signed
    <store>/<name>/<version>/card.sig       its detached CMS signature, when it came with one
    <store>/<name>/<version>/<onnx>         the file the card names (its sha256 is in the card)
    <store>/<name>/<version>/installed.json who installed it, when, the hashes, the signer
    <store>/<name>/state.json               {"active": version or null (the packaged model), "history": [...]}
    <store>/audit.jsonl                     one line per install, activation, rollback and refusal

Versions sit side by side; nothing installed is ever overwritten (a second install of a version
with other bytes is refused). ``activate`` and ``rollback`` change only ``state.json``, atomically;
the daemon looks the active version up when it starts a job (`resolve`) and loads a changed model
then, so a series is never denoised half by one version and half by another.

Integrity: the card's sha256 of its ONNX file is checked at install and at every load. Authenticity:
with a keyring (``[models] keyring``, X.509 CA certificates in PEM) a model installs only with a
detached CMS signature of its card (``openssl cms -sign -binary -outform DER``) that verifies
against it; the card holds the ONNX hash, so the signature covers both. Verified with the openssl
command, the same trust model as the firmware bundles (RAUC).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from engines.cache import atomic_write
from engines.card import CardError, file_sha256, load_card

PACKAGED_DIR = Path(__file__).resolve().parent / "models"
CARD_FILE = "card.toml"
SIGNATURE_FILE = "card.sig"
PACKAGED = "packaged"  # the version name of a model that came with the firmware
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class StoreError(Exception):
    """An install, activation or rollback that cannot be done; the message says why."""


@dataclass(frozen=True)
class Resolved:
    """Where the model a configuration names is now: its card, and where that came from."""

    card: Path
    origin: str  # "store", "packaged" or "file"
    version: str | None = None  # the store version, for origin "store"


@dataclass(frozen=True)
class ModelRow:
    name: str
    version: str
    origin: str
    active: bool
    sha256: str
    installed_at: str | None
    installed_by: str | None
    signer: str | None


def is_name(spec: str) -> bool:
    """True when ``[denoise] model`` names a model (else it is the path of a card)."""
    return bool(_SAFE.match(spec)) and not spec.endswith(".toml")


def _check_safe(what: str, value: str) -> None:
    if not _SAFE.match(value) or value in (".", "..") or value == PACKAGED:
        raise StoreError(f"{what} {value!r}: letters, digits and . _ + - only (up to 64, not {PACKAGED!r}), "
                         "so it can name a folder")


def _appliance_version() -> str:
    from appliance import __version__

    return __version__


def _actor() -> str:
    who = os.environ.get("SUDO_USER") or getpass.getuser()
    return f"{who} (uid {os.getuid()})"


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def verify_signature(card: Path, signature: Path, keyring: Path) -> str:
    """Verify the detached CMS signature of ``card`` against the CA certificates in ``keyring``;
    returns the signer's subject. Raises StoreError with openssl's reason."""
    if not keyring.is_file():
        raise StoreError(f"keyring {keyring} is not a file")
    if not signature.is_file():
        raise StoreError(f"no signature {signature}: with a keyring configured a model must be signed "
                         f"(openssl cms -sign -binary -outform DER -in {card.name} -signer CERT -inkey KEY "
                         f"-out {card.name}.sig)")
    with tempfile.TemporaryDirectory() as tmp:
        signer = Path(tmp) / "signer.pem"
        run = subprocess.run(
            ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(signature), "-content", str(card),
             "-CAfile", str(keyring), "-purpose", "any", "-signer", str(signer), "-out", os.devnull],
            capture_output=True, text=True)
        if run.returncode != 0:
            why = " ".join(line.strip() for line in run.stderr.splitlines() if line.strip())[:400]
            raise StoreError(f"signature {signature.name} does not verify against {keyring}: {why}")
        subject = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in", str(signer)],
                                 capture_output=True, text=True)
    return subject.stdout.strip().removeprefix("subject=").strip() or "(unknown signer)"


class ModelStore:
    def __init__(self, root: Path, keyring: Path | None = None, packaged: Path = PACKAGED_DIR,
                 reserve_bytes: int = 0) -> None:
        self.root = Path(root)
        self.keyring = keyring
        self.packaged = packaged
        self.reserve_bytes = reserve_bytes  # free space the spool keeps (limits.free_space_reserve_bytes)

    # ---- reading ---------------------------------------------------------------------------
    def _state(self, name: str) -> dict:
        path = self.root / name / "state.json"
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"active": None, "history": []}
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: unreadable ({exc}); fix or remove it") from exc
        return {"active": state.get("active"), "history": list(state.get("history", []))}

    def _version_dir(self, name: str, version: str) -> Path:
        return self.root / name / version

    def packaged_card(self, name: str) -> Path | None:
        path = self.packaged / f"{name}.toml"
        return path if path.is_file() else None

    def versions(self, name: str) -> list[str]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if (p / CARD_FILE).is_file())

    def names(self) -> list[str]:
        found = {p.stem for p in self.packaged.glob("*.toml")} if self.packaged.is_dir() else set()
        if self.root.is_dir():
            found |= {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        return sorted(found)

    def resolve(self, spec: str | Path) -> Resolved:
        """The card ``[denoise] model`` means now: a name gives its active store version, or the
        packaged model of that name when none is active; anything else is the path of a card."""
        spec = str(spec)
        if not is_name(spec):
            return Resolved(Path(spec), "file")
        active = self._state(spec)["active"] if (self.root / spec).is_dir() else None
        if active is not None:
            card = self._version_dir(spec, active) / CARD_FILE
            if not card.is_file():
                raise StoreError(f"model {spec}: the active version {active} is not in {self.root / spec}")
            return Resolved(card, "store", active)
        packaged = self.packaged_card(spec)
        if packaged is None:
            raise StoreError(f"no model named {spec!r}: none installed in {self.root} and none packaged "
                             f"(packaged: {', '.join(p.stem for p in sorted(self.packaged.glob('*.toml'))) or 'none'})")
        return Resolved(packaged, "packaged")

    def rows(self) -> list[ModelRow]:
        out = []
        for name in self.names():
            active = self._state(name)["active"] if (self.root / name).is_dir() else None
            packaged = self.packaged_card(name)
            if packaged is not None:
                try:
                    card, _ = load_card(packaged)
                    sha = card.sha256
                except CardError:
                    sha = "(invalid)"
                out.append(ModelRow(name, PACKAGED, "packaged", active is None, sha, None, None, None))
            for version in self.versions(name):
                info = self._installed(name, version)
                out.append(ModelRow(name, version, "store", active == version, info.get("onnx_sha256", "?"),
                                    info.get("installed_at"), info.get("installed_by"), info.get("signer")))
        return out

    def _installed(self, name: str, version: str) -> dict:
        try:
            return json.loads((self._version_dir(name, version) / "installed.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    # ---- audit -----------------------------------------------------------------------------
    def audit(self, action: str, **fields) -> None:
        """One JSON line in ``<store>/audit.jsonl`` (append-only, fsynced)."""
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": _utc_now(), "action": action, "actor": fields.pop("actor", None) or _actor(),
                           **fields}, sort_keys=True)
        path = self.root / "audit.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self._own(path)

    def audit_lines(self) -> list[dict]:
        try:
            text = (self.root / "audit.jsonl").read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _own(self, path: Path) -> None:
        """Run as root (a field engineer with sudo): give what is written the store owner's ids, so
        the daemon's user can read and append to it."""
        if os.geteuid() != 0:
            return
        owner = (self.root.parent if self.root.parent.exists() else self.root).stat()
        os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)

    # ---- changing --------------------------------------------------------------------------
    def install(self, card_path: Path, signature: Path | None = None, activate: bool = False) -> ModelRow:
        """Copy a card and its ONNX file into the store as a new version, after checking the hash,
        the signature (required with a keyring) and one test batch on the CPU runtime."""
        from engines.manage import verify

        card_path = Path(card_path)
        try:
            card, onnx_path = load_card(card_path)
            _check_safe("model name", card.name)
            _check_safe("version", card.version)
            recorded = f"appliance denoise {_appliance_version()}+{card.name}-{card.version}"
            if len(recorded) > 64:
                raise StoreError(f"name and version too long: every derived series records {recorded!r} in "
                                 "DerivationDescription (LO, at most 64 characters)")
            if Path(card.onnx).name != card.onnx or card.onnx in (CARD_FILE, SIGNATURE_FILE, "installed.json"):
                raise StoreError(f"the card names its ONNX file {card.onnx!r}: an installable card names a file "
                                 f"beside it (not {CARD_FILE}, {SIGNATURE_FILE} or installed.json)")
            beside = card_path.with_name(card_path.name + ".sig")
            if signature is None and beside.is_file():
                signature = beside
            signer = None
            if self.keyring is not None:
                signer = verify_signature(card_path, signature or beside, self.keyring)
            target = self._version_dir(card.name, card.version)
            if target.exists():
                have = self._installed(card.name, card.version)
                if have.get("card_sha256") == file_sha256(card_path) and have.get("onnx_sha256") == card.sha256:
                    raise StoreError(f"{card.name} {card.version} is already installed (same bytes)")
                raise StoreError(f"{card.name} {card.version} is already installed with other bytes: an installed "
                                 "version is never replaced; give the new model a new version")
            (self.root / card.name).mkdir(parents=True, exist_ok=True)
            need = onnx_path.stat().st_size + card_path.stat().st_size
            st = os.statvfs(self.root)
            if need > st.f_bavail * st.f_frsize - self.reserve_bytes:
                raise StoreError(f"not enough space in {self.root} for {need} bytes: the model would eat into the "
                                 f"{self.reserve_bytes} bytes the spool keeps free (limits.free_space_reserve_bytes)")
            self._own(self.root)
            self._own(self.root / card.name)
            staging = Path(tempfile.mkdtemp(dir=self.root / card.name, prefix=".install-"))
            try:
                shutil.copyfile(card_path, staging / CARD_FILE)
                shutil.copyfile(onnx_path, staging / card.onnx)
                if signature is not None and signature.is_file():
                    shutil.copyfile(signature, staging / SIGNATURE_FILE)
                # The copies are what will be loaded: check those, not the originals.
                staged, _ = load_card(staging / CARD_FILE)
                if staged != card:
                    raise StoreError(f"{card_path} changed while it was being installed")
                summary = verify(staging / CARD_FILE)
                info = {"name": card.name, "version": card.version, "card_sha256": file_sha256(staging / CARD_FILE),
                        "onnx": card.onnx, "onnx_sha256": card.sha256, "installed_at": _utc_now(),
                        "installed_by": _actor(), "source": str(card_path.resolve()),
                        "signer": signer, "signature_checked": signer is not None,
                        "clinical_use": card.clinical_use, "verify": summary}
                (staging / "installed.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n",
                                                        encoding="utf-8")
                for path in staging.iterdir():
                    os.chmod(path, 0o644)
                    with open(path, "rb") as f:
                        os.fsync(f.fileno())
                    self._own(path)
                os.chmod(staging, 0o755)
                self._own(staging)
                os.rename(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            from appliance.fsutil import fsync_dir

            fsync_dir(target.parent)
        except (StoreError, CardError) as exc:
            self.audit("model.install_refused", source=str(card_path), reason=str(exc))
            raise StoreError(str(exc)) from exc
        self.audit("model.installed", model=card.name, version=card.version, onnx_sha256=card.sha256,
                   card_sha256=info["card_sha256"], signer=signer, source=str(card_path.resolve()))
        if activate:
            self.activate(card.name, card.version)
        return next(r for r in self.rows() if r.name == card.name and r.version == card.version)

    def _set_state(self, name: str, state: dict) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        path = self.root / name / "state.json"
        atomic_write(path, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode("utf-8"), mode=0o644)
        self._own(path)

    def activate(self, name: str, version: str) -> tuple[str, str]:
        """Make ``version`` (or "packaged") the active one; returns (previous, new)."""
        state = self._state(name)
        previous = state["active"] or PACKAGED
        if version == PACKAGED:
            if self.packaged_card(name) is None:
                raise StoreError(f"no packaged model named {name!r}")
            new = None
        else:
            card = self._version_dir(name, version) / CARD_FILE
            if not card.is_file():
                raise StoreError(f"{name} {version} is not installed (installed: "
                                 f"{', '.join(self.versions(name)) or 'none'})")
            try:
                load_card(card)  # the hash again: a file changed since the install is refused now
            except CardError as exc:
                self.audit("model.activate_refused", model=name, version=version, reason=str(exc))
                raise StoreError(str(exc)) from exc
            new = version
        if new == state["active"]:
            raise StoreError(f"{name} {version} is already the active version")
        history = [*state["history"], state["active"]][-20:]
        self._set_state(name, {"active": new, "history": history})
        self.audit("model.activated", model=name, version=new or PACKAGED, previous=previous)
        return previous, new or PACKAGED

    def rollback(self, name: str) -> tuple[str, str]:
        """Back to the version that was active before the current one; returns (from, to)."""
        state = self._state(name)
        if not state["history"]:
            raise StoreError(f"{name}: nothing to roll back to (no earlier activation)")
        back = state["history"][-1]
        if back is not None:
            card = self._version_dir(name, back) / CARD_FILE
            if not card.is_file():
                raise StoreError(f"{name}: the previous version {back} is no longer installed")
            try:
                load_card(card)
            except CardError as exc:
                raise StoreError(str(exc)) from exc
        current = state["active"] or PACKAGED
        self._set_state(name, {"active": back, "history": state["history"][:-1]})
        self.audit("model.rolled_back", model=name, version=back or PACKAGED, previous=current)
        return current, back or PACKAGED
