"""The reference denoiser: a plain residual CNN in the RED-CNN / DnCNN family, sized for CPU training.

    y = conv3x3(C -> 1) o [ReLU o conv3x3(C -> C)] x (depth - 2) o ReLU o conv3x3(2k+1 -> C) (x)

``x`` is (N, 2k+1, H, W) normalised HU (the card's ``(clip(HU) - center) / scale``) and ``y``
(N, 1, H, W) the estimated noise of the centre slice in the same units (residual learning: the
denoised slice is ``x_centre - y``).  Zero padding keeps H and W, so the network is fully
convolutional and runs on any slice size; no batch normalisation, so the exported graph is convolutions
and ReLUs only (what ONNX Runtime and TensorRT both fuse).  The receptive field is 2*depth + 1 pixels.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualDenoiser(nn.Module):
    """``depth`` 3x3 convolutions of ``features`` channels, ReLU between them, output = the noise."""

    def __init__(self, in_channels: int = 1, features: int = 32, depth: int = 8) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2 convolutions, got {depth}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, features, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True)]
        last = nn.Conv2d(features, 1, 3, padding=1)
        # Start as the identity (zero noise estimate): early steps then only ever remove noise.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.layers = nn.Sequential(*layers)
        self.in_channels, self.features, self.depth = in_channels, features, depth

    def forward(self, hu_norm: torch.Tensor) -> torch.Tensor:
        """(N, 2k+1, H, W) normalised HU -> (N, 1, H, W) noise of the centre slice, normalised units."""
        return self.layers(hu_norm)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
