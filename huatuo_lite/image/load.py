"""Image input: open and validate, convert to RGB, pad to a square, resize, normalize.

The steps reproduce upstream HuatuoGPT-Vision (`Image.open(p).convert('RGB')`,
LLaVA's `expand2square`, then `CLIPImageProcessor` with the CLIP-L/336 settings):

1. `load_image(source)`: a path, bytes, a file object, a PIL image or a numpy
   array -> an RGB PIL image. Only the first frame of a multi-frame file is used.
   8-bit images convert exactly as PIL's `convert('RGB')` does (palette,
   transparency and alpha handled by PIL: alpha is dropped, not composited).
   DICOM files (`.dcm`, or "DICM" at byte 128) go to `huatuo_lite.image.dicom`.
   Limits (regular files only, bytes read, pixels per image and per request)
   are checked from headers before decoding: see `huatuo_lite.image.limits`.
2. `expand2square(img)`: pad to a square with `family.PAD_COLOR`, the image
   pasted centred, exactly as LLaVA does.
3. `preprocess(images)`: resize to `family.IMAGE_SIZE` square with PIL bicubic
   (no `reducing_gap`, as transformers' resize), scale by `common.RESCALE` in
   float64 then cast to float32, normalize with CLIP's mean/std (`families.common`) in
   float32, channels first -> float32 [N, 3, 336, 336]. This is bit-for-bit
   what CLIPImageProcessor computes on the padded square (its centre crop is a
   no-op on a 336x336 image).

The one deliberate difference from upstream: 16-bit and wider images (PIL
modes I;16*, I, F; numpy arrays that are not uint8/bool), which
`convert('RGB')` would clip to white, are scaled by their value range
(min..max -> 0..255, rounded to nearest; a constant image becomes black).
(Incidentally, CLIPImageProcessor guesses the channel axis and so fails on a
1x1 image and transposes a 3x3 one; we always treat images as channels-last.)
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..families import common
from ..families import llava as family
from . import limits
from ..errors import ImageError
from .scale import scale_to_uint8

# PIL modes whose samples exceed 8 bits: convert('RGB') would clip them.
HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
DICOM_SUFFIXES = (".dcm", ".dicom")
# The formats we decode (the ones our error sentence names); PIL's others (EPS runs
# Ghostscript, some read whole files on open) are refused as unknown.
PIL_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "DIB", "TIFF", "WEBP")
_BOMB_GUARD = threading.Lock()   # Image.MAX_IMAGE_PIXELS is a process-wide setting


# ------------------------------------------------------------- loading ----
def load_image(source) -> Image.Image:
    """Any supported source -> an RGB PIL image, or ImageError with one sentence."""
    for kinds, opener in _OPENERS:
        if isinstance(source, kinds):
            return opener(source)
    if hasattr(source, "read"):
        return _from_file_object(source)
    raise ImageError(
        f"Cannot read an image from a {type(source).__name__}: pass a file path, bytes, "
        "a file object, a PIL image or a numpy array.")


def _from_path(path) -> Image.Image:
    return _from_bytes(limits.read_capped(path), name=str(path))


def _file_object_name(handle) -> str:
    return str(getattr(handle, "name", "") or "given as a file object")


def _from_file_object(handle) -> Image.Image:
    name = _file_object_name(handle)
    return _from_bytes(limits.read_handle_capped(handle, name), name=name)


def _from_bytes(data, name: str = "given as bytes") -> Image.Image:
    data = _nonempty_bytes(data, name)
    return _DECODERS[_sniff_format(data, name)](data, name)


def _nonempty_bytes(data, name: str) -> bytes:
    data = bytes(data)
    if not data:
        raise ImageError(f"The image {name} is empty (0 bytes): re-export or re-download it.")
    limits.check_file_bytes(len(data), name)
    return data


def _sniff_format(data: bytes, name: str) -> str:
    """'dicom' for DICOM files (suffix or the DICM magic at byte 128), else 'pil'."""
    if data[128:132] == b"DICM" or name.lower().endswith(DICOM_SUFFIXES):
        return "dicom"
    return "pil"


def _decode_dicom(data: bytes, name: str) -> Image.Image:
    from . import dicom   # optional dependency (pydicom), imported only for DICOM input

    return dicom.load_dicom(io.BytesIO(data), name=name)


def _decode_pil(data: bytes, name: str) -> Image.Image:
    img = _open_guarded(io.BytesIO(data), name)
    with img:
        _check_pixel_count(img.size, name)   # from the header: nothing decoded yet
        _force_decode(img, name)
        return to_rgb(img, name)


def _open_guarded(handle, name: str) -> Image.Image:
    """Image.open with our decompression-bomb limit turned into one sentence.

    PIL warns above Image.MAX_IMAGE_PIXELS and raises above twice that; we set
    the limit to ours for the duration of the call and make the warning an error.
    """
    with _BOMB_GUARD, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, common.MAX_IMAGE_PIXELS
        try:
            return Image.open(handle, formats=PIL_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(_too_large_sentence(name, None)) from None
        except UnidentifiedImageError:
            raise ImageError(
                f"The file {name} is not an image huatuo-lite can read (PNG, JPEG, GIF, BMP, "
                "TIFF, WebP or DICOM): check that the file really is an image.") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageError(f"The image {name} is damaged ({err}): re-export or re-download it."
                             ) from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _force_decode(img: Image.Image, name: str) -> None:
    # Image.open only reads the header; a truncated file fails here, not there.
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(
            f"The image {name} is truncated or damaged ({err}): re-export or re-download it."
        ) from None


def _too_large_sentence(name: str, size) -> str:
    dims = f" ({size[0]}x{size[1]} pixels)" if size else ""
    return (f"The image {name}{dims} is larger than the limit of {common.MAX_IMAGE_PIXELS:,} "
            "pixels (a guard against decompression bombs): downscale it first.")


def _check_pixel_count(size, name: str) -> int:
    return limits.check_image_size(size[0], size[1], name)


def _from_pil(img: Image.Image) -> Image.Image:
    name = str(getattr(img, "filename", "") or "given as a PIL image")
    _check_pixel_count(img.size, name)
    _force_decode(img, name)   # a lazily opened image may still be truncated
    return to_rgb(img, name)


# ------------------------------------------------------------ requests ----
def load_request(sources: Sequence, fit=None):
    """All images of one request -> float32 [N, 3, S, S] (what preprocess returns), or
    with a family's `fit` (FITS), a list of float32 [3, h, w] (preprocess_list).

    Every image's header is read first and the request refused, before any pixel is
    decoded, when their padded squares exceed the request budget; then the images
    are decoded one at a time, so the peak memory is that of the largest one."""
    sources = [_read_once(source) for source in sources]
    limits.check_request([probe(source) for source in sources])
    return preprocess(sources) if fit is None else preprocess_list(sources, fit)


def _read_once(source):
    """A file object is read now (it cannot be read twice); other sources as they are."""
    if hasattr(source, "read") and not isinstance(source, Image.Image):
        name = _file_object_name(source)
        return _NamedBytes(_nonempty_bytes(limits.read_handle_capped(source, name), name), name)
    return source


class _NamedBytes(bytes):
    """Bytes read from a file object, keeping its name for our sentences."""

    def __new__(cls, data: bytes, name: str):
        self = super().__new__(cls, data)
        self.name = name
        return self


def probe(source) -> tuple[str, int]:
    """(name, pixels of its padded square) from the header alone; the same ImageError
    as load_image for a source that cannot be read or exceeds the per-image limit."""
    if isinstance(source, Image.Image):
        name = str(getattr(source, "filename", "") or "given as a PIL image")
        return name, _check_pixel_count(source.size, name)
    if isinstance(source, np.ndarray):
        name = f"given as an array of shape {source.shape}"
        if source.ndim < 2:
            raise ImageError(f"The image {name} is not HxW (grayscale), HxWx3 (RGB) "
                             "or HxWx4 (RGBA): reshape it.")
        return name, _check_pixel_count((source.shape[1], source.shape[0]), name)
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        limits.check_regular_file(source, name)
        try:
            with open(source, "rb") as handle:
                head = handle.read(132)
        except OSError as err:
            raise ImageError(f"Cannot read the image file {name} ({err.strerror or err}): "
                             "check the file and its permissions.") from None
        _nonempty_bytes(head, name)
        return name, _PROBES[_sniff_format(head, name)](source, name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = getattr(source, "name", "given as bytes")
        data = _nonempty_bytes(source, name)
        return name, _PROBES[_sniff_format(data, name)](io.BytesIO(data), name)
    load_image(source)   # not a source we know: its one sentence
    raise AssertionError("unreachable")


def _probe_pil(source, name: str) -> int:
    img = _open_guarded(source, name)
    with img:
        return _check_pixel_count(img.size, name)


def _probe_dicom(source, name: str) -> int:
    from . import dicom

    return dicom.probe_dicom(source, name)


_PROBES = {"dicom": _probe_dicom, "pil": _probe_pil}


# ---------------------------------------------------------- conversion ----
def to_rgb(img: Image.Image, name: str = "given") -> Image.Image:
    """PIL's convert('RGB'), except that high-depth modes are scaled by their range."""
    if img.mode in HIGH_DEPTH_MODES:
        return Image.fromarray(scale_to_uint8(np.asarray(img), name)).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:
        raise ImageError(
            f"The image {name} has the pixel mode {img.mode}, which cannot be converted to RGB: "
            "save it as an 8-bit RGB or grayscale PNG.") from None


def _from_array(array: np.ndarray) -> Image.Image:
    """HxW, HxWx1, HxWx3 or HxWx4 (alpha dropped, as convert('RGB') does) -> RGB."""
    name = f"given as an array of shape {array.shape}"
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[:, :, :3] if array.shape[2] != 1 else array[:, :, 0]
    elif array.ndim != 2:
        raise ImageError(f"The image {name} is not HxW (grayscale), HxWx3 (RGB) "
                         "or HxWx4 (RGBA): reshape it.")
    _check_pixel_count((array.shape[1], array.shape[0]), name)
    kind = array.dtype.kind
    if kind not in _ARRAY_TO_UINT8:
        raise ImageError(f"The image {name} has the dtype {array.dtype}, which is not pixels: pass "
                         "unsigned integers (uint8, uint16) or floats.")
    pixels = _ARRAY_TO_UINT8[kind](array, name)
    return Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")


def _uint_to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    return array if array.dtype == np.uint8 else scale_to_uint8(array, name)


_ARRAY_TO_UINT8 = {
    "b": lambda array, name: array.astype(np.uint8) * 255,
    "u": _uint_to_uint8,
    "i": scale_to_uint8,
    "f": scale_to_uint8,
}

# Order matters: bytes before the generic file-object check in load_image.
_OPENERS = (
    (Image.Image, _from_pil),
    (np.ndarray, _from_array),
    ((str, os.PathLike), _from_path),
    (_NamedBytes, lambda data: _from_bytes(data, data.name)),
    ((bytes, bytearray, memoryview), _from_bytes),
)
_DECODERS = {"dicom": _decode_dicom, "pil": _decode_pil}


# -------------------------------------------------------- preprocessing ----
def expand2square(img: Image.Image) -> Image.Image:
    """Pad to a square with the mean colour, the image centred (LLaVA's expand2square)."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), family.PAD_COLOR)
    offset = (0, (width - height) // 2) if width > height else ((height - width) // 2, 0)
    result.paste(img, offset)
    return result


def fit_llava(img: Image.Image, side: int | None = None) -> Image.Image:
    """LLaVA: pad to a square, then resize to `side` (default family.IMAGE_SIZE; a tiny tower's
    own size for the converter's probes) with PIL bicubic, no reducing_gap, as transformers' resize."""
    side = side or family.IMAGE_SIZE
    return expand2square(img).resize((side, side), resample=Image.Resampling.BICUBIC)


def fit_qwen25vl(img: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Qwen2.5-VL: no padding; resize to smart_resize's multiple of 28 px (PIL bicubic, as
    Qwen2VLImageProcessor's slow path), the area within the model's min/max pixels."""
    from ..families import qwen25vl

    width, height = img.size
    new_h, new_w = qwen25vl.smart_resize(height, width, min_pixels or qwen25vl.MIN_PIXELS,
                                         max_pixels or qwen25vl.MAX_PIXELS)
    return img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


# family -> how an RGB image is brought to the model's input size (then normalized alike)
FITS = {"llava": fit_llava, "qwen25vl": fit_qwen25vl}


def pixel_values(img: Image.Image, fit=fit_llava) -> np.ndarray:
    """One RGB image -> float32 [3, h, w] normalized pixels ([3, 336, 336] for LLaVA)."""
    fitted = fit(img)
    # transformers rescales in float64 and casts to float32, then normalizes in float32.
    scaled = (np.asarray(fitted).astype(np.float64) * common.RESCALE).astype(np.float32)
    mean = np.asarray(common.CLIP_MEAN, dtype=np.float32)
    std = np.asarray(common.CLIP_STD, dtype=np.float32)
    return ((scaled - mean) / std).transpose(2, 0, 1)   # [h, w, 3] -> [3, h, w]


def preprocess(images: Sequence | Image.Image) -> np.ndarray:
    """Images (or any sources load_image accepts) -> float32 [N, 3, S, S] (LLaVA)."""
    if isinstance(images, Image.Image):
        images = [images]
    side = family.IMAGE_SIZE
    batch = np.empty((len(images), 3, side, side), dtype=np.float32)
    for index, source in enumerate(images):
        # No name holds the decoded image: it is freed before the next one is decoded.
        batch[index] = pixel_values(source if _is_rgb(source) else load_image(source))
    return batch


def preprocess_list(images: Sequence, fit) -> list[np.ndarray]:
    """Images -> one float32 [3, h, w] array each, brought to size by `fit` (sizes may differ)."""
    return [pixel_values(source if _is_rgb(source) else load_image(source), fit) for source in images]


def _is_rgb(source) -> bool:
    return isinstance(source, Image.Image) and source.mode == "RGB"


def image_digest(pixels: np.ndarray) -> str:
    """sha256 hex of a preprocessed array (dtype and shape included): an embedding-cache key."""
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.sha256(f"{pixels.dtype.str}{pixels.shape}".encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()
