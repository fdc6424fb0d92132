"""DICOM -> an 8-bit RGB PIL image, the way a viewer would first display it.

Steps for one frame (multi-frame files: the middle frame unless one is chosen):
1. decode the pixel data with pydicom (compressed transfer syntaxes need a
   decoder plugin; without one we say which to install);
2. grayscale (MONOCHROME1/2): the modality LUT (RescaleSlope/Intercept or a
   Modality LUT Sequence), then the VOI LUT or window centre/width (first
   values) with pydicom, then map the VOI output range to 0..255 (without a
   window or VOI LUT: the frame's own value range, as for 16-bit images);
   MONOCHROME1 is inverted so that higher values are darker, as it specifies;
3. colour: RGB/YBR as pydicom decodes them (YBR converted to RGB), palette
   colour through its lookup table, scaled to 8 bits by bit depth.
pydicom is an optional dependency: `pip install huatuo-lite[dicom]`.

Limits: the header (Rows, Columns, SamplesPerPixel, NumberOfFrames) is checked
before any pixel is decoded; only the chosen frame is decoded (pydicom's
`index=`), so what is allocated is one frame, padded to a square later.
Whatever else pydicom raises on a malformed file becomes one ImageError sentence.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from . import limits
from ..errors import HuatuoError, ImageError
from .scale import scale_to_uint8


def load_dicom(source, frame: int | None = None, name: str | None = None) -> Image.Image:
    """A DICOM path or binary file object -> RGB PIL image of one frame."""
    name = name or str(source)
    try:
        return _load(source, frame, name)
    except HuatuoError:
        raise
    except Exception as err:   # pydicom raises many kinds on malformed elements
        raise ImageError(f"The DICOM file {name} cannot be displayed ({_reason(err)}): "
                         "re-export the image.") from None


def probe_dicom(source, name: str) -> int:
    """The pixels of the chosen frame's padded square, from the header alone (the
    per-image limit applied); the same ImageError as load_dicom for a bad header."""
    try:
        ds = _read_dataset(source, name, stop_before_pixels=True)
        return _check_header(ds, name)[1]
    except HuatuoError:
        raise
    except Exception as err:
        raise ImageError(f"The DICOM file {name} cannot be displayed ({_reason(err)}): "
                         "re-export the image.") from None


def _reason(err: Exception) -> str:
    text = " ".join(str(err).split())[:200]
    return text or type(err).__name__


def _check_header(ds, name: str) -> tuple[int, int]:
    """(frames, padded square pixels) after refusing sizes that are absent or absurd."""
    rows, cols = _header_int(ds, "Rows", name), _header_int(ds, "Columns", name)
    samples = _header_int(ds, "SamplesPerPixel", name, default=1)
    frames = _header_int(ds, "NumberOfFrames", name, default=1)
    if frames < 0:
        raise ImageError(f"The DICOM file {name} gives a negative Number of Frames ({frames}): "
                         "re-export the image.")
    if samples not in (1, 3):
        raise ImageError(f"The DICOM file {name} has {samples} samples per pixel, not 1 "
                         "(grayscale) or 3 (colour): re-export the image.")
    return max(frames, 1), limits.check_image_size(cols, rows, name)


def _header_int(ds, keyword: str, name: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is not None:
            return default
        raise ImageError(f"The DICOM file {name} has no {keyword} element: re-export the image.")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ImageError(f"The DICOM file {name} has {keyword} {value!r}, which is not a whole "
                         "number: re-export the image.") from None


def _load(source, frame: int | None, name: str) -> Image.Image:
    ds = _read_dataset(source, name)
    n_frames = _check_header(ds, name)[0]
    index = n_frames // 2 if frame is None else frame
    if not 0 <= index < n_frames:
        raise ImageError(f"The DICOM file {name} has {n_frames} frames, so there is no frame "
                         f"{frame}: choose one from 0 to {n_frames - 1}.")
    pixels = _decode_frame(ds, index if n_frames > 1 else None, name)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    to_uint8 = _PHOTOMETRIC_TO_UINT8.get(photometric, _colour_to_uint8)
    return Image.fromarray(np.ascontiguousarray(to_uint8(pixels, ds, name))).convert("RGB")


def _pydicom():
    try:
        import pydicom
        import pydicom.pixels
    except ImportError:
        raise ImageError("Reading DICOM files needs pydicom: install huatuo-lite[dicom] "
                         "(pip install 'huatuo-lite[dicom]').") from None
    return pydicom


def _read_dataset(source, name: str, stop_before_pixels: bool = False):
    pydicom = _pydicom()
    try:
        # force: files without the 128-byte preamble (but a .dcm name) are common.
        ds = pydicom.dcmread(source, force=True, stop_before_pixels=stop_before_pixels)
    except Exception as err:   # pydicom raises many kinds on garbage input
        raise ImageError(f"The file {name} is not a readable DICOM file ({_reason(err)}): "
                         "check that it is a DICOM image.") from None
    if stop_before_pixels:
        return ds
    if "PixelData" not in ds:
        raise ImageError(f"The DICOM file {name} holds no image (no Pixel Data): "
                         "choose a DICOM file of an image series.")
    return ds


def _decode_frame(ds, index: int | None, name: str) -> np.ndarray:
    """[rows, cols] or [rows, cols, 3] samples of one frame (YBR converted to RGB)."""
    pydicom = _pydicom()
    try:
        return pydicom.pixels.pixel_array(ds, index=index)
    except Exception as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_compressed:
            raise ImageError(
                f"The DICOM file {name} is compressed as {syntax.name}, which no installed "
                "decoder can read: install pylibjpeg with pylibjpeg-libjpeg, "
                "pylibjpeg-openjpeg and pylibjpeg-rle (or python-gdcm), or export it "
                "uncompressed.") from None
        raise ImageError(f"The pixel data of the DICOM file {name} cannot be decoded "
                         f"({_reason(err)}): re-export the image.") from None


# ------------------------------------------------------------ grayscale ----
def _monochrome2(pixels: np.ndarray, ds, name: str) -> np.ndarray:
    processing = _pydicom().pixels
    values = processing.apply_modality_lut(pixels, ds)   # stored values -> e.g. HU
    if not _has_voi(ds):
        return scale_to_uint8(values, name)
    _check_window(ds, name)
    low, high = _voi_output_range(ds)
    shown = processing.apply_voi_lut(values, ds).astype(np.float64)
    if high <= low:
        return scale_to_uint8(shown, name)
    return np.rint(np.clip((shown - low) * (255.0 / (high - low)), 0, 255)).astype(np.uint8)


def _monochrome1(pixels: np.ndarray, ds, name: str) -> np.ndarray:
    # MONOCHROME1: the minimum value is displayed white.
    return 255 - _monochrome2(pixels, ds, name)


def _has_voi(ds) -> bool:
    return bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)


def _check_window(ds, name: str) -> None:
    """pydicom refuses a LINEAR window narrower than 1 (others: not above 0) with a
    ValueError; the file is wrong, so say so rather than guess a display."""
    if ds.get("VOILUTSequence") or "WindowWidth" not in ds or "WindowCenter" not in ds:
        return
    width = ds.WindowWidth
    first = width[0] if _is_multi(width) else width
    try:
        first = float(first)
    except (TypeError, ValueError):
        raise ImageError(f"The DICOM file {name} has the Window Width {first!r}, which is not a "
                         "number: correct or remove its window.") from None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    linear = function == "LINEAR"
    if (first < 1) if linear else not first > 0:
        least = "at least 1" if linear else "more than 0"
        raise ImageError(f"The DICOM file {name} has the Window Width {first:g}, but a {function} "
                         f"window must be {least} wide: correct or remove its window.")


def _is_multi(value) -> bool:
    return hasattr(value, "__getitem__") and not isinstance(value, (str, bytes))


def _voi_output_range(ds) -> tuple[float, float]:
    """The range the VOI step maps into: a LUT's bit depth, or the window's limits.

    For windowing, pydicom clamps values outside the window to its y_min/y_max,
    so applying it to two extreme values gives exactly that range.
    """
    sequence = ds.get("VOILUTSequence")
    if sequence:
        bits = int(sequence[0].LUTDescriptor[2])
        return 0.0, float(2 ** bits - 1)
    extremes = np.array([-1e300, 1e300], dtype=np.float64)
    with np.errstate(over="ignore"):
        low, high = _pydicom().pixels.apply_windowing(extremes, ds)
    return float(low), float(high)


# --------------------------------------------------------------- colour ----
def _colour_to_uint8(pixels: np.ndarray, ds, name: str) -> np.ndarray:
    """RGB (pydicom has already converted YBR): 8-bit as is, deeper by bit depth."""
    if pixels.ndim != 3:
        raise ImageError(f"The DICOM file {name} has the photometric interpretation "
                         f"{ds.get('PhotometricInterpretation')}, which huatuo-lite cannot "
                         "display: export it as MONOCHROME2 or RGB.")
    bits = int(ds.get("BitsStored", 8) or 8)
    return _by_bit_depth(pixels, bits)


def _palette_to_uint8(pixels: np.ndarray, ds, name: str) -> np.ndarray:
    if "RedPaletteColorLookupTableDescriptor" not in ds:
        raise ImageError(f"The DICOM file {name} is PALETTE COLOR but has no palette (Red/Green/Blue "
                         "Palette Color Lookup Table): re-export it as RGB or MONOCHROME2.")
    rgb = _pydicom().pixels.apply_color_lut(pixels, ds)
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    return _by_bit_depth(rgb, bits)


def _by_bit_depth(values: np.ndarray, bits: int) -> np.ndarray:
    if values.dtype == np.uint8 and bits <= 8:
        return values
    top = float(2 ** bits - 1)
    return np.rint(np.clip(values.astype(np.float64) * (255.0 / top), 0, 255)).astype(np.uint8)


_PHOTOMETRIC_TO_UINT8 = {
    "MONOCHROME1": _monochrome1,
    "MONOCHROME2": _monochrome2,
    "PALETTE COLOR": _palette_to_uint8,
}
