"""The ``denoise`` pipeline: a learned denoiser (ONNX model + card) on a CT volume in HU.

The model is loaded and checked when the pipeline is built (at daemon start for routed
pipelines): a bad model file is refused then, with the card's reason, never at the first study.
``[denoise] model`` names a model (the store's active version, else the packaged one; `engines.store`)
or a card; a model activated on the running box is loaded before the next job that needs it.
Inference runs slab by slab (and tile by tile if configured) through `engines.tiling`, on
TensorRT where available and ONNX Runtime (the CPU twin) otherwise.
"""

from __future__ import annotations

from appliance import __version__
from appliance.config import ApplianceConfig, DenoiseConfig
from appliance.logging import get_logger
from appliance.pipeline.stages import Pipeline, StageError
from appliance.volume import Volume

log = get_logger(__name__)


class Denoise:
    name = "denoise"

    def __init__(self, cfg: DenoiseConfig, store=None) -> None:
        from engines.card import load_card
        from engines.runtime import select_backend
        from engines.store import StoreError

        self.cfg = cfg
        self.store = store if store is not None else ApplianceConfig().model_store()
        try:
            self.resolved = self.store.resolve(cfg.model)
        except StoreError as exc:
            from engines.card import CardError

            raise CardError(str(exc)) from exc
        self.card, onnx_path = load_card(self.resolved.card)  # CardError: refused now, with the reason
        self.backend = select_backend(cfg.backend, engine_cache=cfg.engine_cache)
        self.session = self.backend.load(onnx_path, self.card)
        log.info("denoise.loaded", model=self.card.name, version=self.card.version, origin=self.resolved.origin,
                 sha256=self.card.sha256, backend=self.backend.name)

    def wanted(self) -> str:
        """The card the configuration names now (the store's active version may have changed)."""
        try:
            return str(self.store.resolve(self.cfg.model).card)
        except Exception as exc:  # a store made unreadable meanwhile: keep the loaded model, say why
            log.error("denoise.model_lookup_failed", model=self.cfg.model, error=str(exc))
            return str(self.resolved.card)

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
    """Loads the model (and builds or deserialises its engine): build it once, at start, and again
    when the model store's active version changes (the worker asks `Pipeline.wanted`)."""
    cfg = cfg if cfg is not None else ApplianceConfig()
    stage = Denoise(cfg.denoise, cfg.model_store())
    # Streams: each slice is denoised with the card's context slices around it (ends repeated),
    # batch by batch, so a slab gives what the whole volume gives (`engines.tiling.denoise_volume`).
    return Pipeline("denoise", f"{__version__}+{stage.card.name}-{stage.card.version}", [stage],
                    streams=True, context_slices=stage.card.input.context_slices,
                    model=str(stage.resolved.card), wanted=stage.wanted)
