"""Model cards: what a denoiser expects and returns, validated by pydantic.

A denoiser is an ONNX file plus a card (TOML) beside it, ``<name>.toml``::

    name = "reference-redcnn"
    version = "1.0.0"
    onnx = "reference-redcnn.onnx"          # relative to the card
    sha256 = "..."                          # of the ONNX file; checked when the model is loaded
    intended_use = "..."
    training_data = "..."
    clinical_use = false
    precisions = ["fp32", "fp16"]           # what an engine may run the network at (validated by its author)

    [input]
    context_slices = 0       # k: the network sees 2k+1 neighbouring slices as channels, centre at k
    [normalization]          # x = (clip(HU, clip_min_hu, clip_max_hu) - center_hu) / scale_hu
    center_hu = 0.0
    scale_hu = 1000.0
    clip_min_hu = -1024.0
    clip_max_hu = 3071.0
    [output]
    meaning = "residual"     # residual: HU_out = HU_in - y*scale_hu (the noise); image: HU_out = y*scale_hu + center_hu
    [scores]                 # measured on held-out simulated data (optional, informational)
    noise_std_reduction = 0.55
    mean_shift_hu = 0.8
    psnr_gain_db = 4.1

The network's input is (N, 2k+1, H, W) float32 and its output (N, 1, H, W), N a batch of slices,
H and W any size (fully convolutional).

``precisions`` lists the precisions the model's author validated: TensorRT builds fp16 only where the card
allows it (an fp16 engine of a model with large activations can overflow, or drift by more HU than the
author accepts). Left out, both are allowed.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class CardError(Exception):
    """A model or card that cannot be used; the message says why (for ``engines verify``)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Section):
    context_slices: int = Field(0, ge=0, le=8)

    @property
    def channels(self) -> int:
        return 2 * self.context_slices + 1


class Normalization(_Section):
    center_hu: float = 0.0
    scale_hu: float = Field(1000.0, gt=0)
    clip_min_hu: float = -1024.0
    clip_max_hu: float = 3071.0

    @model_validator(mode="after")
    def _clip_order(self) -> Normalization:
        if self.clip_min_hu >= self.clip_max_hu:
            raise ValueError("clip_min_hu must be below clip_max_hu")
        return self

    def to_network(self, hu: np.ndarray) -> np.ndarray:
        return ((np.clip(hu, self.clip_min_hu, self.clip_max_hu) - self.center_hu) / self.scale_hu).astype(np.float32)


class OutputSpec(_Section):
    meaning: Literal["residual", "image"] = "residual"


class Scores(_Section):
    noise_std_reduction: float | None = None
    mean_shift_hu: float | None = None
    psnr_gain_db: float | None = None


Precision = Literal["fp32", "fp16"]


class ModelCard(_Section):
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    onnx: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    intended_use: str
    training_data: str
    clinical_use: bool = False
    precisions: list[Precision] = Field(default_factory=lambda: ["fp32", "fp16"], min_length=1)
    input: InputSpec = Field(default_factory=InputSpec)
    normalization: Normalization = Field(default_factory=Normalization)
    output: OutputSpec = Field(default_factory=OutputSpec)
    scores: Scores = Field(default_factory=Scores)

    @field_validator("precisions")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"precisions lists one more than once: {value}")
        return value

    def allows(self, precision: str) -> bool:
        """True when the card lets an engine run the network at ``precision`` ('fp32' or 'fp16')."""
        return precision in self.precisions

    def from_network(self, y: np.ndarray, hu_in: np.ndarray) -> np.ndarray:
        """The network's output (N, H, W) back to HU, given the centre slices' input HU."""
        n = self.normalization
        if self.output.meaning == "residual":
            return (hu_in - y * n.scale_hu).astype(np.float32)
        return (y * n.scale_hu + n.center_hu).astype(np.float32)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_card(path: Path) -> tuple[ModelCard, Path]:
    """Read and validate a card; returns (card, path of its ONNX file). Raises CardError."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CardError(f"{path}: no model card (a denoiser is an ONNX file plus a TOML card beside it)") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CardError(f"{path}: cannot read the card: {exc}") from exc
    try:
        card = ModelCard.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CardError(f"{path}: invalid card: {problems}") from exc
    onnx_path = path.parent / card.onnx
    if not onnx_path.exists():
        raise CardError(f"{path}: the card names {card.onnx}, which is not there")
    digest = file_sha256(onnx_path)
    if digest != card.sha256:
        raise CardError(f"{onnx_path}: sha256 {digest[:12]}... does not match the card's {card.sha256[:12]}...")
    return card, onnx_path
