"""C-ECHO and C-STORE SCU: ``appliance echo`` and ``appliance send``.

A folder is sent one association per series (associations are not shared between series or
threads); each association proposes exactly the (SOP class, transfer syntax) pairs its files use.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification

from appliance.logging import get_logger

log = get_logger(__name__)

MAX_CONTEXTS = 128  # an SCU may propose at most 128 presentation contexts

# Send files as their bytes on disk instead of decoding and re-encoding each dataset: faster, and
# the peer receives exactly what is in the file.
_config.STORE_SEND_CHUNKED_DATASET = True


def _nodelay(event: evt.Event) -> None:
    from appliance.dicom.scp import set_nodelay

    set_nodelay(event.assoc)


NODELAY = [(evt.EVT_CONN_OPEN, _nodelay)]


class SendError(Exception):
    pass


@dataclass
class SendReport:
    sent: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (file, status or reason)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # not DICOM
    series: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


def echo(host: str, port: int, calling_ae: str = "APPLIANCE_SCU", called_ae: str = "ANY-SCP", timeout_s: float = 10) -> int:
    """C-ECHO; returns the status (0 on success). Raises SendError when no association is made."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise SendError(f"no association with {called_ae}@{host}:{port} (rejected, aborted or unreachable)")
    try:
        status = assoc.send_c_echo()
        if not status:
            raise SendError("no C-ECHO response (timeout or aborted)")
        return int(status.Status)
    finally:
        assoc.release()


def _scan(folder: Path) -> tuple[dict[str, list[tuple[Path, str, str, int]]], list[tuple[Path, str]]]:
    """Files by series UID: (path, SOP class, transfer syntax, instance number); and skipped files."""
    by_series: dict[str, list[tuple[Path, str, str, int]]] = defaultdict(list)
    skipped = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            key = str(ds.SeriesInstanceUID)
            by_series[key].append(
                (path, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID), int(ds.get("InstanceNumber") or 0))
            )
        except Exception as exc:
            skipped.append((path, f"{type(exc).__name__}: {exc}"))
    return by_series, skipped


def send_folder(
    folder: Path,
    host: str,
    port: int,
    calling_ae: str = "APPLIANCE_SCU",
    called_ae: str = "ANY-SCP",
    timeout_s: float = 30,
) -> SendReport:
    """Send every DICOM file under ``folder``; one association per series."""
    by_series, skipped = _scan(Path(folder))
    report = SendReport(skipped=skipped)
    for series_uid, files in by_series.items():
        report.series += 1
        files.sort(key=lambda f: (f[3], f[0].name))
        contexts = sorted({(f[1], f[2]) for f in files})
        if len(contexts) > MAX_CONTEXTS:
            report.failed.extend((f[0], "too many SOP class/transfer syntax pairs in one series") for f in files)
            continue
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
        for sop_class, syntax in contexts:
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=NODELAY)
        if not assoc.is_established:
            report.failed.extend((f[0], "association refused or peer unreachable") for f in files)
            continue
        try:
            for path, *_ in files:
                if not assoc.is_established:
                    report.failed.append((path, "association lost"))
                    continue
                try:
                    status = assoc.send_c_store(path)
                except Exception as exc:
                    report.failed.append((path, f"{type(exc).__name__}: {exc}"))
                    continue
                code = int(status.Status) if status and "Status" in status else None
                if code is not None and (code == 0 or code & 0xF000 == 0xB000):  # success or warning
                    report.sent += 1
                else:
                    comment = str(status.get("ErrorComment", "")) if status else ""
                    report.failed.append((path, f"status 0x{code:04X} {comment}".strip() if code is not None else "no response"))
        finally:
            if assoc.is_established:
                assoc.release()
        log.info("scu.series_sent", series_uid=series_uid, instances=len(files))
    return report
