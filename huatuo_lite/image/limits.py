"""Resource limits on image input, checked before any pixel is decoded.

- Only regular files are read (a FIFO would block, /dev/zero never ends), and at
  most `family.MAX_IMAGE_FILE_BYTES` of them (a file may grow after the check).
- One image may allocate at most `family.MAX_IMAGE_PIXELS` pixels, counted as
  expand2square allocates them: max(width, height)^2 (a 65000x1 PNG pads to
  a 65000x65000 square, 12.7 GB of RGB).
- One request (all images of one ask, API call, server request or batch record)
  may allocate at most `max_request_pixels()` pixels in all: the default
  `family.MAX_REQUEST_PIXELS`, or the environment variable
  HUATUO_LITE_MAX_REQUEST_PIXELS.
"""
from __future__ import annotations

import os
import stat

from ..families import common as family
from ..errors import ImageError

REQUEST_PIXELS_ENV = "HUATUO_LITE_MAX_REQUEST_PIXELS"


def square_pixels(width: int, height: int) -> int:
    """Pixels of the square expand2square pads an image to."""
    return max(int(width), int(height)) ** 2


def check_image_size(width: int, height: int, name: str) -> int:
    """Refuse an empty image or one whose padded square exceeds the per-image limit;
    returns the square's pixel count."""
    if width <= 0 or height <= 0:
        raise ImageError(f"The image {name} has no pixels ({width}x{height}): use a real image.")
    square = square_pixels(width, height)
    if square > family.MAX_IMAGE_PIXELS:
        raise ImageError(
            f"The image {name} ({width}x{height} pixels, {square:,} once padded to a square) is "
            f"larger than the limit of {family.MAX_IMAGE_PIXELS:,} pixels (a guard against "
            "decompression bombs): downscale it first.")
    return square


def max_request_pixels() -> int:
    """The per-request budget: HUATUO_LITE_MAX_REQUEST_PIXELS if set, else the default."""
    text = os.environ.get(REQUEST_PIXELS_ENV, "").strip()
    if not text:
        return family.MAX_REQUEST_PIXELS
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise ImageError(f"{REQUEST_PIXELS_ENV}={text!r} is not a positive whole number of pixels: "
                         f"set it to e.g. {family.MAX_REQUEST_PIXELS} or unset it.")
    return value


def check_request(squares: list[tuple[str, int]]) -> None:
    """Refuse a request whose images' padded squares (name, pixels) exceed the budget."""
    budget = max_request_pixels()
    total = sum(pixels for _, pixels in squares)
    if total > budget:
        largest = max(squares, key=lambda item: item[1])[0]
        raise ImageError(
            f"The {len(squares)} images of this request (the largest is {largest}) need "
            f"{total:,} pixels once padded to squares, more than the budget of {budget:,} "
            f"({REQUEST_PIXELS_ENV}): send fewer or smaller images, or raise the budget.")


def check_regular_file(path, name: str | None = None) -> int:
    """Refuse anything but an existing regular file of at most MAX_IMAGE_FILE_BYTES; its size."""
    name = name or str(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"Cannot find the image file {name}: check the path and try again.") from None
    except OSError as err:
        raise ImageError(f"Cannot read the image file {name} ({err.strerror}): "
                         "check the path and its permissions.") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{name} is a folder, not an image file: give the path of an image.")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{name} is not a regular file (a device, pipe or socket): "
                         "save the image to a file and give that file's path.")
    check_file_bytes(info.st_size, name)
    return info.st_size


def check_file_bytes(size: int, name: str) -> None:
    if size > family.MAX_IMAGE_FILE_BYTES:
        raise ImageError(f"The image file {name} is larger than {family.MAX_IMAGE_FILE_BYTES:,} bytes: "
                         "downscale or compress it first.")


def read_capped(path, name: str | None = None) -> bytes:
    """A regular file's bytes, never more than MAX_IMAGE_FILE_BYTES (it may grow after the stat)."""
    name = name or str(path)
    check_regular_file(path, name)
    try:
        with open(path, "rb") as handle:
            data = handle.read(family.MAX_IMAGE_FILE_BYTES + 1)
    except OSError as err:
        raise ImageError(f"Cannot read the image file {name} ({err.strerror or err}): "
                         "check the file and its permissions.") from None
    check_file_bytes(len(data), name)
    return data


def read_handle_capped(handle, name: str) -> bytes:
    """At most MAX_IMAGE_FILE_BYTES from a file object (stdin, an upload)."""
    try:
        data = handle.read(family.MAX_IMAGE_FILE_BYTES + 1)
    except OSError as err:
        raise ImageError(f"Cannot read the image {name} ({err.strerror or err}): "
                         "check where it comes from.") from None
    if isinstance(data, str):
        raise ImageError(f"The image {name} was opened as text: open it in binary mode ('rb').")
    check_file_bytes(len(data), name)
    return data
