"""A small PubMedVision-format training set: a few distinct drawn images, fixed answers."""
from __future__ import annotations

import json
from pathlib import Path

# (file, shape, colour, answer to "What is shown?", answer to "Which colour is it?")
SHAPES = (
    ("red_square.png", "square", (220, 30, 30), "A red square.", "Red."),
    ("blue_circle.png", "circle", (30, 60, 220), "A blue circle.", "Blue."),
    ("green_triangle.png", "triangle", (30, 180, 60), "A green triangle.", "Green."),
    ("yellow_bar.png", "bar", (230, 210, 40), "A yellow bar.", "Yellow."),
)
QUESTION = "What is shown in this image?"
FOLLOW_UP = "Which colour is it?"


def draw(path: Path, shape: str, colour: tuple, size: int = 96) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (0, 0, 0))
    pen = ImageDraw.Draw(img)
    box = (16, 16, size - 16, size - 16)
    drawers = {
        "square": lambda: pen.rectangle(box, fill=colour),
        "circle": lambda: pen.ellipse(box, fill=colour),
        "triangle": lambda: pen.polygon([(size // 2, 12), (12, size - 12), (size - 12, size - 12)], fill=colour),
        "bar": lambda: pen.rectangle((8, size // 2 - 10, size - 8, size // 2 + 10), fill=colour),
    }
    drawers[shape]()
    img.save(path)


def make_dataset(folder: Path, follow_up: bool = True) -> Path:
    """images/*.png + data.json (one record per image; image paths relative to the JSON)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for name, shape, colour, answer, colour_answer in SHAPES:
        draw(folder / "images" / name, shape, colour)
        turns = [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": answer}]
        if follow_up:
            turns += [{"from": "human", "value": FOLLOW_UP}, {"from": "gpt", "value": colour_answer}]
        records.append({"image": [f"images/{name}"], "conversations": turns,
                        "modality": "synthetic", "body_part": "none"})
    path = folder / "data.json"
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def targets() -> list:
    """(image file name, question, expected answer) of every first turn."""
    return [(name, QUESTION, answer) for name, _, _, answer, _ in SHAPES]
