"""PubMedVision records -> examples: the inference token layout, labels on replies + eos,
and bad records reported with their index (refused or skipped)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from support.train_set import make_dataset  # noqa: E402

from huatuo_lite.convert.train.data import (IGNORE, DataError, build_examples, read_records,  # noqa: E402
                                            split_validation)
from huatuo_lite.prompt import IMAGE_SLOT, Turn, prompt_token_layout  # noqa: E402


@pytest.fixture(scope="module")
def tok(tiny_7b):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_7b))
    return lambda text: tokenizer(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = make_dataset(tmp_path_factory.mktemp("records"), follow_up=True)
    return path, read_records(path)


EOS = 1500   # the tiny Qwen2 tokenizer's <|endoftext|>


def _build(records, tok, root, **kw):
    return build_examples(records, tok, EOS, root, **kw)


def test_each_reply_is_an_example_with_the_inference_prompt(data, tok):
    path, records = data
    examples, problems = _build(records[:1], tok, path.parent)
    assert problems == [] and len(examples) == 2
    (q1, a1), (q2, a2) = [(records[0]["conversations"][i]["value"], records[0]["conversations"][i + 1]["value"])
                          for i in (0, 2)]
    first, second = examples
    prompt1 = prompt_token_layout([Turn(q1, 1)], tok)                       # what `ask` runs
    assert first.input_ids == prompt1 + tok(a1) + [EOS]
    assert first.labels == [IGNORE] * len(prompt1) + tok(a1) + [EOS]
    prompt2 = prompt_token_layout([Turn(q1, 1, a1), Turn(q2, 0)], tok)      # what a chat's 2nd turn runs
    assert second.input_ids == prompt2 + tok(a2) + [EOS]
    assert second.labels.count(IGNORE) == len(prompt2)
    assert first.input_ids.count(IMAGE_SLOT) == second.input_ids.count(IMAGE_SLOT) == 1
    assert first.images == second.images == [path.parent / records[0]["image"][0]]
    assert first.n_positions(576) == len(first.input_ids) - 1 + 576


def test_llava_style_placeholders_are_moved_to_the_upstream_place(data, tok):
    path, records = data
    record = json.loads(json.dumps(records[0]))
    record["conversations"][0]["value"] = "<image>\n" + record["conversations"][0]["value"]
    with_marks, _ = _build([record], tok, path.parent)
    without, _ = _build(records[:1], tok, path.parent)
    assert [e.input_ids for e in with_marks] == [e.input_ids for e in without]


def _bad_records(records):
    good = records[0]
    missing = {**good, "image": ["images/nope.png"]}
    empty = {**good, "conversations": []}
    too_many = {**good, "image": good["image"] * 7}
    marks = {**good, "conversations": [{"from": "human", "value": "<image>\n<image>\nTwo?"},
                                       {"from": "gpt", "value": "One."}]}
    gpt_first = {**good, "conversations": good["conversations"][1:]}
    return [good, missing, empty, too_many, marks, gpt_first, records[1]]


REASONS = {1: "does not exist", 2: "no conversations", 3: "at most 6", 4: "placeholders",
           5: "must alternate"}


def test_bad_records_are_refused_with_their_index(data, tok):
    path, records = data
    with pytest.raises(DataError, match=r"^Record 1 of data\.json cannot be used: its image .*nope\.png does "
                                        r"not exist; .*--bad-records skip"):
        _build(_bad_records(records), tok, path.parent, source="data.json")


def test_bad_records_are_skipped_and_listed(data, tok):
    path, records = data
    examples, problems = _build(_bad_records(records), tok, path.parent, on_bad="skip")
    assert [p.index for p in problems] == sorted(REASONS)
    for problem in problems:
        assert REASONS[problem.index] in problem.reason, problem
    assert sorted({e.record_index for e in examples}) == [0, 6]
    assert problems[0].sentence().startswith("record 1: its image")


def test_too_long_record_is_reported(data, tok):
    path, records = data
    with pytest.raises(DataError, match="Record 0 .* more than the maximum length 300"):
        _build(records, tok, path.parent, max_length=300)


def test_no_usable_record_is_an_error(data, tok):
    path, records = data
    with pytest.raises(DataError, match="no usable record"):
        _build([{"image": [], "conversations": []}], tok, path.parent, on_bad="skip")


def test_json_lines_and_validation_split(data, tmp_path, tok):
    path, records = data
    lines = tmp_path / "data.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert read_records(lines) == records
    examples, _ = _build(records, tok, path.parent)
    train, val = split_validation(examples, 0.25, seed=0)
    assert len(val) == 2 and len(train) == 6                         # one record of four, two replies each
    assert not {e.record_index for e in train} & {e.record_index for e in val}
    with pytest.raises(DataError, match="neither JSON nor JSON Lines"):
        bad = tmp_path / "bad.json"
        bad.write_text("{oops")
        read_records(bad)


def test_text_only_record_has_no_image_slot(data, tok):
    path, records = data
    record = {"conversations": records[0]["conversations"][:2]}
    (example,), _ = _build([record], tok, path.parent)
    question = records[0]["conversations"][0]["value"]
    assert IMAGE_SLOT not in example.input_ids and example.images == []
    assert example.input_ids[:len(prompt_token_layout([Turn(question, 0)], tok))] == \
        prompt_token_layout([Turn(question, 0)], tok)
