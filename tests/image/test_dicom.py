"""dicom.py on DICOM files written here with pydicom: windowing, rescale,
MONOCHROME1/2, 16-bit, multi-frame, colour, and the dispatch from image.load_image."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from huatuo_lite.image import load as im
from huatuo_lite.errors import ImageError

pydicom = pytest.importorskip("pydicom")
dicom = pytest.importorskip("huatuo_lite.image.dicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import JPEGLSLossless, SecondaryCaptureImageStorage, generate_uid  # noqa: E402


def make_dataset(pixels: np.ndarray, photometric="MONOCHROME2", bits=None, **attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.set_pixel_data(pixels, photometric, bits or pixels.dtype.itemsize * 8)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def write(tmp_path, ds: Dataset, name="image.dcm"):
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def gray(path) -> np.ndarray:
    rgb = np.asarray(im.load_image(path))
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    return rgb[..., 0]


def dicom_linear_window(x, centre, width):
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR onto 0..255, written from the standard."""
    x = np.asarray(x, dtype=np.float64)
    low, high = centre - 0.5 - (width - 1) / 2, centre - 0.5 + (width - 1) / 2
    y = ((x - (centre - 0.5)) / (width - 1) + 0.5) * 255
    return np.where(x <= low, 0, np.where(x > high, 255, y))


def test_16bit_without_window_is_scaled_by_range(tmp_path):
    raw = (np.arange(40 * 30).reshape(40, 30) * 3 + 500).astype(np.uint16)     # 500..4097
    path = write(tmp_path, make_dataset(raw, bits=16))
    expected = np.rint((raw - 500.0) * 255.0 / (raw.max() - 500.0)).astype(np.uint8)
    np.testing.assert_array_equal(gray(path), expected)


def test_ct_rescale_and_window(tmp_path):
    hu = np.array([[-1000, -160, 0], [40, 240, 1000]], dtype=np.float64)
    raw = ((hu + 1024) / 1.0).astype(np.int16)                  # stored = HU + 1024
    ds = make_dataset(raw, bits=12, RescaleSlope=1, RescaleIntercept=-1024,
                      WindowCenter=[40, 300], WindowWidth=[400, 1500])
    out = gray(write(tmp_path, ds))
    expected = dicom_linear_window(hu, 40, 400)                 # the first window is used
    assert np.abs(out.astype(float) - expected).max() <= 0.5 + 1e-9
    assert out[0, 0] == 0 and out[1, 2] == 255 and 95 < out[0, 2] < 110


def test_window_mapped_by_window_not_by_data_range(tmp_path):
    # All values inside a wide window: the result stays mid-grey, not stretched.
    raw = np.array([[1000, 1010], [1020, 1030]], dtype=np.uint16)
    ds = make_dataset(raw, bits=16, WindowCenter=1015, WindowWidth=4000)
    out = gray(write(tmp_path, ds))
    np.testing.assert_allclose(out, dicom_linear_window(raw, 1015, 4000), atol=0.5 + 1e-9)
    assert out.max() - out.min() <= 2


def test_monochrome1_is_inverted(tmp_path):
    raw = (np.arange(16 * 16).reshape(16, 16) * 13).astype(np.uint16)
    mono2 = gray(write(tmp_path, make_dataset(raw, "MONOCHROME2", 12), "m2.dcm"))
    mono1 = gray(write(tmp_path, make_dataset(raw, "MONOCHROME1", 12), "m1.dcm"))
    np.testing.assert_array_equal(mono1, 255 - mono2)
    assert mono2[0, 0] == 0 and mono1[0, 0] == 255


def test_voi_lut_sequence(tmp_path):
    raw = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.LUTData = np.array([200, 100, 50, 0], np.uint16).tobytes()
    ds = make_dataset(raw, bits=16)
    ds.VOILUTSequence = [item]
    np.testing.assert_array_equal(gray(write(tmp_path, ds)), [[200, 100, 50, 0]])


def test_multiframe_middle_by_default_and_choosable(tmp_path):
    frames = np.stack([np.full((8, 9), 10 * i, np.uint8) for i in range(5)])
    frames[:, 0, 0] = 0
    frames[:, 0, 1] = 255                       # every frame spans 0..255
    path = write(tmp_path, make_dataset(frames, bits=8))
    assert gray(path)[4, 4] == 20               # frame 2 of 0..4
    assert np.asarray(dicom.load_dicom(path, frame=4))[4, 4, 0] == 40
    with pytest.raises(ImageError, match="has 5 frames, so there is no frame 7"):
        dicom.load_dicom(path, frame=7)


def test_rgb_dicom_is_exact(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    path = write(tmp_path, make_dataset(pixels, "RGB", 8))
    np.testing.assert_array_equal(np.asarray(im.load_image(path)), pixels)


def test_dispatch_by_magic_for_bytes_and_other_names(tmp_path):
    raw = (np.arange(64).reshape(8, 8) * 100).astype(np.uint16)
    path = write(tmp_path, make_dataset(raw, bits=16), "scan.bin")
    expected = np.asarray(dicom.load_dicom(path))
    np.testing.assert_array_equal(np.asarray(im.load_image(path)), expected)
    np.testing.assert_array_equal(np.asarray(im.load_image(path.read_bytes())), expected)
    assert im.preprocess([path]).shape == (1, 3, 336, 336)


def test_compressed_without_decoder_says_what_to_install(tmp_path):
    ds = make_dataset(np.zeros((8, 8), np.uint16), bits=16)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8not really jpeg-ls\xff\xd9"])
    ds["PixelData"].VR = "OB"
    path = write(tmp_path, ds)
    with pytest.raises(ImageError) as info:
        im.load_image(path)
    message = str(info.value)
    assert "compressed as JPEG-LS" in message and "pylibjpeg" in message
    assert "\n" not in message and message.endswith(".")


def test_dicom_without_pixels_and_garbage(tmp_path):
    ds = make_dataset(np.zeros((4, 4), np.uint8), bits=8)
    del ds.PixelData
    with pytest.raises(ImageError, match="holds no image"):
        im.load_image(write(tmp_path, ds))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not dicom at all" * 10)
    with pytest.raises(ImageError, match="DICOM"):
        im.load_image(junk)


def test_missing_pydicom_says_how_to_install(tmp_path, monkeypatch):
    path = write(tmp_path, make_dataset(np.zeros((4, 4), np.uint8), bits=8))
    for module in ("pydicom", "pydicom.pixels"):
        monkeypatch.setitem(sys.modules, module, None)   # import now fails
    with pytest.raises(ImageError, match=r"needs pydicom: install huatuo-lite\[dicom\]"):
        im.load_image(path)


def test_palette_colour_through_its_lut(tmp_path):
    indices = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    ds = make_dataset(indices, "PALETTE COLOR", 8)
    lut = {"Red": [65535, 0, 0, 32896], "Green": [0, 65535, 0, 32896], "Blue": [0, 0, 65535, 0]}
    for colour, values in lut.items():
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", np.array(values, np.uint16).tobytes())
    rgb = np.asarray(im.load_image(write(tmp_path, ds)))
    assert rgb.reshape(4, 3).tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 0]]


# ------------------------------------------------------------ bad headers ----
def _one_sentence(message: str, path) -> None:
    assert str(path) in message and "\n" not in message and message.endswith(".")


@pytest.mark.parametrize("width, function", [(0, None), (-5, None), (0, "SIGMOID")])
def test_window_width_below_the_minimum_is_one_sentence(tmp_path, width, function):
    raw = (np.arange(64).reshape(8, 8) * 100).astype(np.uint16)
    ds = make_dataset(raw, bits=16, WindowCenter=100, WindowWidth=width)
    if function:
        ds.VOILUTFunction = function
    path = write(tmp_path, ds)
    with pytest.raises(ImageError, match=f"has the Window Width {width}, ") as info:
        im.load_image(path)
    _one_sentence(str(info.value), path)


def test_palette_colour_without_its_table_is_one_sentence(tmp_path):
    path = write(tmp_path, make_dataset(np.zeros((4, 4), np.uint8), "PALETTE COLOR", 8))
    with pytest.raises(ImageError, match="is PALETTE COLOR but has no palette") as info:
        im.load_image(path)
    _one_sentence(str(info.value), path)


@pytest.mark.parametrize("frames, expected", [(-3, "negative Number of Frames"),
                                              ("x7", "is not a whole number")])
def test_bad_frame_count_is_one_sentence(tmp_path, frames, expected):
    ds = make_dataset(np.zeros((4, 4), np.uint8), bits=8)
    # A value IS cannot hold is written as LO, as a broken writer leaves it.
    ds.add_new(0x00280008, "IS" if isinstance(frames, int) else "LO", frames)
    path = write(tmp_path, ds)
    for load in (im.load_image, lambda src: im.load_request([src])):
        with pytest.raises(ImageError, match=expected) as info:
            load(path)
        _one_sentence(str(info.value), path)


def _rle_constant(side: int) -> Dataset:
    """An 8-bit side x side RLE DICOM of zeros: a few MB on disk, side^2 bytes decoded."""
    import struct

    from pydicom.uid import RLELossless

    runs, rest = divmod(side * side, 128)
    segment = b"\x81\x00" * runs + (bytes([rest - 1]) + b"\x00" * rest if rest else b"")
    ds = make_dataset(np.zeros((2, 2), np.uint8), bits=8)
    ds.Rows = ds.Columns = side
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([struct.pack("<16I", 1, 64, *([0] * 14)) + segment
                                + b"\0" * (len(segment) % 2)])
    ds["PixelData"].VR = "OB"
    return ds


def test_large_rle_is_refused_from_its_header(tmp_path, monkeypatch):
    # As the 410-megapixel RLE file, scaled down: the limit is checked from Rows x
    # Columns before anything is decoded (pixel_array would raise here).
    from huatuo_lite.families import common

    path = write(tmp_path, _rle_constant(300))
    monkeypatch.setattr(common, "MAX_IMAGE_PIXELS", 299 * 299)

    decoded = []
    real_pixel_array = pydicom.pixels.pixel_array
    monkeypatch.setattr(pydicom.pixels, "pixel_array",
                        lambda *args, **kwargs: decoded.append(1) or real_pixel_array(*args, **kwargs))
    for load in (im.load_image, lambda src: im.load_request([src])):
        with pytest.raises(ImageError, match=r"\(300x300 pixels, 90,000 once padded"):
            load(path)
    assert not decoded
    monkeypatch.setattr(common, "MAX_IMAGE_PIXELS", 300 * 300)   # within the limit: decoded
    assert im.load_image(path).size == (300, 300) and decoded


def test_rle_within_the_limit_loads(tmp_path):
    assert np.asarray(im.load_image(write(tmp_path, _rle_constant(40)))).max() == 0
