"""The results document every ``appliance bench`` run writes (JSON), as pydantic models.

One document per run: where it ran (machine, GPU, driver, package versions, git revision), how
(options, the daemon's effective configuration), and a list of `Result`. A result is one measured
quantity of one scenario under fixed parameters: its raw samples (after warm-up) and their
statistics. Everything a budget or a baseline refers to is a result, addressed by its ``id``.

Result ids and params, per scenario (``params`` keys are what the report groups and plots by):

- ``e2e``: ``e2e/{pipeline}/{cols}x{rows}x{slices}/{sender}/c{concurrency}/{measure}``
  params: pipeline, slices, rows, cols, sender ("appliance-scu" or "dcmtk-storescu"), concurrency,
  measure: "first_byte_to_last_response" (first byte sent -> last C-STORE response at the
  destination, per study) or "last_image_to_last_response" (the last source image's C-STORE
  response -> the last derived image's). Stages (receive, completion_wait, assemble, queue_wait,
  stage:<name>..., derive, export) are on the first_byte result, in pipeline order.
  metric "latency", unit "s", better "lower".
- ``ingest``: ``ingest/{receiver}/{cols}x{rows}x{slices}/{sender}``, params receiver
  ("appliance" or "dcmtk-storescp"), sender, slices, rows, cols, bytes; metric "instances_per_s",
  unit "1/s", better "higher"; extra "mb_per_s" (p50). The appliance's result carries the dcmtk
  storescp result as its ``peer``, with the ratio of p50 throughputs (appliance / peer).
- ``denoise``: ``denoise/{backend}/{cols}x{rows}x{slices}``, params backend, model, slices, rows,
  cols, slab; metric "latency", unit "s", better "lower"; extra "ms_per_slice",
  "mvoxels_per_s" (p50).
- ``recon``: ``recon/{backend}/{algorithm}/{n}^3``, params backend, algorithm, n, views,
  detector, iterations; metric "latency", unit "s".
- ``kernels``: ``kernels/{backend}/{operation}/{n}^3``, params backend, operation
  ("forward_joseph", "adjoint_joseph", "backproject_fdk"), n, views, detector; metric
  "throughput", unit "GUPS" (giga voxel-updates per second), better "higher".
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_ID = "appliance-bench/1"
SCENARIOS = ("e2e", "ingest", "denoise", "recon", "kernels")
STATS = ("min", "p50", "p95", "p99", "max", "mean")


class Stats(BaseModel):
    """Order statistics of ``n`` samples. Percentiles interpolate linearly between order
    statistics (numpy's default), so with fewer than 20 samples p95 and p99 lie between the two
    largest samples: read them with ``n`` in mind."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(ge=1)
    min: float
    p50: float
    p95: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, samples: list[float] | np.ndarray) -> Stats:
        a = np.asarray(samples, dtype=np.float64)
        if a.size == 0:
            raise ValueError("no samples")
        p50, p95, p99 = np.percentile(a, [50, 95, 99])
        return cls(n=int(a.size), min=float(a.min()), p50=float(p50), p95=float(p95), p99=float(p99),
                   max=float(a.max()), mean=float(a.mean()))

    def get(self, stat: str) -> float:
        if stat not in STATS:
            raise KeyError(f"unknown statistic {stat!r}; one of {', '.join(STATS)}")
        return float(getattr(self, stat))


class Peer(BaseModel):
    """The same measurement of a named peer (e.g. dcmtk storescp) in the same run."""

    model_config = ConfigDict(extra="forbid")
    name: str
    id: str
    stats: Stats
    ratio: float = Field(description="this result's p50 / the peer's p50")


class Result(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    scenario: Literal["e2e", "ingest", "denoise", "recon", "kernels"]
    title: str
    params: dict[str, Any] = Field(default_factory=dict)
    metric: str
    unit: str
    better: Literal["lower", "higher"]
    warmup: int = Field(ge=0, description="runs before the samples, not counted")
    samples: list[float]
    stats: Stats
    stages: dict[str, Stats] = Field(default_factory=dict, description="e2e: per-stage seconds, pipeline order")
    stage_samples: dict[str, list[float]] = Field(default_factory=dict,
                                                  description="e2e: the raw per-stage seconds behind `stages`")
    extra: dict[str, float] = Field(default_factory=dict, description="secondary numbers (p50), named with units")
    peer: Peer | None = None

    @field_validator("samples")
    @classmethod
    def _finite(cls, v: list[float]) -> list[float]:
        if not v or not all(np.isfinite(v)):
            raise ValueError("samples must be a non-empty list of finite numbers")
        return v


class Machine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hostname: str
    os: str
    cpu: str
    cores: int
    memory_gib: float
    gpu: str | None = None
    gpu_driver: str | None = None
    compute_capability: str | None = None


class Git(BaseModel):
    model_config = ConfigDict(extra="forbid")
    revision: str
    dirty: bool


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quick: bool
    repeats: int | None = Field(None, description="--repeats; None: the plan's own sample counts")
    warmup: int
    scenarios: list[str]
    command: str


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_id: str = Field(SCHEMA_ID, alias="schema")
    started: datetime
    wall_s: float
    machine: Machine
    git: Git
    versions: dict[str, str | None] = Field(description="package -> version, None when not installed")
    options: Options
    config: dict[str, Any] = Field(default_factory=dict, description="the daemon's effective configuration (e2e, ingest)")
    results: list[Result]
    skipped: dict[str, str] = Field(default_factory=dict, description="scenario or backend -> why it was not run")

    @field_validator("schema_id")
    @classmethod
    def _known(cls, v: str) -> str:
        if v != SCHEMA_ID:
            raise ValueError(f"results schema {v!r}; this version reads {SCHEMA_ID!r}")
        return v

    def result(self, result_id: str) -> Result | None:
        return next((r for r in self.results if r.id == result_id), None)

    def dump(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2) + "\n"


def load(path) -> Document:
    from pathlib import Path

    return Document.model_validate_json(Path(path).read_text())


def json_schema() -> dict[str, Any]:
    return Document.model_json_schema(by_alias=True)


def measured(id: str, scenario: str, title: str, samples: list[float], *, metric: str, unit: str,
             better: str, warmup: int, params: dict[str, Any] | None = None,
             stages: dict[str, list[float]] | None = None, extra: dict[str, float] | None = None,
             peer: Peer | None = None) -> Result:
    """A `Result` from raw samples (and per-stage samples), statistics computed here."""
    return Result(id=id, scenario=scenario, title=title, params=params or {}, metric=metric, unit=unit,
                  better=better, warmup=warmup, samples=[float(s) for s in samples], stats=Stats.of(samples),
                  stages={k: Stats.of(v) for k, v in (stages or {}).items() if v},
                  stage_samples={k: [float(x) for x in v] for k, v in (stages or {}).items() if v},
                  extra=extra or {}, peer=peer)
