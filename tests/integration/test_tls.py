"""DICOM over TLS (issue 14 item 4) against dcmtk built with OpenSSL: `storescu +tls` into the
appliance's TLS port, the appliance exporting to `storescp +tls`, client certificates verified
when asked, and `appliance config check` on the files. Certificates are made here (openssl)."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.config import DestinationTls, TlsConfig
from appliance.synth.study import write_synthetic_ct
from tests.helpers import free_port
from tests.integration.peers import STORESCU, StoreSCP, daemon_with_console, require_dcmtk

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, crt = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", str(key), "-out", str(crt), "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    return key, crt


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], server: bool) -> tuple[Path, Path]:
    key, csr, crt, ext = (folder / f"{name}.{x}" for x in ("key", "csr", "crt", "ext"))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr),
             cwd=folder)
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n" +
                   ("extendedKeyUsage=serverAuth\n" if server else "extendedKeyUsage=clientAuth\n"))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]), "-CAcreateserial",
             "-days", "2", "-out", str(crt), "-extfile", str(ext), cwd=folder)
    return key, crt


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = _ca(d, "hospital-ca")
    stranger_ca = _ca(d, "stranger-ca")
    return {
        "ca": ca[1], "stranger_ca": stranger_ca[1],
        "appliance": _leaf(d, "appliance", ca, server=True),
        "console": _leaf(d, "console", ca, server=True),
        "modality": _leaf(d, "modality", ca, server=False),
        "stranger": _leaf(d, "stranger", stranger_ca, server=False),
        "exporter": _leaf(d, "exporter", ca, server=False),
    }


@pytest.fixture(autouse=True)
def _dcmtk_installed():
    require_dcmtk()


def _storescu_tls(port: int, files, key: Path | None, crt: Path | None, ca: Path) -> subprocess.CompletedProcess:
    tls = ["+tls", str(key), str(crt)] if key else ["+tla"]
    return subprocess.run([str(STORESCU), *tls, "+cf", str(ca), "-aet", "MODALITY", "-aec", "APPLIANCE",
                           "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TCP_NODELAY": "1"})


def _tls_config(cfg, pki, verify: bool):
    key, crt = pki["appliance"]
    cfg.tls = TlsConfig(port=free_port(), certificate=crt, private_key=key, ca_bundle=pki["ca"], verify_clients=verify)


def test_storescu_tls_in_and_storescp_tls_out(tmp_path, cfg, pki):
    """A modality with a hospital certificate stores over TLS; the derived series leaves over TLS
    to a console that verifies the appliance's client certificate; the plain port still answers."""
    cfg.export.retry_initial_s = 0.5
    cfg.export.retry_max_s = 1.0
    _tls_config(cfg, pki, verify=True)
    with daemon_with_console(cfg, tmp_path) as (daemon, peer):
        console = daemon.cfg.destinations["console"]
        key, crt = pki["exporter"]
        console.tls = DestinationTls(enabled=True, ca_bundle=pki["ca"], server_name="localhost",
                                     certificate=crt, private_key=key)
        ckey, ccrt = pki["console"]
        tls_peer = StoreSCP(peer.out, peer.port, extra=["+tls", str(ckey), str(ccrt), "+cf", str(pki["ca"])])
        tls_peer.start()
        try:
            daemon.start()
            study = write_synthetic_ct(tmp_path / "study", shape_zyx=(8, 64, 64), dose_fraction=0.25, seed=3)
            done = _storescu_tls(cfg.tls.port, study.paths, *pki["modality"], pki["ca"])
            assert done.returncode == 0, done.stderr
            files = tls_peer.wait_for(8)
            assert len(files) == 8
            from appliance.dicom.scu import SendError, echo
            assert echo("127.0.0.1", cfg.node.port) == 0  # the plain port beside the TLS one
            with pytest.raises(SendError):  # the console speaks TLS only: what arrived came over TLS
                echo("127.0.0.1", peer.port, timeout_s=5)
        finally:
            tls_peer.stop()


@pytest.mark.parametrize("who", ["stranger", "anonymous"])
def test_a_client_without_an_accepted_certificate_is_refused(tmp_path, cfg, pki, who):
    cfg.routes = []
    _tls_config(cfg, pki, verify=True)
    from tests.integration.daemon_process import DaemonProcess
    daemon = DaemonProcess(cfg, tmp_path / "daemon").start()
    try:
        study = write_synthetic_ct(tmp_path / "study", shape_zyx=(2, 32, 32), seed=4)
        key, crt = pki["stranger"] if who == "stranger" else (None, None)
        done = _storescu_tls(cfg.tls.port, study.paths, key, crt, pki["ca"])
        assert done.returncode != 0
        assert daemon.query("SELECT COUNT(*) FROM instances")[0][0] == 0
        # and one that has one gets in at once afterwards
        assert _storescu_tls(cfg.tls.port, study.paths, *pki["modality"], pki["ca"]).returncode == 0
        assert daemon.query("SELECT COUNT(*) FROM instances")[0][0] == 2
    finally:
        daemon.stop()


def test_without_verification_any_tls_client_is_served_and_old_tls_is_not(tmp_path, cfg, pki):
    cfg.routes = []
    _tls_config(cfg, pki, verify=False)
    from tests.integration.daemon_process import DaemonProcess
    daemon = DaemonProcess(cfg, tmp_path / "daemon").start()
    try:
        study = write_synthetic_ct(tmp_path / "study", shape_zyx=(2, 32, 32), seed=6)
        assert _storescu_tls(cfg.tls.port, study.paths, *pki["stranger"], pki["ca"]).returncode == 0
        # TLS 1.1 and below are refused at the handshake (BCP 195)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        with socket.create_connection(("127.0.0.1", cfg.tls.port), timeout=5) as raw:
            with pytest.raises((ssl.SSLError, OSError)):
                ctx.wrap_socket(raw).do_handshake()
        # a client that never finishes its handshake is let go after request_timeout_s
        with socket.create_connection(("127.0.0.1", cfg.tls.port), timeout=10) as raw:
            t = time.monotonic()
            assert raw.recv(10) == b""
            assert time.monotonic() - t < cfg.node.request_timeout_s + 2
    finally:
        daemon.stop()


def test_config_check_loads_the_tls_files(tmp_path, pki):
    good = tmp_path / "good.toml"
    key, crt = pki["appliance"]
    good.write_text(f'[tls]\nport = 2762\ncertificate = "{crt}"\nprivate_key = "{key}"\nca_bundle = "{pki["ca"]}"\n'
                    'verify_clients = true\n')
    mismatched = tmp_path / "mismatched.toml"
    mismatched.write_text(f'[tls]\nport = 2762\ncertificate = "{crt}"\nprivate_key = "{pki["console"][0]}"\n')
    missing = tmp_path / "missing.toml"
    missing.write_text(f'[tls]\nport = 2762\ncertificate = "{crt}"\nprivate_key = "{key}"\n'
                       f'[destinations.console]\nae_title = "PACS"\nhost = "pacs"\nport = 2762\n'
                       f'[destinations.console.tls]\nenabled = true\nca_bundle = "{tmp_path / "nope.pem"}"\n')
    incomplete = tmp_path / "incomplete.toml"
    incomplete.write_text('[tls]\nport = 2762\n')

    def check(path):
        return subprocess.run([sys.executable, "-m", "appliance", "config", "check", str(path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    assert check(good).returncode == 0
    bad = check(mismatched)
    assert bad.returncode == 2 and "not the certificate's" in bad.stderr, bad.stderr
    bad = check(missing)
    assert bad.returncode == 2 and "nope.pem does not exist" in bad.stderr, bad.stderr
    bad = check(incomplete)
    assert bad.returncode == 2 and "tls.port needs" in bad.stderr, bad.stderr
