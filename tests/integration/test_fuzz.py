"""A bounded fuzz test (issue 14 item 6), against the running daemon on its default limits:
1,000+ malformed C-STOREs (`tests.malformed`, all carrying the SOP Instance UID of an instance
already stored) and a few hundred raw PDUs (mutated, cut, oversized, garbage) while a C-ECHO is
sent every half second. Nothing malformed is stored or replaces the valid instance, the deflate
bomb does not grow the receiver's memory, and every C-ECHO is answered."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (CTImageStorage, DeflatedExplicitVRLittleEndian, EnhancedCTImageStorage,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless)
from pynetdicom import AE

from appliance.daemon import Daemon
from appliance.synth.series import axial_geometry
from tests.helpers import ramp_volume, write_series
from tests.integration.test_admission import association_request
from tests.malformed import corpus, part10

pytestmark = pytest.mark.integration

_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless]


class _Echoes(threading.Thread):
    """C-ECHO every half second until stopped; the failures and the slowest answer."""

    def __init__(self, port: int) -> None:
        """From 127.0.0.2: a sender beside the fuzzer (which gets its own address's share of
        connections, `max_connections_per_source`)."""
        super().__init__(daemon=True)
        self.port, self.stop, self.failures, self.count, self.slowest = port, threading.Event(), [], 0, 0.0
        self.start()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            t = time.monotonic()
            try:
                status = _echo_from("127.0.0.2", self.port)
            except Exception as exc:  # noqa: BLE001 - any failure counts
                status = repr(exc)
            self.count += 1
            self.slowest = max(self.slowest, time.monotonic() - t)
            if status != 0:
                self.failures.append(status)


def _echo_from(source: str, port: int) -> int:
    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, bind_address=(source, 0))
    if not assoc.is_established:
        return -1
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else -2
    finally:
        assoc.release()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _receiver_pid(d: Daemon) -> int:
    proc = getattr(d.scp, "_proc", None)
    return proc.pid if proc is not None else __import__("os").getpid()


def _pdu_cases(rng: random.Random, n: int) -> list[bytes]:
    rq = association_request()
    cases = [b"", b"\x01", rq[:5], rq[:6], rq[:len(rq) // 2]]
    for _ in range(n):
        kind = rng.randrange(6)
        if kind == 0:  # the request with bytes flipped
            b = bytearray(rq)
            for _ in range(rng.randrange(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            cases.append(bytes(b))
        elif kind == 1:  # cut anywhere
            cases.append(rq[:rng.randrange(1, len(rq))])
        elif kind == 2:  # a lying length
            cases.append(rq[:2] + struct.pack(">L", rng.choice([0, 1, 7, len(rq), 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
                         + rq[6:])
        elif kind == 3:  # random bytes
            cases.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        elif kind == 4:  # another PDU type first
            t = rng.choice([0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x16, 0xFF])
            cases.append(struct.pack(">BBL", t, 0, 4) + b"\0\0\0\0")
        else:  # a whole request, then garbage where P-DATA belongs
            cases.append(rq + bytes(rng.randrange(256) for _ in range(rng.randrange(6, 64))))
    return cases


def _send_pdu(port: int, data: bytes) -> float:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(0.5)  # read what the appliance answers, then go (as a broken peer would)
            while s.recv(65536):
                pass
        except OSError:
            pass
    return time.monotonic() - start


def test_malformed_instances_and_pdus_change_nothing(tmp_path, cfg):
    cfg.routes = []  # ingest only: what is stored stays to be counted
    d = Daemon(cfg)
    d.start()
    echoes = None
    try:
        port = d.scp.port
        hu = ramp_volume((1, 32, 32))
        good = write_series(tmp_path / "good", hu, axial_geometry(hu.shape, 0.8, 2.0))[0]
        valid = pydicom.dcmread(good)
        ae = AE(ae_title="FUZZ")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port)
        assert int(assoc.send_c_store(good).Status) == 0
        assoc.release()

        cases = corpus(tmp_path / "corpus", n=1000, valid_uid=str(valid.SOPInstanceUID))
        assert len(cases) >= 1000
        rss_before = _peak_rss_kib(_receiver_pid(d))
        echoes = _Echoes(port)
        ae = AE(ae_title="FUZZ")
        for sop_class in (CTImageStorage, EnhancedCTImageStorage):
            for syntax in _SYNTAXES:
                ae.add_requested_context(sop_class, syntax)
        statuses: dict[str, int] = {}
        started = time.monotonic()
        assoc = None
        for k, case in enumerate(cases):
            if assoc is None or not assoc.is_established:
                assoc = ae.associate("127.0.0.1", port)
                assert assoc.is_established
            path = tmp_path / "case.dcm"
            path.write_bytes(part10(case))
            rsp = assoc.send_c_store(path)
            statuses[case.name] = int(rsp.Status) if "Status" in rsp else -1
        assoc.release()
        stores_s = time.monotonic() - started

        rng = random.Random(1)
        pdus = _pdu_cases(rng, 300)
        slowest_pdu = max(_send_pdu(port, data) for data in pdus)
        echoes.stop.set()
        echoes.join(15)

        accepted = [name for name, status in statuses.items() if status == 0]
        assert accepted == [], accepted[:20]
        assert set(statuses.values()) <= {0xA900, 0xC000}, set(statuses.values())
        # nothing malformed became a series member, the valid instance is still its only version
        assert [p.name for p in d.spool.instance_paths(str(valid.SeriesInstanceUID))] == \
            [p.name for p in d.spool.instance_paths(str(valid.SeriesInstanceUID))][:1]
        (stored,) = d.spool.instance_paths(str(valid.SeriesInstanceUID))
        kept = pydicom.dcmread(stored)
        assert kept.SOPInstanceUID == valid.SOPInstanceUID and kept.PixelData == valid.PixelData
        import sqlite3
        with sqlite3.connect(d.spool.db_path) as db:
            assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1
        assert len(d.spool.refused()) >= len(cases)
        assert not [p for p in d.spool.incoming.iterdir() if not p.name.startswith(".")]
        # the receiver answered throughout and its memory barely moved (the bomb inflates 256 MiB)
        assert echoes.failures == [] and echoes.count >= 5, (echoes.failures, echoes.count)
        assert echoes.slowest < 5.0
        assert slowest_pdu < 6.0  # request_timeout_s (4 s) at most, for a request cut short and left open
        growth_mib = (_peak_rss_kib(_receiver_pid(d)) - rss_before) / 1024
        assert growth_mib < 64, growth_mib
        print(f"\n{len(cases)} malformed C-STOREs in {stores_s:.1f} s, {len(pdus)} raw PDUs, "
              f"{echoes.count} C-ECHOs (slowest {echoes.slowest:.2f} s), receiver peak RSS +{growth_mib:.1f} MiB")
    finally:
        if echoes is not None:
            echoes.stop.set()
        d.stop(drain_timeout_s=5)
