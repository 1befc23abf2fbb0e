"""The appliance's whole configuration: one pydantic model, loaded from TOML.

Where the configuration comes from, first match wins:
1. an explicit file (``--config FILE``),
2. the file named by ``$APPLIANCE_CONFIG``,
3. ``/etc/appliance/appliance.toml`` if it exists,
4. the built-in default (every field has one), so the appliance starts with no file at all.

Environment variables ``APPLIANCE_<SECTION>__<FIELD>`` override single fields of whatever was
loaded, e.g. ``APPLIANCE_STORAGE__ROOT=/data/spool`` or ``APPLIANCE_NODE__PORT=104``; values are
read as TOML literals where they parse as one (``11112``, ``true``, ``["A", "B"]``), else as strings.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
import re
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PATH = Path("/etc/appliance/appliance.toml")
ENV_FILE = "APPLIANCE_CONFIG"
ENV_PREFIX = "APPLIANCE_"


class _Section(BaseModel):
    # A misspelt key in a field engineer's file must be an error, not silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NodeConfig(_Section):
    ae_title: str = Field("APPLIANCE", min_length=1, max_length=16)
    bind_address: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(16, ge=1)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    max_pdu_bytes: int = Field(
        1024 * 1024, ge=0,
        description="largest P-DATA-TF PDU accepted (announced in A-ASSOCIATE-AC); a longer one aborts the "
        "association before it is read. 0: unlimited (any declared length is read into memory)",
    )
    request_timeout_s: float = Field(
        4.0, gt=0, description="a new connection's A-ASSOCIATE-RQ (or TLS handshake) must arrive whole within this"
    )
    max_connections_per_source: int = Field(
        8, ge=1, description="connections one source address may hold at once (waiting or associated)"
    )
    max_pending_connections: int = Field(
        32, ge=1, description="connections still waiting for their A-ASSOCIATE-RQ, from all sources together"
    )
    process: bool = Field(
        True, description="receive in a process of its own (the association threads then never wait for the "
        "daemon's interpreter lock while it derives); false: threads of the daemon"
    )

    @field_validator("ae_title")
    @classmethod
    def _ae_title_chars(cls, v: str) -> str:
        if v != v.strip() or "\\" in v or not v.isprintable():
            raise ValueError("AE title: up to 16 printable characters, no backslash, no leading/trailing spaces")
        return v


class PeersConfig(_Section):
    """Who may send to the appliance. An empty list allows everyone."""

    allowed_calling_ae_titles: list[str] = Field(default_factory=list)
    allowed_source_networks: list[str] = Field(
        default_factory=list, description="IP addresses or CIDR networks, e.g. '10.0.0.0/8'"
    )

    @field_validator("allowed_source_networks")
    @classmethod
    def _networks_parse(cls, v: list[str]) -> list[str]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"not an IP address or network: {net!r}") from exc
        return v

    def source_allowed(self, address: str) -> bool:
        if not self.allowed_source_networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(n, strict=False) for n in self.allowed_source_networks)

    def calling_ae_allowed(self, ae_title: str) -> bool:
        return not self.allowed_calling_ae_titles or ae_title.strip() in self.allowed_calling_ae_titles


class StorageConfig(_Section):
    root: Path = Path("/var/lib/appliance")
    keep_rejected: bool = Field(True, description="keep refused instances under <root>/quarantine for inspection")


class CompletionConfig(_Section):
    """When a series counts as fully received."""

    idle_seconds: float = Field(5.0, gt=0, description="complete after this long with no new instance")
    expected_count_tags: list[str] = Field(
        default_factory=lambda: ["NumberOfSeriesRelatedInstances"],
        description="attributes that, when present, give the number of instances to expect; "
        "the series completes as soon as that many have arrived",
    )
    on_release: bool = Field(
        True, description="complete a series when the association that sent it is released (after the grace)"
    )
    release_grace_s: float = Field(
        0.5, ge=0, description="wait this long after the release for consoles that send one series over "
        "several associations; an instance arriving meanwhile cancels the release rule"
    )
    poll_interval_s: float = Field(0.5, gt=0)


class LimitsConfig(_Section):
    max_instances_per_series: int = Field(5000, ge=1)
    max_bytes_per_instance: int = Field(
        512 * 1024 * 1024, ge=1024,
        description="received bytes per instance, and what its pixel data may decode to (Rows x Columns x frames x ...)",
    )
    max_inflated_bytes: int = Field(
        64 * 1024 * 1024, ge=1024,
        description="what a Deflated Explicit VR dataset may inflate to (a deflate bomb stops here)",
    )
    free_space_reserve_bytes: int = Field(
        512 * 1024 * 1024, ge=0, description="refuse instances (0xA700) rather than fill the disk below this"
    )


class AssemblyConfig(_Section):
    spacing_tolerance_mm: float = Field(0.01, gt=0, description="absolute tolerance on slice spacing")
    spacing_tolerance_fraction: float = Field(0.01, gt=0, description="relative tolerance on slice spacing")
    orientation_tolerance: float = Field(1e-4, gt=0, description="max difference of direction cosines")
    max_gantry_tilt_deg: float = Field(30.0, ge=0, description="larger tilts are refused")


class DicomConfig(_Section):
    uid_root: str = Field(
        "1.2.826.0.1.3680043.8.498.",
        description="UID prefix for UIDs the appliance makes; pydicom's root by default: set your organisation's",
    )

    @field_validator("uid_root")
    @classmethod
    def _uid_root_form(cls, v: str) -> str:
        body = v[:-1]
        if not v.endswith(".") or not body or len(v) > 40 or not all(p.isdigit() for p in body.split(".")):
            raise ValueError("uid_root: dotted digits ending in '.', at most 40 characters")
        return v


class TlsConfig(_Section):
    """DICOM over TLS for receiving (PS3.15 B.9, the BCP 195 profiles): a TLS listener beside (or,
    with ``plain = false``, instead of) the plain one on ``node.port``."""

    port: int | None = Field(None, ge=1, le=65535, description="TLS listener port (2762 is DICOM's); none: no TLS")
    plain: bool = Field(True, description="keep the plain listener on node.port as well")
    certificate: Path | None = Field(None, description="server certificate, PEM (the chain after it)")
    private_key: Path | None = Field(None, description="its private key, PEM, unencrypted (readable by the service only)")
    ca_bundle: Path | None = Field(None, description="CAs whose client certificates are accepted, PEM")
    verify_clients: bool = Field(False, description="require a client certificate that ca_bundle verifies")
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _complete(self) -> TlsConfig:
        if self.port is not None and (self.certificate is None or self.private_key is None):
            raise ValueError("tls.port needs tls.certificate and tls.private_key")
        if self.verify_clients and self.ca_bundle is None:
            raise ValueError("tls.verify_clients needs tls.ca_bundle")
        if not self.plain and self.port is None:
            raise ValueError("tls.plain = false needs tls.port: the appliance would not listen at all")
        return self


class DestinationTls(_Section):
    """DICOM over TLS to one destination."""

    enabled: bool = False
    ca_bundle: Path | None = Field(None, description="CAs that verify the destination's certificate; none: the system's")
    verify: bool = Field(True, description="verify the destination's certificate and name (off only for tests)")
    server_name: str | None = Field(None, description="the name its certificate must carry; default: host")
    certificate: Path | None = Field(None, description="client certificate, PEM, when the destination asks for one")
    private_key: Path | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _pair(self) -> DestinationTls:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("tls.certificate and tls.private_key go together")
        return self


class Destination(_Section):
    """A DICOM peer that receives derived series (console, PACS)."""

    ae_title: str = Field(min_length=1, max_length=16)
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = Field(None, max_length=16, description="default: node.ae_title")
    tls: DestinationTls = Field(default_factory=DestinationTls)


class RouteRule(_Section):
    """Which pipeline a series goes through and where its result goes. Rules are tried in order;
    the first whose every given condition matches wins. Empty conditions match anything."""

    name: str = ""
    calling_ae_titles: list[str] = Field(default_factory=list)
    modalities: list[str] = Field(default_factory=list)
    data: Literal["images", "projections"] | None = Field(
        None, description="images (a series of slices) or projections (DICOM-CT-PD); None: either"
    )
    series_description: str | None = Field(None, description="regular expression, case-insensitive search")
    protocol_name: str | None = Field(None, description="regular expression, case-insensitive search")
    pipeline: str
    destinations: list[str] = Field(default_factory=list)

    @field_validator("series_description", "protocol_name")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from exc
        return v


class ReconConfig(_Section):
    """Reconstruction of CT projection data (the ``recon`` pipeline)."""

    algorithm: Literal["pwls-tv", "os-sart", "fdk"] = "pwls-tv"
    backend: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto: the GPU when pycuda finds one, else the host twin; a GPU failure falls back to it"
    )
    iterations: int = Field(20, ge=1)
    subsets: int = Field(4, ge=1)
    beta: float = Field(0.03, gt=0, description="TV strength (PWLS-TV)")
    tv_eps_per_mm: float = Field(1e-4, gt=0, description="TV smoothing, 1/mm (1e-4 is about 5 HU)")
    window: Literal["ram-lak", "shepp-logan", "cosine", "hamming", "hann"] = "hann"
    matrix: int = Field(512, ge=16, le=2048, description="rows and columns of the reconstructed slices")
    fov_mm: float = Field(400.0, gt=0)
    slice_mm: float | None = Field(None, gt=0, description="default: the detector row pitch at the isocentre")
    slices: int | None = Field(None, ge=1, description="default: what the detector covers across the FOV")


class DenoiseConfig(_Section):
    """The ``denoise`` pipeline: a model (ONNX + card) run by TensorRT or its CPU twin."""

    model: str = Field(
        "reference-redcnn",
        description="a model name: its active version in the model store ([models], `appliance models`), else "
        "the packaged model of that name; or the path of a card (TOML beside its ONNX file). Default: the "
        "reference model (not clinical)",
    )
    backend: Literal["auto", "tensorrt", "onnxruntime"] = "auto"
    engine_cache: Path = Field(Path("/var/cache/appliance/engines"), description="built TensorRT engines")
    slab: int = Field(16, ge=1, description="slices per inference batch (bounds memory for any series length)")
    tile: int | None = Field(None, ge=64, description="in-plane tile size; None: whole slices")

    @field_validator("model", mode="before")
    @classmethod
    def _model_text(cls, v: object) -> object:
        return str(v) if isinstance(v, Path) else v


class ModelsConfig(_Section):
    """The model store (`engines.store`): models installed, activated and rolled back on a running box."""

    store: Path | None = Field(None, description="default: <storage.root>/models (the data partition)")
    keyring: Path | None = Field(
        None, description="X.509 CA certificates (PEM); when set, a model installs only with a detached CMS "
        "signature of its card that verifies against them"
    )


class DerivedConfig(_Section):
    series_number_offset: int = Field(1000, ge=0, description="derived SeriesNumber = source + offset")


class StreamingConfig(_Section):
    """Streaming by slab (`appliance.dicom.stream`): pipelines that can (passthrough, denoise) start
    on a series while it arrives."""

    enabled: bool = Field(True, description="off: every series is processed whole after completion")
    slab_slices: int = Field(16, ge=1, description="ready slices that make a slab (the last slab takes the rest)")


class PipelineConfig(_Section):
    on_failure: Literal["fail", "passthrough"] = Field(
        "fail", description="after the retry: report only, or also send the original volume as derived"
    )
    max_attempts: int = Field(2, ge=1, description="a failing job is tried this many times")


class ExportConfig(_Section):
    retry_initial_s: float = Field(2.0, gt=0)
    retry_max_s: float = Field(300.0, gt=0)
    give_up_after_s: float = Field(24 * 3600.0, gt=0, description="then job.failed (export_gave_up)")
    release_sources: Literal["delete", "keep"] = Field(
        "delete", description="what happens to received instances once every destination stored the result"
    )
    timeout_s: float = Field(30.0, gt=0)
    process: bool = Field(
        True, description="run the exporter in a process of its own (on a 2-core box one process cannot "
        "receive, derive and export at the wire's pace); false: a thread of the daemon"
    )


class EventsConfig(_Section):
    enabled: bool = True
    endpoint: str = "tcp://127.0.0.1:5556"
    send_hwm: int = Field(10000, ge=1)
    include_results: bool = Field(False, description="attach result volumes (raw float32) to job.done")
    health_interval_s: float = Field(10.0, gt=0)
    curve_secret_key_file: Path | None = Field(None, description="server certificate (zmq.auth format)")
    curve_clients_dir: Path | None = Field(None, description="public certificates of allowed subscribers")


class AuditConfig(_Section):
    """The audit trail (PS3.15 A.5 audit messages, IHE ATNA): see appliance/audit.py."""

    enabled: bool = True
    path: Path | None = Field(None, description="append-only log of audit messages; default <storage.root>/audit/audit.log")
    syslog: str | None = Field(None, description="RFC 5424 collector: udp://host:514, tcp://host:601 or tls://host:6514")
    syslog_ca_bundle: Path | None = Field(None, description="CAs for a tls:// collector; default: the system's")
    include_patient_name: bool = Field(False, description="patients are named by Patient ID; their names only if true")
    source_id: str | None = Field(None, description="AuditSourceID; default <node.ae_title>@<hostname>")
    site_id: str | None = Field(None, description="AuditEnterpriseSiteID (the hospital)")
    alert_interval_s: float = Field(60.0, ge=0, description="security alerts of one kind from one address: at most "
                                    "one per interval, with the count of those folded into it")

    @field_validator("syslog")
    @classmethod
    def _syslog_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(udp|tcp|tls)://[^/:]+(:\d+)?$", v):
            raise ValueError("audit.syslog: udp://host[:port], tcp://host[:port] or tls://host[:port]")
        return v


class ApplianceConfig(_Section):
    node: NodeConfig = Field(default_factory=NodeConfig)
    peers: PeersConfig = Field(default_factory=PeersConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    completion: CompletionConfig = Field(default_factory=CompletionConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    assembly: AssemblyConfig = Field(default_factory=AssemblyConfig)
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    destinations: dict[str, Destination] = Field(
        default_factory=lambda: {"console": Destination(ae_title="CONSOLE", host="127.0.0.1", port=11113)}
    )
    routes: list[RouteRule] = Field(
        default_factory=lambda: [
            RouteRule(name="projection data", data="projections", pipeline="recon", destinations=["console"]),
            RouteRule(name="default", pipeline="passthrough", destinations=["console"]),
        ]
    )
    recon: ReconConfig = Field(default_factory=ReconConfig)
    denoise: DenoiseConfig = Field(default_factory=DenoiseConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)
    derived: DerivedConfig = Field(default_factory=DerivedConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)

    def audit_trail(self):
        """This process's audit trail (`appliance.audit.AuditTrail`)."""
        from appliance.audit import AuditTrail

        return AuditTrail(self.audit, self.node.ae_title, self.storage.root)

    def model_store(self):
        """The model store this configuration names (`engines.store.ModelStore`)."""
        from engines.store import ModelStore

        return ModelStore(self.models.store or self.storage.root / "models", keyring=self.models.keyring,
                          reserve_bytes=self.limits.free_space_reserve_bytes)

    @model_validator(mode="after")
    def _tls_port_apart(self) -> ApplianceConfig:
        if self.tls.port is not None and self.tls.plain and self.tls.port == self.node.port:
            raise ValueError(f"tls.port {self.tls.port} is node.port too: the TLS listener needs a port of its own")
        return self

    @model_validator(mode="after")
    def _routes_name_known_destinations(self) -> ApplianceConfig:
        for i, rule in enumerate(self.routes):
            unknown = [d for d in rule.destinations if d not in self.destinations]
            if unknown:
                raise ValueError(f"routes[{i}] ({rule.name or rule.pipeline}): unknown destination(s) {unknown}")
        return self


class ConfigError(Exception):
    """A configuration that cannot be used; the message says where and why."""


def _format_validation(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: {exc.error_count()} problem(s)"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key or key == ENV_FILE:
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``over`` applied to ``base``; a table ``over`` reaches into that ``base`` lacks starts from
    its default, so APPLIANCE_DESTINATIONS__CONSOLE__PORT changes one field of the default table."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict):
            start = out.get(k) if isinstance(out.get(k), dict) else defaults.get(k)
            out[k] = _merge(start if isinstance(start, dict) else {}, v,
                            defaults.get(k) if isinstance(defaults.get(k), dict) else {})
        else:
            out[k] = v
    return out


def parse(text: str, source: str = "<config>", environ: dict[str, str] | None = None) -> ApplianceConfig:
    """Parse TOML text into a validated configuration (env overrides applied when ``environ`` is given)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    if environ is not None:
        defaults = ApplianceConfig().model_dump(mode="json", exclude_none=True)
        data = _merge(data, _env_overrides(environ), defaults)
    try:
        return ApplianceConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(source, exc)) from exc


def resolve_path(path: str | Path | None, environ: dict[str, str] | None = None) -> Path | None:
    """The file that configures this run, or None for the built-in default."""
    env = os.environ if environ is None else environ
    if path is not None:
        return Path(path)
    if env.get(ENV_FILE):
        return Path(env[ENV_FILE])
    return DEFAULT_PATH if DEFAULT_PATH.exists() else None


def load(path: str | Path | None = None, environ: dict[str, str] | None = None) -> ApplianceConfig:
    """Load the effective configuration (see the module docstring for the order)."""
    env = dict(os.environ if environ is None else environ)
    resolved = resolve_path(path, env)
    if resolved is None:
        return parse("", "<built-in default>", env)
    try:
        text = resolved.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{resolved}: cannot read: {exc.strerror or exc}") from exc
    return parse(text, str(resolved), env)


def to_toml(cfg: ApplianceConfig) -> str:
    """The configuration as TOML a field engineer can edit and load back."""
    return tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True))  # TOML has no null
