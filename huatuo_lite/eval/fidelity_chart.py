"""The fidelity chart (fidelity.png): accuracy and agreement with the reference for each
compared model, as horizontal bars on a 0-100 % axis with the chance level marked.
Drawn with Pillow (already a runtime dependency), no plotting library."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

FIDELITY_CHART = "fidelity.png"
# (row key, legend label, bar colour)
SERIES = (("accuracy", "accuracy %", (52, 101, 164)), ("agreement", "agreement with reference %", (237, 125, 49)))
CHANCE_COLOUR = (120, 120, 120)
WIDTH, LABEL_W, RIGHT_PAD, TOP, BAR_H, GAP = 760, 150, 70, 56, 14, 18


def _x(value: float) -> int:
    """A fraction 0..1 -> the pixel column on the 0-100 % axis."""
    return LABEL_W + round(max(0.0, min(1.0, value)) * (WIDTH - LABEL_W - RIGHT_PAD))


def draw_chart(rows: Sequence[dict]) -> Image.Image:
    """rows: fidelity rows ({"spec", "accuracy", "agreement", "chance"}, fractions 0..1)."""
    font = ImageFont.load_default()
    group = len(SERIES) * BAR_H + GAP
    height = TOP + group * len(rows) + 40
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((LABEL_W, 8), "Fidelity: accuracy and agreement with the reference", fill="black", font=font)
    for i, (_, label, colour) in enumerate(SERIES):   # legend
        x = LABEL_W + i * 230
        draw.rectangle([x, 28, x + 12, 40], fill=colour)
        draw.text((x + 18, 28), label, fill="black", font=font)
    bottom = TOP + group * len(rows)
    for tick in range(0, 101, 20):                    # axis
        x = _x(tick / 100)
        draw.line([x, TOP - 4, x, bottom], fill=(225, 225, 225))
        draw.text((x - 8, bottom + 4), f"{tick}", fill="black", font=font)
    for r, row in enumerate(rows):
        y = TOP + r * group
        draw.text((8, y + BAR_H // 2), str(row["spec"])[:22], fill="black", font=font)
        for s, (key, _, colour) in enumerate(SERIES):
            top = y + s * BAR_H
            draw.rectangle([_x(0), top, _x(row[key]), top + BAR_H - 2], fill=colour)
            draw.text((_x(row[key]) + 4, top), f"{100 * row[key]:.1f}", fill="black", font=font)
    if rows and rows[0].get("chance") is not None:    # chance level of the eval set
        x = _x(rows[0]["chance"])
        for y in range(TOP - 4, bottom, 6):
            draw.line([x, y, x, y + 3], fill=CHANCE_COLOUR, width=2)
        draw.text((x + 4, bottom + 18), f"chance {100 * rows[0]['chance']:.1f}%", fill=CHANCE_COLOUR, font=font)
    return image


def write_chart(folder, rows: Sequence[dict]) -> Path:
    """fidelity.png in `folder`, written whole or not at all."""
    from ..fsutil import atomic_path

    path = Path(folder) / FIDELITY_CHART
    with atomic_path(path) as tmp:
        draw_chart(rows).save(tmp, format="PNG")
    return path
