"""Which storage SOP classes and transfer syntaxes the appliance accepts."""

from __future__ import annotations

from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    RawDataStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    SecondaryCaptureImageStorage,
    RawDataStorage,  # CT projection data (DICOM-CT-PD) arrives as Raw Data or CT Image Storage
)

UNCOMPRESSED: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)

# Offered only when a decoder plugin for it is installed: accepting what we cannot decode
# would turn a clean association-time refusal into a failed study later.
COMPRESSED_CANDIDATES: tuple[UID, ...] = (
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    RLELossless,
)


def decodable_compressed_syntaxes() -> list[UID]:
    """Compressed transfer syntaxes whose pixel data this installation can decode."""
    out = []
    for uid in COMPRESSED_CANDIDATES:
        try:
            if get_decoder(uid).is_available:
                out.append(uid)
        except NotImplementedError:
            continue
    return out


def accepted_transfer_syntaxes() -> list[UID]:
    return [*UNCOMPRESSED, *decodable_compressed_syntaxes()]
