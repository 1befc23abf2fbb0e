"""Pipelines: named, versioned lists of stages. A stage takes a `Volume` and returns a `Volume`;
it knows nothing of DICOM. The runner times every stage (wall clock, seconds).

Reconstruction and denoising register their pipelines here (`register`) when they land; the
``passthrough`` pipeline re-emits the volume unchanged as a derived series.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from appliance import __version__
from appliance.volume import Volume


class Stage(Protocol):
    name: str

    def __call__(self, volume: Volume) -> Volume: ...


class StageError(Exception):
    """A stage could not process a volume; ``reason`` is coded for events and logs."""

    def __init__(self, stage: str, reason: str, detail: str) -> None:
        super().__init__(f"{stage}: {reason}: {detail}")
        self.stage = stage
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Pipeline:
    """``streams``: the pipeline can take a series slab by slab (each output slice depends only on
    its input slice and ``context_slices`` neighbours on each side, the ends repeated), and gives
    the same slices for a slab as for the whole volume. Otherwise it needs the whole series."""

    name: str
    version: str
    stages: list[Stage] = field(default_factory=list)
    streams: bool = False
    context_slices: int = 0
    # A pipeline that runs a model from the model store: ``model`` identifies what it loaded (the
    # card's path), ``wanted`` what the configuration and the store name now. When they differ the
    # worker builds the pipeline again for the next job (`appliance models activate`).
    model: str | None = None
    wanted: Callable[[], str] | None = field(default=None, compare=False)

    def run(self, volume: Volume, on_stage_done: Callable[[str, float], None] | None = None) -> tuple[Volume, dict[str, float]]:
        """Run every stage in order; returns the result and seconds per stage."""
        timings: dict[str, float] = {}
        for stage in self.stages:
            t0 = time.perf_counter()
            try:
                volume = stage(volume)
            except StageError:
                raise
            except Exception as exc:
                raise StageError(stage.name, "stage_error", f"{type(exc).__name__}: {exc}") from exc
            seconds = time.perf_counter() - t0
            timings[stage.name] = seconds
            volume.provenance.append(f"{self.name}/{stage.name} {self.version}")
            if on_stage_done is not None:
                on_stage_done(stage.name, seconds)
        return volume, timings


class Passthrough:
    """Re-emits the volume unchanged (a routing feature: re-label, re-send, archive)."""

    name = "passthrough"

    def __call__(self, volume: Volume) -> Volume:
        return volume


def _recon(cfg) -> Pipeline:
    from appliance.pipeline.recon import recon_pipeline  # numpy kernels load only when used

    return recon_pipeline(cfg)


def _denoise(cfg) -> Pipeline:
    from appliance.pipeline.denoise import denoise_pipeline  # loads the model: only when used

    return denoise_pipeline(cfg)


# A factory takes the appliance configuration (or None for defaults) and returns the pipeline.
PipelineFactory = Callable[[object], Pipeline]
_REGISTRY: dict[str, PipelineFactory] = {
    "passthrough": lambda cfg: Pipeline("passthrough", __version__, [Passthrough()], streams=True),
    "recon": _recon,
    "denoise": _denoise,
}


def register(name: str, factory: PipelineFactory) -> None:
    _REGISTRY[name] = factory


def available() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, cfg=None) -> Pipeline:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown pipeline {name!r}; available: {', '.join(available())}") from None
    return factory(cfg)
