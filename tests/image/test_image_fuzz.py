"""Generated bad inputs for the image and DICOM loaders (hypothesis).

The property: every input either loads (an RGB image, or a [N, 3, 336, 336]
batch) or raises ImageError with one sentence; nothing else escapes, nothing
hangs, and memory stays bounded (the per-image limit is lowered to 2 MP here so
that absurd but "allowed" headers cost milliseconds, not gigabytes).

The fast profile runs in `pytest -q` (a few seconds); the long one is marked
`long` and runs only with `pytest --long` (many more examples).
"""
from __future__ import annotations

import io
import os
import resource
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from huatuo_lite.families import common, llava as family
from huatuo_lite.image import load as im
from huatuo_lite.errors import ImageError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

LONG = os.environ.get("HUATUO_LITE_LONG") == "1"          # set by `pytest --long`
FAST_EXAMPLES, LONG_EXAMPLES = 300, 3000
TEST_LIMIT = 2_000_000          # pixels per image while fuzzing
RSS_GROWTH_LIMIT_MB = 600       # a decoded absurd header would take gigabytes


def _profile(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=not LONG,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def assert_loads_or_one_sentence(load, source):
    try:
        result = load(source)
    except ImageError as err:
        message = str(err)
        assert message and "\n" not in message and message.endswith("."), message
        assert ": " in message and "Traceback" not in message, message   # says what to do
        assert len(message) < 700, message
        return None
    if isinstance(result, Image.Image):
        assert result.mode == "RGB" and min(result.size) >= 1
    else:
        assert result.shape == (1, 3, family.IMAGE_SIZE, family.IMAGE_SIZE)
    return result


def load_one(source):
    return im.load_image(source)


def load_as_request(source):
    return im.load_request([source])


# ------------------------------------------------------------ headers ----
def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@st.composite
def png_files(draw):
    width, height = draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1))
    depth = draw(st.sampled_from([1, 2, 4, 8, 16, 3, 0]))
    colour = draw(st.sampled_from([0, 2, 3, 4, 6, 5]))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, draw(st.integers(0, 1)))
    idat = zlib.compress(draw(st.binary(max_size=300)))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


@st.composite
def jpeg_files(draw):
    height, width = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
    components = draw(st.sampled_from([1, 3, 4, 0, 2]))
    sof = struct.pack(">BHHB", 8, height, width, components) + b"".join(
        bytes([i + 1, 0x11, 0]) for i in range(components))
    return (b"\xff\xd8\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof
            + draw(st.binary(max_size=200)) + b"\xff\xd9")


@st.composite
def gif_files(draw):
    width, height = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + descriptor
            + b"\x02" + draw(st.binary(max_size=100)) + b"\x00;")


@st.composite
def bmp_files(draw):
    width, height = draw(st.integers(-2**31, 2**31 - 1)), draw(st.integers(-2**31, 2**31 - 1))
    bits = draw(st.sampled_from([1, 4, 8, 16, 24, 32, 0, 7]))
    compression = draw(st.sampled_from([0, 1, 2, 3, 9]))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, compression, 0, 0, 0, 0, 0)
    body = draw(st.binary(max_size=300))
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(body), 0, 0, 14 + len(info)) + info + body


@st.composite
def tiff_files(draw):
    width, height = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
    samples = draw(st.sampled_from([1, 3, 4, 0, 2]))
    bits = draw(st.sampled_from([1, 8, 16, 32, 0, 12]))
    compression = draw(st.sampled_from([1, 5, 7, 8, 32773, 2]))
    photometric = draw(st.sampled_from([0, 1, 2, 3, 5, 6]))
    data = draw(st.binary(max_size=200))
    entries = [(256, 4, width), (257, 4, height), (258, 3, bits), (259, 3, compression),
               (262, 3, photometric), (273, 4, 8 + 2 + 12 * 9 + 4), (277, 3, samples),
               (278, 4, draw(st.integers(0, 2**32 - 1))), (279, 4, len(data))]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, kind, 1, value) if kind == 4
        else struct.pack("<HHIHH", tag, kind, 1, value & 0xFFFF, 0) for tag, kind, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00" + data


def _valid_files() -> dict:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8))
    files = {}
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
        buffer = io.BytesIO()
        rgb.save(buffer, fmt)
        files[fmt] = buffer.getvalue()
    return files


VALID = _valid_files()


@st.composite
def mutated_files(draw):
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(1, 8))):
        action, at = draw(st.integers(0, 3)), draw(st.integers(0, len(data) - 1)) if data else 0
        if action == 0 and data:
            data[at] = draw(st.integers(0, 255))
        elif action == 1:
            del data[at:at + draw(st.integers(1, 64))]
        elif action == 2:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at:at + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 65535, 2**31 - 1, 2**32 - 1])))
    return bytes(data)


IMAGE_BYTES = st.one_of(st.binary(max_size=2048), png_files(), jpeg_files(), gif_files(),
                        bmp_files(), tiff_files(), mutated_files())


# -------------------------------------------------------------- DICOM ----
@st.composite
def dicom_files(draw):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                             JPEGBaseline8Bit, RLELossless, SecondaryCaptureImageStorage)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    # a fixed UID: generate_uid() would change the file length between runs (a flaky strategy)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    syntax = draw(st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                   RLELossless, JPEGBaseline8Bit]))
    ds.file_meta.TransferSyntaxUID = syntax
    small = st.integers(0, 40)
    ds.Rows = draw(st.one_of(small, st.integers(0, 65535)))
    ds.Columns = draw(st.one_of(small, st.integers(0, 65535)))
    ds.SamplesPerPixel = draw(st.sampled_from([1, 3, 0, 2, 4]))
    ds.BitsAllocated = draw(st.sampled_from([8, 16, 1, 32, 0, 7, 64]))
    ds.BitsStored = draw(st.sampled_from([8, 12, 16, 1, 0, 40]))
    ds.HighBit = draw(st.integers(0, 63))
    ds.PixelRepresentation = draw(st.integers(0, 2))
    ds.PhotometricInterpretation = draw(st.sampled_from(
        ["MONOCHROME2", "MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "HSV", ""]))
    if draw(st.booleans()):
        ds.PlanarConfiguration = draw(st.integers(0, 2))
    if draw(st.booleans()):
        ds.NumberOfFrames = draw(st.one_of(st.integers(-5, 5), st.integers(-2**31, 2**31 - 1)))
    numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                        st.sampled_from([0, -1, 1, 0.5, 4096]))
    for keyword in ("WindowWidth", "WindowCenter", "RescaleSlope", "RescaleIntercept"):
        if draw(st.booleans()):
            setattr(ds, keyword, f"{draw(numbers):.6g}"[:16])
    if draw(st.booleans()):
        ds.VOILUTFunction = draw(st.sampled_from(["LINEAR", "SIGMOID", "LINEAR_EXACT", "BOGUS"]))
    if ds.PhotometricInterpretation == "PALETTE COLOR" and draw(st.booleans()):
        descriptor = [draw(st.integers(0, 65535)), draw(st.integers(0, 65535)), draw(st.sampled_from([8, 16, 0, 3]))]
        for colour in ("Red", "Green", "Blue"):
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", descriptor)
            setattr(ds, f"{colour}PaletteColorLookupTableData", draw(st.binary(max_size=64)))
    if draw(st.booleans()):   # sized as the header says, when that is small
        expected = ds.Rows * ds.Columns * max(ds.SamplesPerPixel, 1) * max(ds.BitsAllocated // 8, 1)
        pixels = draw(st.binary(min_size=min(expected, 4096), max_size=min(expected, 4096)))
    else:
        pixels = draw(st.binary(max_size=512))
    if syntax.is_compressed:
        ds.PixelData = encapsulate([pixels + b"\x00" * (len(pixels) % 2) or b"\x00\x00"])
    else:
        ds.PixelData = pixels + b"\x00" * (len(pixels) % 2)
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
    except Exception:   # a value pydicom cannot write: not an input a file can hold
        hypothesis.reject()
    return buffer.getvalue()


# ------------------------------------------------------------- checks ----
def _property(strategy, load):
    def check(data):
        assert_loads_or_one_sentence(load, data)   # hypothesis wants None back
    return lambda examples: given(strategy)(settings(_profile(examples))(check))


def _dicom_mutated():
    return dicom_files().flatmap(lambda data: st.tuples(
        st.just(data), st.lists(st.tuples(st.integers(0, max(len(data) - 1, 0)), st.integers(0, 255)),
                                max_size=6)).map(_flip))


def _flip(pair):
    data, flips = bytearray(pair[0]), pair[1]
    for at, value in flips:
        if at < len(data):
            data[at] = value
    return bytes(data)


PROPERTIES = {
    "image_bytes": lambda: _property(IMAGE_BYTES, load_one),
    "image_request": lambda: _property(IMAGE_BYTES, load_as_request),
    "dicom": lambda: _property(dicom_files(), load_one),
    "dicom_request": lambda: _property(dicom_files(), load_as_request),
    "dicom_mutated": lambda: _property(_dicom_mutated(), load_one),
}


@pytest.fixture
def small_limit(monkeypatch):
    monkeypatch.setattr(common, "MAX_IMAGE_PIXELS", TEST_LIMIT)
    monkeypatch.setattr(common, "MAX_REQUEST_PIXELS", TEST_LIMIT)
    monkeypatch.delenv("HUATUO_LITE_MAX_REQUEST_PIXELS", raising=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    yield
    # ru_maxrss is the process's high-water mark (KiB on Linux): one absurd header
    # decoded would raise it by gigabytes.
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    assert growth < RSS_GROWTH_LIMIT_MB, f"peak memory grew by {growth:.0f} MB while fuzzing"


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_generated_inputs_load_or_give_one_sentence(name, small_limit):
    if name.startswith("dicom"):
        pytest.importorskip("pydicom")
    PROPERTIES[name]()(FAST_EXAMPLES)()


@pytest.mark.long
@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_generated_inputs_long(name, small_limit):
    if name.startswith("dicom"):
        pytest.importorskip("pydicom")
    PROPERTIES[name]()(LONG_EXAMPLES)()


def test_the_property_can_fail():
    # The check itself must reject an escaping exception and a multi-line message.
    def escapes(_):
        raise ValueError("boom")

    def two_lines(_):
        raise ImageError("first line:\nsecond line.")

    with pytest.raises(ValueError):
        assert_loads_or_one_sentence(escapes, b"")
    with pytest.raises(AssertionError):
        assert_loads_or_one_sentence(two_lines, b"")
