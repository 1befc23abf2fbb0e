"""The ``denoise`` pipeline: a learned denoiser (ONNX model + card) on a CT volume in HU.

The model is loaded and checked when the pipeline is built (at daemon start for routed
pipelines): a bad model file is refused then, with the card's reason, never at the first study.
Inference runs slab by slab (and tile by tile if configured) through `engines.tiling`, on
TensorRT where available and ONNX Runtime (the CPU twin) otherwise.
"""

from __future__ import annotations

from appliance import __version__
from appliance.config import DenoiseConfig
from appliance.logging import get_logger
from appliance.pipeline.stages import Pipeline, StageError
from appliance.volume import Volume

log = get_logger(__name__)


class Denoise:
    name = "denoise"

    def __init__(self, cfg: DenoiseConfig) -> None:
        from engines.card import load_card
        from engines.runtime import select_backend

        self.cfg = cfg
        self.card, onnx_path = load_card(cfg.model)  # CardError: refused now, with the reason
        self.backend = select_backend(cfg.backend, engine_cache=cfg.engine_cache)
        self.session = self.backend.load(onnx_path, self.card)
        log.info("denoise.loaded", model=self.card.name, version=self.card.version, backend=self.backend.name)

    def __call__(self, volume: Volume) -> Volume:
        from engines.tiling import denoise_volume

        if not isinstance(volume, Volume):
            raise StageError(self.name, "not_a_volume", "the denoise pipeline takes image series")
        if volume.units != "HU":
            raise StageError(self.name, "not_hu", f"the model expects CT in HU, the series is in {volume.units}")
        volume.voxels = denoise_volume(volume.voxels, self.session, self.card, slab=self.cfg.slab,
                                       tile_hw=self.cfg.tile)
        volume.provenance.append(f"{self.card.name} {self.card.version} on {self.backend.name}")
        return volume


def denoise_pipeline(cfg) -> Pipeline:
    """Loads the model (and builds or deserialises its engine): build it once, at start."""
    stage = Denoise(cfg.denoise if cfg is not None else DenoiseConfig())
    # Streams: each slice is denoised with the card's context slices around it (ends repeated),
    # batch by batch, so a slab gives what the whole volume gives (`engines.tiling.denoise_volume`).
    return Pipeline("denoise", f"{__version__}+{stage.card.name}-{stage.card.version}", [stage],
                    streams=True, context_slices=stage.card.input.context_slices)
