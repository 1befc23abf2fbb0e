"""Admission before negotiation (issue 14 item 1), against the running daemon: half-open
connections, strangers and oversized PDUs never keep an allowed sender out."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from appliance.daemon import Daemon
from appliance.dicom.scu import echo
from tests.helpers import free_port


@pytest.fixture
def daemon(cfg):
    cfg.routes = []
    d = Daemon(cfg)
    d.start()
    yield d
    d.stop(drain_timeout_s=5)


def association_request(calling: str = "GOODSCU", called: str = "APPLIANCE") -> bytes:
    """The A-ASSOCIATE-RQ pynetdicom sends (captured from a listening socket)."""
    port = free_port()
    got = bytearray()
    with socket.create_server(("127.0.0.1", port)) as srv:
        def capture():
            conn, _ = srv.accept()
            with conn:
                while len(got) < 6 or len(got) < 6 + struct.unpack_from(">L", got, 2)[0]:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    got.extend(chunk)
        t = threading.Thread(target=capture)
        t.start()
        ae = AE(ae_title=calling)
        ae.acse_timeout = 0.5
        ae.add_requested_context(Verification)
        ae.associate("127.0.0.1", port, ae_title=called)
        t.join(5)
    return bytes(got)


def _echo_within(port: int, seconds: float, source: str = "127.0.0.1", aet: str = "GOODSCU") -> float:
    """Seconds until a C-ECHO from ``source`` succeeds (retrying as a sender would)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        ae = AE(ae_title=aet)
        ae.acse_timeout = ae.network_timeout = 2
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, bind_address=(source, 0))
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if status and status.Status == 0:
                return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"no C-ECHO from {source} within {seconds} s")


def _half_open(port: int, n: int, close: bool, source: str = "127.0.0.1") -> list[socket.socket]:
    rq = association_request()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
        try:
            s.sendall(rq[:30])
        except OSError:
            pass  # already refused
        if close:
            s.close()
        else:
            socks.append(s)
    return socks


def test_sixteen_half_open_connections_that_close_keep_nobody_out(daemon):
    _half_open(daemon.scp.port, 16, close=True)
    assert _echo_within(daemon.scp.port, 5.0) < 1.0  # a closed connection is let go at once


def test_sixteen_stalled_requests_keep_their_own_address_out_for_less_than_5_s(daemon):
    """The worst case: the attacker shares the sender's address (loopback) and keeps its
    connections open. Only `max_connections_per_source` of them are taken; they are let go after
    `request_timeout_s` (4 s)."""
    socks = _half_open(daemon.scp.port, 16, close=False)
    try:
        waited = _echo_within(daemon.scp.port, 6.0)
        assert waited < 5.0
        # another address is not kept out at all
        socks += _half_open(daemon.scp.port, 16, close=False)
        assert _echo_within(daemon.scp.port, 1.0, source="127.0.0.2") < 1.0
    finally:
        for s in socks:
            s.close()


def _associate(port: int, aet: str, source: str):
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, bind_address=(source, 0))


def test_strangers_never_hold_the_last_slots(cfg):
    cfg.routes = []
    cfg.peers.allowed_calling_ae_titles = ["GOODSCU"]
    cfg.node.max_associations = 4
    d = Daemon(cfg)
    d.start()
    try:
        port = d.scp.port
        for k in range(8):  # strangers by AE title, from other addresses: rejected at once, hold nothing
            assert _associate(port, "EVIL", f"127.0.1.{k + 1}").is_rejected
        # one allowed address takes what one source may; the rest stays for others
        cfg_cap = cfg.node.max_connections_per_source
        mine = []
        for _ in range(min(cfg_cap, cfg.node.max_associations - 1)):
            a = _associate(port, "GOODSCU", "127.0.0.3")
            assert a.is_established
            mine.append(a)
        assert _echo_within(port, 1.0, source="127.0.0.4") < 1.0
        for a in mine:
            a.release()
    finally:
        d.stop(drain_timeout_s=5)


def test_one_source_cannot_take_every_slot(cfg):
    cfg.routes = []
    cfg.node.max_associations = 8
    cfg.node.max_connections_per_source = 3
    d = Daemon(cfg)
    d.start()
    try:
        port = d.scp.port
        mine = []
        for k in range(6):
            a = _associate(port, "HOG", "127.0.0.5")
            if a.is_established:
                mine.append(a)
            if k >= 3:
                assert a.is_rejected and not a.is_aborted
        assert len(mine) == 3
        assert _echo_within(port, 1.0, source="127.0.0.6") < 1.0
        for a in mine:
            a.release()
    finally:
        d.stop(drain_timeout_s=5)


def test_every_refused_sender_reads_its_rejection(cfg):
    """Refusals at accept reach the sender as an A-ASSOCIATE-RJ, never as an abort or a reset, also
    when many arrive at once (pynetdicom's requestor reports an abort for a rejection that comes
    back too fast, and socketserver closes a socket its verify_request refused)."""
    cfg.routes = []
    cfg.peers.allowed_source_networks = ["127.0.0.0/25"]
    d = Daemon(cfg)
    d.start()
    try:
        port, seen = d.scp.port, []

        def stranger(k: int) -> None:
            for _ in range(10):
                a = _associate(port, "STRANGER", f"127.0.0.{200 + k}")
                seen.append((a.is_rejected, a.is_aborted, a.acceptor.primitive and a.acceptor.primitive.result))

        threads = [threading.Thread(target=stranger, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        assert _echo_within(port, 1.0) < 1.0  # an allowed sender meanwhile
        for t in threads:
            t.join()
        assert seen == [(True, False, 0x01)] * 40
    finally:
        d.stop(drain_timeout_s=5)


def _read_pdu(sock: socket.socket, timeout: float) -> tuple[int | None, float]:
    """The type of the next PDU the appliance sends (None: closed without one), and when."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        head = sock.recv(6)
    except (TimeoutError, ConnectionResetError):
        return None, time.monotonic() - start
    return (head[0] if head else None), time.monotonic() - start


def test_a_pdu_longer_than_announced_aborts_before_it_is_read(daemon):
    rq = association_request()
    with socket.create_connection(("127.0.0.1", daemon.scp.port)) as s:
        s.sendall(rq)
        kind, _ = _read_pdu(s, 5)
        assert kind == 0x02  # A-ASSOCIATE-AC
        # the rest of the AC, then a P-DATA-TF declaring 4 GiB
        s.settimeout(1)
        try:
            s.recv(65536)
        except TimeoutError:
            pass
        s.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF) + b"\0" * 1024)
        kind, took = _read_pdu(s, 10)
        assert kind in (0x07, None) and took < 5  # A-ABORT (or closed), not a read of 4 GiB
    assert echo("127.0.0.1", daemon.scp.port) == 0


@pytest.mark.parametrize("first", [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"\x09" + b"\0" * 40,
                                   struct.pack(">BBL", 0x01, 0, 100 * 1024 * 1024)])
def test_not_a_request_is_refused_at_once(daemon, first):
    """A TLS ClientHello on the plain port, an unknown PDU type, a request declaring 100 MiB."""
    with socket.create_connection(("127.0.0.1", daemon.scp.port)) as s:
        s.sendall(first)
        kind, took = _read_pdu(s, 5)
        assert kind == 0x03 and took < 2  # A-ASSOCIATE-RJ
    assert echo("127.0.0.1", daemon.scp.port) == 0
