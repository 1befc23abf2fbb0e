"""DICOM over TLS (PS3.15 Annex B.9): the contexts for receiving and sending, and their checks.

Both follow BCP 195 (RFC 9325) as PS3.15's BCP 195 TLS profiles do: TLS 1.2 or later, no
compression, no renegotiation, forward-secret AEAD cipher suites only for TLS 1.2 (TLS 1.3's own
suites are all AEAD). The server's certificate and key come from ``[tls]``; with
``verify_clients`` a client must present a certificate that ``ca_bundle`` verifies, else the
handshake fails (and the connection never reaches DICOM). Each destination has its own
``[destinations.<name>.tls]``: the server's certificate is verified (against its CA bundle, or the
system's) with its name checked, and a client certificate is offered when one is configured.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from appliance.config import ApplianceConfig, DestinationTls, TlsConfig

# BCP 195 / RFC 9325 4.2: ECDHE (and DHE where parameters exist) with AES-GCM or ChaCha20-Poly1305.
TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
])
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsSetupError(Exception):
    """A TLS file is missing, unreadable or does not fit (a key that is not the certificate's)."""


def _harden(ctx: ssl.SSLContext, min_version: str) -> ssl.SSLContext:
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def _load_chain(ctx: ssl.SSLContext, certificate: Path, private_key: Path, what: str) -> None:
    for path in (certificate, private_key):
        if not Path(path).is_file():
            raise TlsSetupError(f"{what}: {path} does not exist")
    try:
        ctx.load_cert_chain(str(certificate), str(private_key))
    except ssl.SSLError as exc:
        raise TlsSetupError(f"{what}: {certificate} and {private_key}: {exc.reason or exc} "
                            "(not PEM, encrypted, or the key is not the certificate's)") from exc
    except OSError as exc:
        raise TlsSetupError(f"{what}: {exc.strerror or exc}: {exc.filename or certificate}") from exc


def _load_cas(ctx: ssl.SSLContext, bundle: Path, what: str) -> None:
    if not Path(bundle).is_file():
        raise TlsSetupError(f"{what}: CA bundle {bundle} does not exist")
    try:
        ctx.load_verify_locations(cafile=str(bundle))
    except (ssl.SSLError, OSError) as exc:
        raise TlsSetupError(f"{what}: CA bundle {bundle}: {getattr(exc, 'reason', None) or exc}") from exc
    if not ctx.get_ca_certs():
        raise TlsSetupError(f"{what}: CA bundle {bundle} holds no CA certificate")


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The receiving side's context (``[tls]``)."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tls.min_version)
    _load_chain(ctx, tls.certificate, tls.private_key, "tls")
    if tls.ca_bundle is not None:
        _load_cas(ctx, tls.ca_bundle, "tls")
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.verify_clients else ssl.CERT_NONE
    return ctx


def client_context(tls: DestinationTls, host: str, what: str = "destination") -> tuple[ssl.SSLContext, str]:
    """The sending side's context for one destination, and the name its certificate must carry."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), tls.min_version)
    if tls.verify:
        if tls.ca_bundle is not None:
            _load_cas(ctx, tls.ca_bundle, what)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.certificate is not None:
        _load_chain(ctx, tls.certificate, tls.private_key, what)
    return ctx, tls.server_name or host


def peer_identity(sock) -> str | None:
    """The subject of the certificate a TLS peer presented (for logs and the audit trail)."""
    try:
        cert = sock.getpeercert()
    except (AttributeError, ValueError, OSError):
        return None
    if not cert:
        return None
    subject = dict(x[0] for x in cert.get("subject", ()))
    return subject.get("commonName") or str(cert.get("subject"))


def check(cfg: ApplianceConfig) -> list[str]:
    """Every TLS file the configuration names, loaded as the daemon would: what is wrong."""
    problems = []
    if cfg.tls.port is not None:
        try:
            server_context(cfg.tls)
        except TlsSetupError as exc:
            problems.append(str(exc))
    for name, dest in cfg.destinations.items():
        if dest.tls.enabled:
            try:
                client_context(dest.tls, dest.host, f"destinations.{name}.tls")
            except TlsSetupError as exc:
                problems.append(str(exc))
    return problems
