"""Tiling: slabs along z and blended in-plane tiles give the whole-volume result; memory stays bounded."""

from __future__ import annotations

import numpy as np
import pytest

from engines.tiling import denoise_volume, tile_starts, tile_weight

from engines.runtime import OnnxRuntimeBackend
from tests.onnx_helpers import make_card, make_conv_net, needs_onnx


def phantom(shape, seed=0) -> np.ndarray:
    """HU with soft tissue, bone-like blobs and noise: structure at every scale, values across the clip range."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    hu = np.where(x**2 + y**2 < 0.8, 40.0, -1000.0) + 900.0 * ((x - 0.3) ** 2 + (y + 0.2) ** 2 + z**2 < 0.05)
    return (hu + rng.normal(0, 60, shape)).astype(np.float32)


def whole_volume_reference(hu, session, card) -> np.ndarray:
    """The oracle: every slice with its context (ends repeated) in one session call, whole slices."""
    k, depth = card.input.context_slices, hu.shape[0]
    idx = np.clip(np.arange(depth)[:, None] + np.arange(-k, k + 1)[None, :], 0, depth - 1)
    y = session.run(card.normalization.to_network(hu[idx]))[:, 0]
    return card.from_network(y, hu)


class RecordingSession:
    """Wraps a session and records the shape of every batch passed to it."""

    def __init__(self, inner):
        self.inner, self.shapes = inner, []

    def run(self, batch):
        self.shapes.append(batch.shape)
        return self.inner.run(batch)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """A 3-layer 3x3 conv net (receptive-field radius 3 px) taking 2k+1 = 3 slices."""
    path = make_conv_net(tmp_path_factory.mktemp("net") / "net.onnx", channels=3)
    card = make_card(path, context_slices=1)
    return OnnxRuntimeBackend(intra_op_threads=1).load(path, card), card


@pytest.mark.parametrize("slab,overlap,tile_hw,tile_overlap", [
    (4, 0, None, 32),  # slabs only, depth not a multiple of the slab
    (23, 0, None, 32),  # one slab holds the whole volume
    (7, 2, None, 32),  # slabs with discarded overlap slices
    (5, 0, 32, 16),  # slabs and in-plane tiles, odd sizes: the last tile is shifted to the edge
    (3, 1, 40, 12),  # overlap margin 3 px = the receptive-field radius: still exact
])
@needs_onnx
def test_tiled_equals_whole_volume_inference(net, slab, overlap, tile_hw, tile_overlap):
    session, card = net
    hu = phantom((23, 61, 45))
    reference = whole_volume_reference(hu, session, card)
    recording = RecordingSession(session)
    tiled = denoise_volume(hu, recording, card, slab=slab, overlap=overlap, tile_hw=tile_hw,
                           tile_overlap=tile_overlap)
    assert tiled.shape == hu.shape and tiled.dtype == np.float32
    assert np.abs(tiled - reference).max() < 0.5  # HU
    if tile_hw is not None:
        assert all(s[2] <= tile_hw and s[3] <= tile_hw for s in recording.shapes)
        assert len({s[2:] for s in recording.shapes}) == 1  # every tile the same size (a static engine shape)


@needs_onnx
def test_the_network_really_differs_from_its_input(net):
    # Guards the test above: a net that did nothing would make any tiling look exact.
    session, card = net
    hu = phantom((5, 33, 33))
    assert np.abs(whole_volume_reference(hu, session, card) - hu).max() > 50  # HU


@needs_onnx
def test_tiles_too_small_for_their_overlap_show_seams_not_silently(net):
    # With a margin (tile_overlap // 4 = 1 px) below the receptive-field radius (3 px), tile borders
    # differ from the whole-slice result: the exactness claim depends on the documented margin.
    session, card = net
    hu = phantom((3, 61, 45))
    reference = whole_volume_reference(hu, session, card)
    tiled = denoise_volume(hu, session, card, slab=3, tile_hw=24, tile_overlap=4)
    assert np.abs(tiled - reference).max() > 0.5


def test_context_slices_repeat_the_end_slices_at_the_volume_ends():
    card_k2 = _card_with_context(2)
    hu = np.stack([np.full((4, 5), 100.0 * i, np.float32) for i in range(6)])  # slice i holds 100*i HU
    seen = []

    class CentreEcho:
        def run(self, batch):
            seen.append(batch.copy())
            return np.zeros((batch.shape[0], 1, *batch.shape[2:]), np.float32)

    denoise_volume(hu, CentreEcho(), card_k2, slab=6)
    (batch,) = seen
    slice_of = np.rint(batch[:, :, 0, 0] * card_k2.normalization.scale_hu / 100).astype(int)
    assert slice_of[0].tolist() == [0, 0, 0, 1, 2]
    assert slice_of[1].tolist() == [0, 0, 1, 2, 3]
    assert slice_of[5].tolist() == [3, 4, 5, 5, 5]


def test_a_300_slice_volume_never_passes_more_than_a_slab():
    card = _card_with_context(1)
    hu = phantom((300, 8, 8))
    calls = []

    class Residual0:
        def run(self, batch):
            calls.append(batch.shape[0])
            return np.zeros((batch.shape[0], 1, *batch.shape[2:]), np.float32)

    out = denoise_volume(hu, Residual0(), card, slab=16)
    assert max(calls) <= 16 and sum(calls) == 300 and len(calls) == 19
    np.testing.assert_allclose(out, hu, atol=1e-3)  # residual 0: HU unchanged (to float rounding)


@pytest.mark.parametrize("meaning", ["residual", "image"])
def test_output_mapping_follows_the_card(meaning):
    card = _card_with_context(0, meaning)
    hu = phantom((4, 10, 10))

    class Constant:
        def run(self, batch):
            return np.full((batch.shape[0], 1, *batch.shape[2:]), 0.05, np.float32)

    out = denoise_volume(hu, Constant(), card, slab=3)
    expected = hu - 50.0 if meaning == "residual" else np.full_like(hu, 50.0)  # 0.05 * scale_hu 1000
    np.testing.assert_allclose(out, expected, atol=1e-3)


def test_blend_weights_sum_to_one_across_every_overlap():
    length, tile, overlap = 101, 40, 16
    total = np.zeros(length)
    for s in tile_starts(length, tile, overlap):
        total[s:s + tile] += tile_weight(s, tile, length, overlap)
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length
    # Where exactly two tiles overlap by exactly `overlap` the weights are a partition of unity;
    # elsewhere (the last tile's larger overlap) denoise normalises by the sum, which is never 0.
    assert total.min() > 0.5
    np.testing.assert_allclose(total[: starts[-1]], 1.0, atol=1e-12)


def test_invalid_arguments_are_refused():
    card = _card_with_context(0)

    class Never:
        def run(self, batch):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match="twice the overlap"):
        denoise_volume(np.zeros((4, 8, 8), np.float32), Never(), card, slab=4, overlap=2)
    with pytest.raises(ValueError, match="twice tile_overlap"):
        denoise_volume(np.zeros((4, 8, 8), np.float32), Never(), card, tile_hw=40, tile_overlap=32)
    with pytest.raises(ValueError, match=r"\(z, y, x\)"):
        denoise_volume(np.zeros((8, 8), np.float32), Never(), card)


def _card_with_context(k: int, meaning: str = "residual"):
    from engines.card import InputSpec, ModelCard, OutputSpec

    return ModelCard(name="t", version="0", onnx="t.onnx", sha256="0" * 64, intended_use="tests",
                     training_data="none", input=InputSpec(context_slices=k), output=OutputSpec(meaning=meaning))
