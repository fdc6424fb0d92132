"""A synthetic medical VQA set: generated, never downloaded.

    paths = make_synthetic_set("data/synth", n_train=400, n_val=40, n_test=80, seed=0)

Each *case* is one procedurally drawn image (synth_draw: five modality styles)
with known findings: lesion present or not, count 0-3, side and upper/lower
of the image, size small/large. From each case come

- closed-ended items in the upstream evaluation format (`{split}_vqa.json`
  beside `images/`: question, options, answer = option text, image paths
  relative to the JSON, dataset, subset), one per applicable question kind;
- training conversations in the PubMedVision format (`{split}_conversations.json`:
  image list, conversations [{"from": "human"|"gpt"}], modality, body_part, no
  <image> in the text): the same questions in the lettered-options form
  answered with the letter, plus open short answers and descriptions.

Questions are English or Chinese, several phrasings each. Everything is a
function of (seed, split, case index): the splits use disjoint random streams
and disjoint image files, and only the train split gets conversations from
callers that train (the test split has none at all).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from huatuo_lite.eval.run import build_prompt
from huatuo_lite.fsutil import staging_dir

from .draw import STYLES, draw_case, sample_findings
from .text import (ANSWER_TEXT, DESCRIBE_QUESTIONS, KIND_OPTIONS, MODALITY_NAMES,
                         QUESTIONS, describe)

SPLIT_STREAMS = {"train": 1, "val": 2, "test": 3}   # disjoint rng streams per split
DATASET = "SynthMedVQA"
ZH_SHARE = 0.4                                      # share of questions asked in Chinese
ALWAYS_KINDS = ("modality", "presence", "count")
LESION_KINDS = ("side", "vertical", "size")


# ---------------------------------------------------------------- cases ----
def make_case(seed: int, split: str, index: int, marker: tuple | None = None) -> dict:
    """One case: its drawn image (PIL) and ground truth, from its own rng stream."""
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split], index])
    modality = list(STYLES)[int(rng.integers(len(STYLES)))]
    findings = sample_findings(rng)
    image, lesions = draw_case(modality, findings, rng, marker)
    return {"id": f"{split}_{index:05d}", "split": split, "modality": modality,
            "body_part": STYLES[modality].body_part, "findings": vars(findings),
            "lesions": [vars(lesion) for lesion in lesions], "image_obj": image,
            "rng": rng}


def case_kinds(case: dict) -> tuple:
    """The question kinds that have an answer for this case."""
    return ALWAYS_KINDS + (LESION_KINDS if case["findings"]["count"] else ())


def true_value(case: dict, kind: str) -> str:
    """The language-neutral answer key of `kind` for this case (e.g. "left", "2", "ct")."""
    findings = case["findings"]
    table = {"modality": case["modality"], "presence": "yes" if findings["count"] else "no",
             "count": str(findings["count"]), "side": findings["side"],
             "vertical": findings["vertical"], "size": findings["size"]}
    return table[kind]


def _language(rng) -> str:
    return "zh" if rng.random() < ZH_SHARE else "en"


def _options(kind: str, lang: str, rng, shuffle: bool) -> list[str]:
    """Option keys in canonical order, or shuffled when asked."""
    keys = list(KIND_OPTIONS[kind])
    if shuffle:
        rng.shuffle(keys)
    return keys


def closed_item(case: dict, kind: str, rng, shuffle: bool) -> dict:
    """One closed question in the upstream eval format (plus our own extra keys)."""
    lang = _language(rng)
    keys = _options(kind, lang, rng, shuffle)
    phrasings = QUESTIONS[kind][lang]
    return {"id": f"{case['id']}_{kind}", "question": phrasings[int(rng.integers(len(phrasings)))],
            "options": [ANSWER_TEXT[lang][k] for k in keys],
            "answer": ANSWER_TEXT[lang][true_value(case, kind)],
            "image": [f"images/{case['id']}.png"], "dataset": f"{DATASET}-{lang}", "subset": kind,
            "question_type": "closed", "language": lang, "modality": case["modality"]}


# -------------------------------------------------------- conversations ----
def _conversation(case: dict, question: str, answer: str, tag: str) -> dict:
    return {"id": f"{case['id']}_{tag}", "image": [f"images/{case['id']}.png"],
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
            "modality": MODALITY_NAMES["en"][case["modality"]], "body_part": case["body_part"]}


def training_records(case: dict, rng, shuffle: bool) -> list[dict]:
    """Lettered-options items answered with the letter (every kind), one open short
    answer and one description: the model learns the eval protocol and to describe."""
    records = []
    for kind in case_kinds(case):
        item = closed_item(case, kind, rng, shuffle)
        letter = chr(ord("A") + item["options"].index(item["answer"]))
        records.append(_conversation(case, build_prompt(item["question"], item["options"]), letter, f"{kind}_mc"))
    kinds = case_kinds(case)
    kind = kinds[int(rng.integers(len(kinds)))]
    lang = _language(rng)
    phrasings = QUESTIONS[kind][lang]
    records.append(_conversation(case, phrasings[int(rng.integers(len(phrasings)))],
                                 ANSWER_TEXT[lang][true_value(case, kind)], f"{kind}_open"))
    lang = _language(rng)
    question = DESCRIBE_QUESTIONS[lang][int(rng.integers(len(DESCRIBE_QUESTIONS[lang])))]
    records.append(_conversation(case, question, describe(case, lang), "describe"))
    return records


# ---------------------------------------------------------------- writer ----
def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def make_split(stage: Path, split: str, n_cases: int, seed: int, shuffle: bool,
               marker: tuple | None = None) -> dict:
    """Draw one split's images into stage/images; its eval items, conversations, truths."""
    (stage / "images").mkdir(exist_ok=True)
    items, conversations, truths = [], [], []
    for index in range(n_cases):
        case = make_case(seed, split, index, marker)
        case.pop("image_obj").save(stage / "images" / f"{case['id']}.png", optimize=True)
        rng = case.pop("rng")
        items += [closed_item(case, kind, rng, shuffle) for kind in case_kinds(case)]
        if split != "test":                      # the test split is never trained on
            conversations += training_records(case, rng, shuffle)
        truths.append({**case, "image": f"images/{case['id']}.png"})
    return {"items": items, "conversations": conversations, "cases": truths}


def make_synthetic_set(out_dir, n_train: int, n_val: int, n_test: int, seed: int = 0,
                       shuffle_options: bool = False, lesion_marker: tuple | None = None) -> dict:
    """Write the set into out_dir (atomically per file) and return its paths.

    n_* count cases (images); each case gives 3 eval items, or 6 when it has a
    lesion. Returns {"root", "images", "train_conversations", "val_conversations",
    "val_vqa", "test_vqa", "cases"} -> Path. Options are in a fixed order per
    kind unless shuffle_options (then the letter carries no prior). lesion_marker
    (r, g, b) paints every lesion in that colour too (RGB images; see draw_case)."""
    out_dir = Path(out_dir)
    names = {"train_conversations": "train_conversations.json", "val_conversations": "val_conversations.json",
             "val_vqa": "val_vqa.json", "test_vqa": "test_vqa.json", "cases": "cases.json"}
    all_cases = {}
    with staging_dir(out_dir) as stage:
        for split, n_cases in (("train", n_train), ("val", n_val), ("test", n_test)):
            made = make_split(stage, split, n_cases, seed, shuffle_options, lesion_marker)
            all_cases[split] = made["cases"]
            if split != "test":
                _write_json(stage / names[f"{split}_conversations"], made["conversations"])
            if split != "train":
                _write_json(stage / names[f"{split}_vqa"], made["items"])
        _write_json(stage / names["cases"], {"seed": seed, "shuffle_options": shuffle_options,
                                             "lesion_marker": lesion_marker,
                                             "splits": all_cases})
    return {"root": out_dir, "images": out_dir / "images", **{k: out_dir / v for k, v in names.items()}}


def main(argv=None) -> None:
    """python -m huatuo_lite.convert.synth OUT_DIR [--train N --val N --test N --seed S]"""
    import argparse

    parser = argparse.ArgumentParser(description="Write the synthetic medical VQA set.")
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=40)
    parser.add_argument("--test", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shuffle-options", action="store_true")
    args = parser.parse_args(argv)
    paths = make_synthetic_set(args.out_dir, args.train, args.val, args.test, args.seed, args.shuffle_options)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))


if __name__ == "__main__":
    main()
