"""Value ranges to 8-bit pixels (arrays and DICOM frames)."""
from __future__ import annotations

import numpy as np

from ..errors import ImageError


def scale_to_uint8(values: np.ndarray, name: str = "given") -> np.ndarray:
    """Map the value range min..max linearly onto 0..255 (uint8, rounded to nearest)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ImageError(f"The image {name} contains NaN or infinite values: replace them first.")
    low, high = values.min(), values.max()
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)
