"""The synthetic medical VQA set: deterministic, disjoint splits, both languages,
and every finding visible in the pixels where the ground truth says."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from huatuo_lite.convert.synth.make import make_synthetic_set
from huatuo_lite.convert.synth.draw import LESION_RADIUS, SIZE, STYLES
from huatuo_lite.families.llava import EVAL_ANSWER_SUFFIX, IMAGE_PLACEHOLDER

CJK = re.compile(r"[\u4e00-\u9fff]")
COUNTS = dict(n_train=12, n_val=3, n_test=10)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_set(tmp_path_factory.mktemp("synth") / "set", seed=7, **COUNTS)


def _load(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _digests(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(synth, tmp_path):
    again = make_synthetic_set(tmp_path / "again", seed=7, **COUNTS)
    assert _digests(again["root"]) == _digests(synth["root"])
    other = make_synthetic_set(tmp_path / "other", seed=8, n_train=0, n_val=0, n_test=3)
    assert _digests(other["images"])["test_00000.png"] != _digests(synth["images"])["test_00000.png"]


def test_splits_are_disjoint_and_test_is_never_trained_on(synth):
    cases = _load(synth["cases"])["splits"]
    images = {split: {c["image"] for c in cases[split]} for split in cases}
    assert [len(images[s]) for s in ("train", "val", "test")] == [12, 3, 10]
    assert not (images["train"] & images["test"]) and not (images["val"] & images["test"])
    digests = _digests(synth["images"])
    by_split = {s: {digests[Path(i).name] for i in images[s]} for s in images}
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
    trained = {i for r in _load(synth["train_conversations"]) for i in r["image"]}
    assert trained == images["train"]
    assert not Path(synth["root"], "test_conversations.json").exists()
    assert {i for r in _load(synth["test_vqa"]) for i in r["image"]} == images["test"]


def test_eval_items_follow_the_upstream_format_and_the_truth(synth):
    items = _load(synth["test_vqa"])
    truth = {c["image"]: c for c in _load(synth["cases"])["splits"]["test"]}
    assert len(items) >= 3 * COUNTS["n_test"]
    for item in items:
        assert set(item) >= {"question", "options", "answer", "image", "dataset", "subset"}
        assert item["answer"] in item["options"]
        assert all((Path(synth["root"]) / p).is_file() for p in item["image"])
        findings = truth[item["image"][0]]["findings"]
        if item["subset"] == "count":
            assert item["answer"] == str(findings["count"])
        if item["subset"] == "presence":
            assert item["answer"] in (("Yes", "是") if findings["count"] else ("No", "否"))
    subsets = {item["subset"] for item in items}
    assert subsets == {"modality", "presence", "count", "side", "vertical", "size"}


def test_questions_in_english_and_chinese(synth):
    items = _load(synth["test_vqa"])
    zh = [i for i in items if CJK.search(i["question"])]
    assert zh and len(zh) < len(items)
    assert {i["dataset"] for i in zh} == {"SynthMedVQA-zh"}
    conversations = _load(synth["train_conversations"])
    assert any(CJK.search(c["conversations"][0]["value"]) for c in conversations)
    assert len({i["question"] for i in items if i["subset"] == "presence"}) >= 3   # several phrasings


def test_training_conversations_are_pubmedvision_and_teach_letters(synth):
    records = _load(synth["train_conversations"])
    lettered = 0
    for record in records:
        assert set(record) >= {"image", "conversations", "modality", "body_part"}
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"]
        assert not any(IMAGE_PLACEHOLDER in t["value"] for t in turns)
        if turns[0]["value"].endswith(EVAL_ANSWER_SUFFIX):
            lettered += 1
            letter = turns[1]["value"]
            assert re.fullmatch(r"[A-E]", letter)
            assert f"\n{letter}. " in turns[0]["value"]
    assert 0 < lettered < len(records)          # lettered and open answers both present


def _disc_mean(pixels: np.ndarray, cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= max(r - 2, 2) ** 2
    return pixels[inside].mean(axis=0)


def test_every_lesion_is_visible_against_its_mirror_region(synth):
    cases = [c for split in _load(synth["cases"])["splits"].values() for c in split]
    checked = 0
    for case in cases:
        pixels = np.asarray(Image.open(Path(synth["root"]) / case["image"]).convert("RGB"), dtype=np.float64)
        findings, lesions = case["findings"], case["lesions"]
        assert len(lesions) == findings["count"]
        if STYLES[case["modality"]].symmetric and not lesions:   # no finding: nothing differs left/right
            assert np.abs(pixels - pixels[:, ::-1]).mean() < 1.0
        for lesion in lesions:
            box = STYLES[case["modality"]].boxes[(findings["side"], findings["vertical"])]
            assert box[0] <= lesion["cx"] - lesion["r"] and lesion["cx"] + lesion["r"] <= box[2]
            assert box[1] <= lesion["cy"] - lesion["r"] and lesion["cy"] + lesion["r"] <= box[3]
            assert (lesion["cx"] < SIZE // 2) == (findings["side"] == "left")
            low, high = LESION_RADIUS[findings["size"]]
            assert low <= lesion["r"] <= high
            here = _disc_mean(pixels, lesion["cx"], lesion["cy"], lesion["r"])
            mirror = _disc_mean(pixels, SIZE - 1 - lesion["cx"], lesion["cy"], lesion["r"])
            assert np.linalg.norm(here - mirror) > 40, (case["id"], here, mirror)
            checked += 1
    assert checked >= 5


def test_images_are_small_on_disk(synth):
    sizes = [p.stat().st_size for p in Path(synth["images"]).glob("*.png")]
    assert np.mean(sizes) < 8000
