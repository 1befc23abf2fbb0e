"""Denoise a volume of any length with any backend: batches of slices along z, optional in-plane tiles.

The network's contract (engines.card) is 2.5-D: each output slice depends only on its own 2k+1 input slices
(its context), so a volume is cut along z into batches of at most ``slab`` slices whose context is read
from the neighbours, with the end slices repeated at the volume's ends. Only one batch is in flight: memory
is bounded by ``slab`` whatever the series length (pass ``out=`` a memmap to bound the result too).

In-plane tiles (``tile_hw``) let a fixed-size engine profile, or a small GPU, serve large matrices. Tiles
overlap by ``tile_overlap`` pixels and are blended with a raised-cosine weight that is zero on the outer
quarter of the overlap, rises over its middle half and is one on its inner quarter. The two weights in an
overlap sum to one, so there are no seams, and a pixel within ``tile_overlap // 4`` of a tile's inner edge
(where the network sees the tile's zero padding instead of the image) never counts: with a receptive-field
radius up to ``tile_overlap // 4`` pixels the tiled result equals the whole-slice one to float rounding.

The card's arithmetic (normalisation in front, output mapping behind) is done here in NumPy for a session of
``io = "network"`` (the CPU twin); a session of ``io = "hu"`` (TensorRT) does it on the GPU and gets HU.
Blending tiles commutes with the output mapping, which is affine with weights summing to one, so both give
the same result to float rounding.
"""

from __future__ import annotations

import numpy as np

from engines.card import ModelCard
from engines.session import InferenceError, Session


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """First pixel of each tile along an axis of ``length`` pixels; the last tile ends at the edge."""
    if tile >= length:
        return [0]
    stride = tile - overlap
    return [*range(0, length - tile, stride), length - tile]


def _edge_weight(distance: np.ndarray, overlap: int) -> np.ndarray:
    """Weight by distance (pixels) from a tile's inner edge: 0 on the first quarter of the overlap, a
    raised cosine over the middle half, 1 beyond; w(d) + w(overlap - 1 - d) = 1."""
    margin = overlap // 4
    r = np.clip((distance + 0.5 - margin) / (overlap - 2 * margin), 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * r)


def tile_weight(start: int, size: int, length: int, overlap: int) -> np.ndarray:
    """1-D blending weight of the tile [start, start + size) on an axis of ``length`` pixels. Edges at
    the image border keep weight 1: no other tile covers them."""
    w = np.ones(size, dtype=np.float64)
    if overlap > 0:
        d = np.arange(size, dtype=np.float64)
        if start > 0:
            w *= _edge_weight(d, overlap)
        if start + size < length:
            w *= _edge_weight(d[::-1], overlap)
    return w


def _run(session: Session, x: np.ndarray) -> np.ndarray:
    y = session.run(np.ascontiguousarray(x, dtype=np.float32))
    n, _, h, w = x.shape
    if y.shape != (n, 1, h, w):
        raise InferenceError(f"the session returned {y.shape} for a batch of {x.shape}; expected {(n, 1, h, w)}")
    return y[:, 0]


def infer_slices(x: np.ndarray, session: Session, tile_hw: int | None, tile_overlap: int) -> np.ndarray:
    """The session's output (N, H, W) for its input (N, C, H, W), whole or as blended tiles (network units or
    HU, as the session's ``io``)."""
    n, _, height, width = x.shape
    if tile_hw is None or (tile_hw >= height and tile_hw >= width):
        return _run(session, x)
    th, tw = min(tile_hw, height), min(tile_hw, width)
    ys, xs = tile_starts(height, th, tile_overlap), tile_starts(width, tw, tile_overlap)
    wy = {s: tile_weight(s, th, height, tile_overlap) for s in ys}
    wx = {s: tile_weight(s, tw, width, tile_overlap) for s in xs}
    acc = np.zeros((n, height, width), dtype=np.float64)
    weight = np.zeros((height, width), dtype=np.float64)
    for sy in ys:
        for sx in xs:
            w = np.outer(wy[sy], wx[sx])
            acc[:, sy:sy + th, sx:sx + tw] += _run(session, x[:, :, sy:sy + th, sx:sx + tw]) * w
            weight[sy:sy + th, sx:sx + tw] += w
    return (acc / weight).astype(np.float32)


def denoise_volume(
    hu: np.ndarray,
    session: Session,
    card: ModelCard,
    slab: int = 16,
    overlap: int = 0,
    tile_hw: int | None = None,
    tile_overlap: int = 32,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Denoise ``hu`` (z, y, x), in HU, slice by slice with the card's normalisation and output mapping.

    slab: at most this many slices go to the session in one call (the batch N).
    overlap: slices run on each side of a batch and discarded. The card's networks see each slice
        independently, so 0 (the default) is exact; it is there for a network that mixes the batch.
    tile_hw: in-plane tile size in pixels (None: whole slices); tile_overlap: pixels shared by
        neighbouring tiles (exact for a receptive-field radius up to tile_overlap // 4).
    out: where to write the result (z, y, x) float32 HU, e.g. a memmap; a new array by default.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be (z, y, x), got shape {hu.shape}")
    if overlap < 0 or slab - 2 * overlap < 1:
        raise ValueError(f"slab {slab} must exceed twice the overlap {overlap}")
    if tile_hw is not None and (tile_overlap < 0 or tile_hw < max(1, 2 * tile_overlap)):
        raise ValueError(f"tile_hw {tile_hw} must be at least twice tile_overlap {tile_overlap}")
    depth = hu.shape[0]
    if out is None:
        out = np.empty(hu.shape, dtype=np.float32)
    elif out.shape != hu.shape:
        raise ValueError(f"out has shape {out.shape}, hu {hu.shape}")
    k = card.input.context_slices
    context = np.arange(-k, k + 1)
    hu_io = getattr(session, "io", "network") == "hu"
    step = slab - 2 * overlap
    for z0 in range(0, depth, step):
        z1 = min(z0 + step, depth)
        b0, b1 = max(0, z0 - overlap), min(depth, z1 + overlap)
        # Each batch entry is one slice with its 2k+1 neighbours as channels, the ends repeated.
        neighbours = np.clip(np.arange(b0, b1)[:, None] + context[None, :], 0, depth - 1)
        x = np.asarray(hu[neighbours.ravel()], dtype=np.float32)
        if not hu_io:
            x = card.normalization.to_network(x)
        x = x.reshape(b1 - b0, 2 * k + 1, *hu.shape[1:])
        y = infer_slices(x, session, tile_hw, tile_overlap)[z0 - b0:z1 - b0]
        out[z0:z1] = y if hu_io else card.from_network(y, np.asarray(hu[z0:z1], dtype=np.float32))
    return out
