"""Procedural medical-looking images whose findings are known exactly.

Five modality styles (chest radiograph, chest CT slice, brain MRI, ultrasound
fan, H&E-like histology), each a small table entry: how to draw the anatomy,
where the four lesion quadrants (left/right of the image x upper/lower) lie,
and how a lesion looks. Lesions of one case share one quadrant and one size
class, so "side", "upper/lower" and "size" have one true answer.

Images are SIZE x SIZE with few grey levels or palette colours and no pixel
noise, so PNGs stay a few KB (the demo set is committed to the repo). The four
radiology styles are drawn mirror-symmetric before lesions are added: the
lesion is then the only left/right difference, which the tests check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 336                       # the model's own input side: no resampling before CLIP
GREY_STEP = 17                   # 256 / 17 ~ 16 grey levels: small PNGs
LESION_RADIUS = {"small": (6, 8), "large": (13, 16)}   # pixels at SIZE
LESION_GAP = 4                   # pixels kept between two lesions
SIDES = ("left", "right")        # of the image (not the patient's side)
VERTICALS = ("upper", "lower")


@dataclass(frozen=True)
class Lesion:
    cx: int
    cy: int
    r: int


@dataclass(frozen=True)
class Findings:
    """The ground truth of one image; side/vertical/size are None when count is 0."""

    count: int
    side: str | None = None
    vertical: str | None = None
    size: str | None = None


@dataclass(frozen=True)
class Style:
    """How one modality is drawn: anatomy, quadrant boxes (x0, y0, x1, y1), lesion look."""

    body_part: str
    draw_anatomy: Callable          # (draw, rng) -> None, on an "L" or label canvas
    boxes: dict                     # (side, vertical) -> box
    lesion_value: int               # grey level (or histology label) of a lesion
    symmetric: bool = True          # mirror the left half before lesions


# ------------------------------------------------------------- geometry ----
def _quadrants(left_cx: int, cy: int, half_w: int, top: int, bottom: int) -> dict:
    """Boxes for a left organ centred at left_cx and its mirror on the right.

    upper = [cy - top, cy - 6], lower = [cy + 6, cy + bottom]."""
    right_cx = SIZE - 1 - left_cx
    boxes = {}
    for side, cx in (("left", left_cx), ("right", right_cx)):
        boxes[(side, "upper")] = (cx - half_w, cy - top, cx + half_w, cy - 6)
        boxes[(side, "lower")] = (cx - half_w, cy + 6, cx + half_w, cy + bottom)
    return boxes


def _ellipse(draw, cx, cy, ax, ay, fill):
    draw.ellipse((cx - ax, cy - ay, cx + ax, cy + ay), fill=int(fill))


def _jitter(rng, value, spread):
    return value + int(rng.integers(-spread, spread + 1))


# ------------------------------------------------------------- anatomy ----
def _chest_xray(draw, rng):
    """Soft-tissue thorax, two dark lungs, ribs, bright mediastinum and spine."""
    c, tissue = SIZE // 2, _jitter(rng, 120, 12)
    _ellipse(draw, c, c + 20, 160, 170, tissue)
    for cx in (97, SIZE - 1 - 97):
        _ellipse(draw, cx, 168, _jitter(rng, 56, 3), _jitter(rng, 115, 4), _jitter(rng, 45, 8))
    for k in range(6):  # ribs: shallow bright arcs across both lungs
        y = 70 + 38 * k
        draw.arc((30, y - 20, SIZE - 30, y + 40), 200, 340, fill=tissue + 25, width=5)
    draw.rectangle((c - 24, 40, c + 24, SIZE - 10), fill=_jitter(rng, 170, 10))


def _chest_ct(draw, rng):
    """Axial chest: body ellipse, dark lungs, heart, bright vertebra."""
    c = SIZE // 2
    _ellipse(draw, c, c, 156, 128, _jitter(rng, 110, 10))
    for cx in (105, SIZE - 1 - 105):
        _ellipse(draw, cx, 160, _jitter(rng, 52, 3), _jitter(rng, 92, 4), _jitter(rng, 25, 6))
    _ellipse(draw, c, 175, 34, 38, 135)
    _ellipse(draw, c, 268, 22, 20, 235)


def _brain_mri(draw, rng):
    """Axial brain: bright scalp ring, grey matter, white-matter hemispheres, ventricles."""
    c = SIZE // 2
    _ellipse(draw, c, c, 132, 152, _jitter(rng, 200, 10))
    _ellipse(draw, c, c, 122, 142, _jitter(rng, 90, 10))
    for cx in (110, SIZE - 1 - 110):
        _ellipse(draw, cx, c, 50, 112, _jitter(rng, 115, 8))
    _ellipse(draw, c - 14, c, 8, 30, 40)
    draw.line((c, 30, c, SIZE - 30), fill=60, width=3)


def _ultrasound(draw, rng):
    """A 90-degree sector from an apex at the top, with tissue layers."""
    c, apex, radius = SIZE // 2, 10, 320
    box = (c - radius, apex - radius, c + radius, apex + radius)
    draw.pieslice(box, 45, 135, fill=_jitter(rng, 95, 10))
    for k, level in enumerate((120, 80, 105)):
        r = 70 + 60 * k + int(rng.integers(0, 10))
        draw.arc((c - r, apex - r, c + r, apex + r), 45, 135, fill=level, width=6)


HISTO_COLOURS = np.array([   # label -> RGB: background, stroma, nucleus, lumen, tumour nest
    (246, 240, 246), (232, 168, 200), (112, 62, 152), (250, 246, 250), (72, 30, 112),
], dtype=np.uint8)
HISTO_LESION = 4


def _histology(draw, rng):
    """Pink stroma with scattered nuclei and a few glandular lumens (labels, not greys)."""
    draw.rectangle((0, 0, SIZE, SIZE), fill=1)
    for _ in range(int(rng.integers(4, 8))):
        cx, cy = rng.integers(20, SIZE - 20, size=2)
        _ellipse(draw, int(cx), int(cy), int(rng.integers(10, 22)), int(rng.integers(8, 16)), 3)
    for cx, cy in rng.integers(0, SIZE, size=(int(rng.integers(120, 180)), 2)):
        _ellipse(draw, int(cx), int(cy), 3, 2, 2)


STYLES = {
    "xray": Style("chest", _chest_xray, _quadrants(97, 168, 40, 100, 100), 215),
    "ct": Style("chest", _chest_ct, _quadrants(105, 160, 40, 84, 84), 185),
    "mri": Style("brain", _brain_mri, _quadrants(110, 168, 44, 110, 110), 235),
    "ultrasound": Style("abdomen", _ultrasound,
                        {(s, v): (x0, y0, x0 + 90, y0 + 90)
                         for s, x0 in (("left", 66), ("right", SIZE - 1 - 66 - 90))
                         for v, y0 in (("upper", 118), ("lower", 214))}, 12),
    "histology": Style("tissue", _histology,
                       {(s, v): (x0, y0, x0 + 136, y0 + 136)
                        for s, x0 in (("left", 16), ("right", SIZE - 16 - 136))
                        for v, y0 in (("upper", 16), ("lower", SIZE - 16 - 136))},
                       HISTO_LESION, symmetric=False),
}


# ------------------------------------------------------------- lesions ----
def sample_findings(rng) -> Findings:
    """count 0 with p 0.4, else 1-3 lesions in one random quadrant and size."""
    count = int(rng.choice(4, p=(0.4, 0.2, 0.2, 0.2)))
    if count == 0:
        return Findings(0)
    return Findings(count, SIDES[rng.integers(2)], VERTICALS[rng.integers(2)],
                    ("small", "large")[rng.integers(2)])


def place_lesions(findings: Findings, box, rng, tries: int = 2000) -> list[Lesion]:
    """Non-overlapping discs fully inside `box` (rejection sampling, deterministic)."""
    if findings.count == 0:
        return []
    low, high = LESION_RADIUS[findings.size]
    x0, y0, x1, y1 = box
    placed: list[Lesion] = []
    for _ in range(tries):
        if len(placed) == findings.count:
            return placed
        r = int(rng.integers(low, high + 1))
        cand = Lesion(int(rng.integers(x0 + r, x1 - r + 1)), int(rng.integers(y0 + r, y1 - r + 1)), r)
        if all((cand.cx - o.cx) ** 2 + (cand.cy - o.cy) ** 2 >= (cand.r + o.r + LESION_GAP) ** 2 for o in placed):
            placed.append(cand)
    raise RuntimeError(f"Could not place {findings.count} lesions in {box}; enlarge the quadrant boxes.")


# --------------------------------------------------------------- render ----
def draw_case(modality: str, findings: Findings, rng, marker: tuple | None = None
              ) -> tuple[Image.Image, list[Lesion]]:
    """The image (mode "L" or "P"; "RGB" with a marker) and its lesions, for one modality
    and ground truth. marker (r, g, b): lesions are also painted in that colour on top,
    a high-contrast look no anatomy has (the demo model's easier task)."""
    style = STYLES[modality]
    canvas = Image.new("L", (SIZE, SIZE), 0)
    style.draw_anatomy(ImageDraw.Draw(canvas), rng)
    if style.symmetric:
        pixels = np.asarray(canvas).copy()                 # [SIZE, SIZE] uint8
        pixels[:, SIZE // 2:] = pixels[:, : SIZE // 2][:, ::-1]
        canvas = Image.fromarray(pixels)
    lesions = place_lesions(findings, style.boxes.get((findings.side, findings.vertical)), rng)
    draw = ImageDraw.Draw(canvas)
    for lesion in lesions:
        _ellipse(draw, lesion.cx, lesion.cy, lesion.r, lesion.r, style.lesion_value)
    finish = _finish_grey if style.symmetric else _finish_labels
    image = finish(canvas)
    if marker is not None:
        image = image.convert("RGB")
        draw = ImageDraw.Draw(image)
        for lesion in lesions:
            draw.ellipse((lesion.cx - lesion.r, lesion.cy - lesion.r, lesion.cx + lesion.r, lesion.cy + lesion.r),
                         fill=tuple(marker))
    return image, lesions


def _finish_grey(canvas: Image.Image) -> Image.Image:
    """Soften edges, then snap to ~16 grey levels (compressible PNG)."""
    soft = np.asarray(canvas.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.int32)
    return Image.fromarray(np.clip(np.round(soft / GREY_STEP) * GREY_STEP, 0, 255).astype(np.uint8))


def _finish_labels(canvas: Image.Image) -> Image.Image:
    """Histology labels [SIZE, SIZE] -> a 5-colour palette image."""
    image = Image.frombytes("P", canvas.size, canvas.tobytes())
    image.putpalette(HISTO_COLOURS.reshape(-1).tolist())
    return image
