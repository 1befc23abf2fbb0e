"""The engine cache: serialised TensorRT engines on disk, one per (model, TensorRT, GPU, precision, shapes, io).

An engine is only valid for the TensorRT flavour and version that built it, the GPU's compute capability,
the precision it was built at and the optimisation profile (../shared/TRAPS.md), so all of these go into
the key, and so does its I/O: ``io = "network"`` maps the network's normalised input to its output, ``"hu"``
embeds the card's HU arithmetic as plugins and maps HU to HU (engines.hu_io); the two are not
interchangeable. Each engine ``<key>.engine`` has a JSON sidecar ``<key>.json`` holding everything in the key plus
the build time; the sidecar is written last, so an engine without one is an interrupted write and counts as
a miss. Writes are atomic (temporary file, fsync, rename): a crash or a second process building the same
engine never leaves a torn file behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance.logging import get_logger

log = get_logger(__name__)

KEY_FIELDS = ("onnx_sha256", "flavour", "trt_version", "compute_capability", "precision", "profile")
IO_MODES = ("network", "hu")
_SCHEMA = 2  # bump when the key's meaning changes: old engines then miss instead of loading wrongly (2: io)


def normalize_compute_capability(cc: str | tuple[int, int]) -> str:
    """'8.9', 'sm_89', 'SM89', '89' or (8, 9) -> '8.9'."""
    if isinstance(cc, tuple):
        return f"{int(cc[0])}.{int(cc[1])}"
    text = str(cc).strip().lower().removeprefix("sm_").removeprefix("sm")
    if "." in text:
        major, _, minor = text.partition(".")
    else:
        major, minor = text[:-1], text[-1:]
    if not (major.isdigit() and minor.isdigit()):
        raise ValueError(f"not a compute capability: {cc!r} (expected e.g. '8.9' or 'sm_89')")
    return f"{int(major)}.{int(minor)}"


def _profile_dict(profile: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(profile) and not isinstance(profile, type):
        return json.loads(json.dumps(dataclasses.asdict(profile)))  # tuples -> lists, as in the sidecar
    if isinstance(profile, Mapping):
        return json.loads(json.dumps(dict(profile)))
    raise TypeError(f"profile must be a dataclass or a mapping, not {type(profile).__name__}")


def key_fields(
    onnx_sha256: str, flavour: str, trt_version: str, compute_capability: str, precision: str, profile: Any,
    io: str = "network",
) -> dict[str, Any]:
    """The key's fields in canonical form (what the sidecar records)."""
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be 'fp16' or 'fp32', not {precision!r}")
    if io not in IO_MODES:
        raise ValueError(f"io must be one of {IO_MODES}, not {io!r}")
    return {
        "onnx_sha256": onnx_sha256.lower(),
        "flavour": flavour,
        "trt_version": str(trt_version),
        "compute_capability": normalize_compute_capability(compute_capability),
        "precision": precision,
        "profile": _profile_dict(profile),
        "io": io,
    }


def cache_key(
    onnx_sha256: str, flavour: str, trt_version: str, compute_capability: str, precision: str, profile: Any,
    io: str = "network",
) -> str:
    """A stable 32-hex-digit key: the same inputs give the same key in any process, on any machine.
    ``io`` defaults to "network" (an engine without embedded HU plugins)."""
    fields = key_fields(onnx_sha256, flavour, trt_version, compute_capability, precision, profile, io)
    canonical = json.dumps({"schema": _SCHEMA, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """``data`` into ``path`` durably and atomically; ``mode``: the file's permissions (mkstemp's
    are 0600), set before the rename so that no reader ever sees other ones."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            if mode is not None:
                os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


class EngineCache:
    """Engines under ``root`` (created on first write)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def path_for(self, key: str) -> Path:
        if not (len(key) == 32 and all(c in "0123456789abcdef" for c in key)):
            raise ValueError(f"not an engine cache key: {key!r}")
        return self.root / f"{key}.engine"

    def _sidecar(self, key: str) -> Path:
        return self.path_for(key).with_suffix(".json")

    def meta(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._sidecar(key).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def get(self, key: str) -> bytes | None:
        """The engine, or None when absent, interrupted or corrupt (a corrupt one is removed)."""
        meta = self.meta(key)
        if meta is None:
            return None
        try:
            data = self.path_for(key).read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != meta.get("engine_sha256"):
            log.warning("engine_cache_corrupt", key=key, path=str(self.path_for(key)))
            self.remove(key)
            return None
        return data

    def put(self, key: str, engine_bytes: bytes, meta: Mapping[str, Any]) -> Path:
        """Store an engine. ``meta`` must hold every key field (checked against ``key``; ``io`` may be left
        out for "network") and may add more (``build_seconds``, ``onnx_path``...); size, checksum and creation
        time are added here."""
        missing = [f for f in KEY_FIELDS if f not in meta]
        if missing:
            raise ValueError(f"engine meta lacks key field(s) {missing}")
        fields = key_fields(**{f: meta[f] for f in KEY_FIELDS}, io=meta.get("io", "network"))
        if cache_key(**fields) != key:
            raise ValueError(f"engine meta does not match key {key}: {fields}")
        data = bytes(engine_bytes)
        if not data:
            raise ValueError("refusing to cache an empty engine")
        sidecar = {
            **dict(meta),
            **fields,
            "key": key,
            "engine_file": self.path_for(key).name,
            "engine_bytes": len(data),
            "engine_sha256": hashlib.sha256(data).hexdigest(),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path_for(key), data)
        atomic_write(self._sidecar(key), (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())
        log.info("engine_cached", key=key, bytes=len(data), flavour=fields["flavour"],
                 compute_capability=fields["compute_capability"], precision=fields["precision"])
        return self.path_for(key)

    def list(self) -> list[dict[str, Any]]:
        """The sidecars of complete entries, oldest first."""
        if not self.root.is_dir():
            return []
        entries = []
        for sidecar in self.root.glob("*.json"):
            try:
                meta = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if sidecar.with_suffix(".engine").exists():
                entries.append(meta)
        return sorted(entries, key=lambda m: (m.get("created_utc", ""), m.get("key", "")))

    def remove(self, key: str) -> None:
        """Forget an engine (sidecar first, so a crash in between leaves a miss, not a half entry)."""
        for path in (self._sidecar(key), self.path_for(key), self.path_for(key).with_suffix(".rtcache")):
            path.unlink(missing_ok=True)
