"""image_limits: regular files only, a byte cap, per-image pixels counted as the
padded square, and the per-request budget, all refused before decoding."""
from __future__ import annotations

import io
import os
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from huatuo_lite.families import common, llava as family
from huatuo_lite.image import load as im
from huatuo_lite.image import limits
from huatuo_lite.errors import ImageError


def _png_header_only(width, height) -> bytes:
    """A PNG whose header claims width x height (1-bit) and whose data is tiny."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _one_sentence(message: str) -> None:
    assert "\n" not in message and message.endswith(".") and "Traceback" not in message


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any image is decoded (Image.load) or converted."""
    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded before the limits were checked")
    monkeypatch.setattr(Image.Image, "load", refuse)
    monkeypatch.setattr(Image.Image, "convert", refuse)


def test_wide_image_is_counted_as_its_padded_square(tmp_path, no_decoding):
    # 65000x1 is 65000 pixels, but expand2square would allocate 65000^2 of them.
    path = tmp_path / "wide.png"
    path.write_bytes(_png_header_only(65000, 1))
    for load in (im.load_image, lambda src: im.load_request([src])):
        with pytest.raises(ImageError) as info:
            load(path)
        message = str(info.value)
        _one_sentence(message)
        assert str(path) in message and "65000x1" in message and "4,225,000,000" in message


def test_request_budget_refuses_before_decoding(tmp_path, monkeypatch, no_decoding):
    monkeypatch.delenv(limits.REQUEST_PIXELS_ENV, raising=False)
    side = int(family.MAX_REQUEST_PIXELS ** 0.5 * 0.6)     # each image fits, three do not
    paths = []
    for index in range(3):
        paths.append(tmp_path / f"big{index}.png")
        paths[-1].write_bytes(_png_header_only(side, side))
    with pytest.raises(ImageError) as info:
        im.load_request(paths)
    message = str(info.value)
    _one_sentence(message)
    assert "3 images of this request" in message and limits.REQUEST_PIXELS_ENV in message
    assert f"{3 * side * side:,}" in message and f"{family.MAX_REQUEST_PIXELS:,}" in message


def test_request_budget_env_var(monkeypatch):
    images = [np.zeros((10, 20), np.uint8), Image.new("RGB", (5, 5))]   # squares: 400 + 25
    monkeypatch.setenv(limits.REQUEST_PIXELS_ENV, "424")
    with pytest.raises(ImageError, match="425 pixels once padded to squares, more than the budget of 424"):
        im.load_request(images)
    monkeypatch.setenv(limits.REQUEST_PIXELS_ENV, "425")
    assert im.load_request(images).shape == (2, 3, family.IMAGE_SIZE, family.IMAGE_SIZE)
    monkeypatch.setenv(limits.REQUEST_PIXELS_ENV, "lots")
    with pytest.raises(ImageError, match="is not a positive whole number"):
        im.load_request(images)


def test_load_request_equals_preprocess_for_every_source(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    path = tmp_path / "a.png"
    rgb.save(path)
    data = path.read_bytes()
    sources = [str(path), path, data, io.BytesIO(data), rgb, np.asarray(rgb)]
    expected = im.preprocess([rgb])[0]
    got = im.load_request(sources)
    assert got.shape == (len(sources), 3, family.IMAGE_SIZE, family.IMAGE_SIZE)
    for row in got:
        np.testing.assert_array_equal(row, expected)


def test_file_object_name_is_kept(tmp_path):
    handle = io.BytesIO(b"not an image at all")
    handle.name = "upload.png"
    with pytest.raises(ImageError, match="The file upload.png is not an image"):
        im.load_request([handle])


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    done = {}

    def attempt():
        for load in (im.load_image, lambda src: im.load_request([src])):
            try:
                load(fifo)
            except ImageError as err:
                done.setdefault("messages", []).append(str(err))

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():            # unblock the reader so the test process can exit
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        pytest.fail("reading a FIFO blocked")
    assert len(done["messages"]) == 2
    for message in done["messages"]:
        _one_sentence(message)
        assert f"{fifo} is not a regular file" in message


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_devices_are_refused(device):
    if not os.path.exists(device):
        pytest.skip(f"no {device} here")
    with pytest.raises(ImageError, match=f"{device} is not a regular file"):
        im.load_image(device)


def test_proc_mem_is_one_sentence():
    if not os.path.exists("/proc/self/mem"):
        pytest.skip("no /proc here")
    with pytest.raises(ImageError) as info:
        im.load_request(["/proc/self/mem"])
    _one_sentence(str(info.value))
    assert "/proc/self/mem" in str(info.value)


def test_bytes_read_are_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "MAX_IMAGE_FILE_BYTES", 1000)
    path = tmp_path / "big.png"
    path.write_bytes(b"\0" * 1001)
    for load in (im.load_image, lambda src: im.load_request([src])):
        with pytest.raises(ImageError, match="is larger than 1,000 bytes"):
            load(path)
    with pytest.raises(ImageError, match="larger than 1,000 bytes"):
        im.load_image(io.BytesIO(b"\0" * 1001))
    # A file that grows after the size check is still read only up to the cap.
    path.write_bytes(b"\0" * 10)
    monkeypatch.setattr(limits, "check_regular_file", lambda *args: 10)
    path.write_bytes(b"\0" * 5000)
    with pytest.raises(ImageError, match="larger than 1,000 bytes"):
        limits.read_capped(path)


def test_missing_and_folder_still_say_so(tmp_path):
    with pytest.raises(ImageError, match="Cannot find the image file"):
        im.load_request([tmp_path / "nope.png"])
    with pytest.raises(ImageError, match="is a folder, not an image file"):
        im.load_request([tmp_path])


def test_unsupported_pil_format_is_refused(tmp_path):
    # EPS would run Ghostscript; formats we do not name are not opened at all.
    path = tmp_path / "x.ppm"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(ImageError, match="is not an image huatuo-lite can read"):
        im.load_image(path)
