"""image/load.py against upstream: PIL convert('RGB') + LLaVA expand2square + CLIPImageProcessor.

The upstream side is re-implemented here from HuatuoGPT-Vision's cli.py
(`Image.open(p).convert('RGB')`, its local expand2square, then
`processor.preprocess(image)` with the CLIP-L/336 preprocessor_config.json).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from huatuo_lite.families import common, llava as family
from huatuo_lite.image import load as im
from huatuo_lite.errors import ImageError
from support.bad_images import BAD_FILES, _encoded, _noise, _png_header_only

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def clip_processor():
    # As vit/clip_vit_large_patch14_336/preprocessor_config.json upstream.
    return transformers.CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": 336}, resample=3,
        do_center_crop=True, crop_size={"height": 336, "width": 336},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(family.IMAGE_MEAN), image_std=list(family.IMAGE_STD),
        do_convert_rgb=True)


def upstream_expand2square(pil_img, background_color):
    # Verbatim logic of upstream cli.py's nested expand2square.
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def upstream_pixels(path, processor) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    image = upstream_expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
    # CLIPImageProcessor guesses the channel axis: a 1x1 (or 3x3) square looks
    # channels-first to it (it raises on 1x1). Tell it the truth only there.
    hint = {"input_data_format": "channels_last"} if min(image.size) <= 3 else {}
    return processor.preprocess(image, return_tensors="np", **hint)["pixel_values"][0]


def _rgba_with_holes(height, width):
    pixels = _noise(height, width, 4, seed=3)
    pixels[::3, :, 3] = 0              # fully transparent rows keep their colour under convert
    return Image.fromarray(pixels, "RGBA")


def _palette_with_transparency(height, width):
    img = Image.fromarray(_noise(height, width, 3, seed=4)).quantize(colors=16)
    img.info["transparency"] = 2
    return img


# name -> (builder, file format)
CASES = {
    "rgb_odd_wide": (lambda: Image.fromarray(_noise(251, 401, 3)), "PNG"),
    "rgb_odd_tall": (lambda: Image.fromarray(_noise(517, 263, 3, seed=1)), "PNG"),
    "rgb_jpeg": (lambda: Image.fromarray(_noise(333, 335, 3, seed=2)), "JPEG"),
    "rgb_exact_336": (lambda: Image.fromarray(_noise(336, 336, 3, seed=5)), "PNG"),
    "rgb_large": (lambda: Image.fromarray(_noise(700, 1001, 3, seed=6)), "PNG"),
    "gray_L": (lambda: Image.fromarray(_noise(120, 77, 1, seed=7)), "PNG"),
    "gray_LA": (lambda: Image.fromarray(_noise(64, 90, 2, seed=8), "LA"), "PNG"),
    "palette_P": (lambda: Image.fromarray(_noise(99, 45, 3, seed=9)).quantize(colors=37), "PNG"),
    "palette_transparency": (lambda: _palette_with_transparency(50, 81), "PNG"),
    "rgba": (lambda: _rgba_with_holes(70, 130), "PNG"),
    "cmyk_jpeg": (lambda: Image.fromarray(_noise(80, 60, 4, seed=10), "CMYK"), "JPEG"),
    "cmyk_tiff": (lambda: Image.fromarray(_noise(31, 47, 4, seed=11), "CMYK"), "TIFF"),
    "tiny_1x1": (lambda: Image.fromarray(_noise(1, 1, 3, seed=12)), "PNG"),
    "tiny_3x500": (lambda: Image.fromarray(_noise(500, 3, 3, seed=13)), "PNG"),
    "tiny_500x3": (lambda: Image.fromarray(_noise(3, 500, 3, seed=14)), "PNG"),
    "bilevel_1": (lambda: Image.fromarray(_noise(40, 41, 1, seed=15) > 127), "PNG"),
}


def _save(tmp_path, name, img, fmt) -> str:
    path = tmp_path / f"{name}.{fmt.lower()}"
    img.save(path, fmt)
    return str(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_preprocess_equals_clip_image_processor(case, tmp_path, clip_processor):
    builder, fmt = CASES[case]
    path = _save(tmp_path, case, builder(), fmt)
    ours = im.preprocess([im.load_image(path)])
    assert ours.shape == (1, 3, family.IMAGE_SIZE, family.IMAGE_SIZE)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours[0], upstream_pixels(path, clip_processor), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["palette_P", "palette_transparency", "rgba", "gray_LA",
                                  "cmyk_jpeg", "bilevel_1"])
def test_8bit_modes_convert_exactly_like_pil(case, tmp_path):
    builder, fmt = CASES[case]
    path = _save(tmp_path, case, builder(), fmt)
    expected = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(im.load_image(path)), expected)


def test_batch_order_and_sources_agree(tmp_path):
    img_a = Image.fromarray(_noise(40, 60, 3, seed=20))
    img_b = Image.fromarray(_noise(61, 19, 3, seed=21))
    path = tmp_path / "b.png"
    img_b.save(path)
    data = path.read_bytes()
    with open(path, "rb") as handle:
        from_handle = im.load_image(handle)
    sources = [img_a, str(path), path, data, io.BytesIO(data), from_handle, np.asarray(img_b)]
    batch = im.preprocess(sources)
    assert batch.shape == (7, 3, 336, 336)
    single_b = im.preprocess(img_b)[0]
    for row in batch[1:]:
        np.testing.assert_array_equal(row, single_b)
    assert not np.array_equal(batch[0], single_b)
    assert im.preprocess([]).shape == (0, 3, 336, 336)


def test_expand2square_pads_with_mean_colour_centred():
    img = Image.new("RGB", (10, 4), (255, 0, 0))
    square = np.asarray(im.expand2square(img))
    assert square.shape == (10, 10, 3)
    assert family.PAD_COLOR == (122, 116, 104)
    assert (square[:3] == family.PAD_COLOR).all() and (square[7:] == family.PAD_COLOR).all()
    assert (square[3:7] == (255, 0, 0)).all()
    tall = np.asarray(im.expand2square(Image.new("RGB", (3, 8), (0, 255, 0))))
    assert (tall[:, :2] == family.PAD_COLOR).all() and (tall[:, 2:5] == (0, 255, 0)).all()
    assert (tall[:, 5:] == family.PAD_COLOR).all()


def test_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (30, 20), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(path).n_frames == 2
    loaded = np.asarray(im.load_image(path))
    assert (loaded == (255, 0, 0)).all()


# ------------------------------------------------------------ 16 bits ----
@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grayscale_is_scaled_by_range_not_clipped(tmp_path, fmt):
    values = (np.arange(20 * 30).reshape(20, 30) * 7 + 1000).astype(np.uint16)   # 1000..5193
    path = tmp_path / f"ct.{fmt.lower()}"
    Image.fromarray(values).save(path, fmt)
    assert Image.open(path).mode.startswith("I;16")
    assert (np.asarray(Image.open(path).convert("RGB")) == 255).all()   # what upstream gets
    loaded = np.asarray(im.load_image(path))
    expected = np.rint((values - 1000.0) * 255.0 / (values.max() - 1000.0)).astype(np.uint8)
    np.testing.assert_array_equal(loaded[..., 0], expected)
    np.testing.assert_array_equal(loaded[..., 0], loaded[..., 2])
    assert loaded.min() == 0 and loaded.max() == 255


def test_float_tiff_and_arrays_are_scaled_by_range(tmp_path):
    values = np.linspace(-3.0, 5.0, 16 * 8, dtype=np.float32).reshape(16, 8)
    path = tmp_path / "f.tiff"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    expected = np.rint((values.astype(np.float64) + 3.0) * 255.0 / 8.0).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(im.load_image(path))[..., 1], expected)
    np.testing.assert_array_equal(np.asarray(im.load_image(values))[..., 1], expected)
    rgb16 = np.stack([values * 0 + 100, values * 0 + 150, values * 0 + 300], -1).astype(np.uint16)
    assert np.asarray(im.load_image(rgb16))[0, 0].tolist() == [0, 64, 255]
    assert (np.asarray(im.load_image(np.full((4, 4), 7, np.uint16))) == 0).all()


def test_arrays_uint8_and_alpha_and_bool():
    rgba = _noise(9, 11, 4, seed=30)
    np.testing.assert_array_equal(np.asarray(im.load_image(rgba)), rgba[..., :3])
    np.testing.assert_array_equal(np.asarray(im.load_image(rgba)),
                                  np.asarray(Image.fromarray(rgba, "RGBA").convert("RGB")))
    gray = _noise(9, 11, 1, seed=31)
    np.testing.assert_array_equal(np.asarray(im.load_image(gray))[..., 2], gray)
    np.testing.assert_array_equal(np.asarray(im.load_image(gray[..., None]))[..., 0], gray)
    mask = gray > 100
    np.testing.assert_array_equal(np.asarray(im.load_image(mask))[..., 0], mask * 255)


def test_image_digest_is_stable_and_sensitive():
    pixels = im.preprocess([Image.fromarray(_noise(20, 30, 3, seed=40))])
    again = im.preprocess([Image.fromarray(_noise(20, 30, 3, seed=40))])
    assert im.image_digest(pixels) == im.image_digest(again)
    assert len(im.image_digest(pixels)) == 64
    changed = pixels.copy()
    changed[0, 1, 100, 100] += 1e-3
    assert im.image_digest(changed) != im.image_digest(pixels)
    assert im.image_digest(pixels.reshape(3, 336, 336)) != im.image_digest(pixels)


def _assert_one_sentence(message: str, expected: str):
    assert expected in message
    assert "\n" not in message and message.endswith(".")
    assert "Traceback" not in message


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_give_one_sentence(case, tmp_path):
    make, expected = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(ImageError) as info:
        im.load_image(path)
    _assert_one_sentence(str(info.value), expected)


def test_bomb_between_pil_warning_and_error_is_refused(monkeypatch):
    # Above our limit but below twice it: PIL only warns; we must still refuse.
    monkeypatch.setattr(common, "MAX_IMAGE_PIXELS", 100 * 100)
    saved = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="decompression bombs"):
        im.load_image(_png_header_only(150, 100))
    assert Image.MAX_IMAGE_PIXELS == saved          # the global is restored
    with pytest.raises(ImageError, match="decompression bombs"):
        im.load_image(np.zeros((101, 100), np.uint8))
    with pytest.raises(ImageError, match="decompression bombs"):
        im.load_image(Image.new("L", (200, 60)))
    assert im.load_image(np.zeros((100, 100), np.uint8)).size == (100, 100)


BAD_OBJECTS = {
    "unsupported_mode": (lambda: Image.frombytes("La", (4, 4), b"\0" * 32), "pixel mode La"),
    "not_a_source": (lambda: 42, "Cannot read an image from a int"),
    "array_5_channels": (lambda: np.zeros((4, 4, 5), np.uint8), "is not HxW"),
    "array_4d": (lambda: np.zeros((1, 4, 4, 3), np.uint8), "is not HxW"),
    "array_empty": (lambda: np.zeros((0, 4), np.uint8), "has no pixels"),
    "array_complex": (lambda: np.zeros((4, 4), np.complex64), "dtype complex64"),
    "array_nan": (lambda: np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN or infinite"),
    "empty_bytes": (lambda: b"", "is empty"),
    "truncated_pil": (lambda: Image.open(io.BytesIO(_encoded("PNG")[:-300])),
                      "truncated or damaged"),
}


@pytest.mark.parametrize("case", sorted(BAD_OBJECTS))
def test_bad_objects_give_one_sentence(case):
    make, expected = BAD_OBJECTS[case]
    with pytest.raises(ImageError) as info:
        im.load_image(make())
    _assert_one_sentence(str(info.value), expected)
