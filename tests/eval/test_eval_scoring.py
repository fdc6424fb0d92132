"""The harness scores exactly as upstream's scorer.py did, except that outputs
upstream crashed on score wrong (and are counted as unparsed)."""
from __future__ import annotations

import difflib
import json
import re

import pytest

from huatuo_lite.errors import HuatuoError
from huatuo_lite.eval.report import summarize
from huatuo_lite.eval.run import build_prompt, first_letter, load_items, score


# ------------------------------------------------ upstream, written out ----
# A faithful copy of the logic of HuatuoGPT-Vision's scorer.py (match_choice3,
# test_mmlu, and the per-record part of test_choice_llava), to compare against.
def _upstream_most_similar(str_list, target):
    best, index = 0, None
    for i, s in enumerate(str_list):
        sim = difflib.SequenceMatcher(None, s, target).ratio()
        if sim >= best:
            index, best = i, sim
    return index


def _upstream_match_choice3(text, options):
    matches = list(re.finditer(r"(is |是|\*|\W|\ |\(|为|^|'|\"|#)(?![aA] )([abcdefghijklmnABCDEFGHIJKLMN])(\W|$)",
                               text, re.S))
    if matches:
        return matches[0].group(2), 1
    text = text.lower()
    opsindex = [(opt, text.rindex(options[opt].lower())) for opt in options if options[opt].lower() in text]
    if len(opsindex) > 0:
        return sorted(opsindex, key=lambda x: x[1], reverse=True)[0][0], 2
    oplabels = [x for x in options]
    opans = [options[x].lower() for x in options]
    return oplabels[_upstream_most_similar(opans, text.lower())], 3


def _upstream_is_correct(record: dict) -> bool:
    """Raises where upstream's `assert False, da` stopped the whole evaluation."""
    da = dict(record)
    try:
        opt_title = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "K"]
        if da["answer"] == "?":
            return False
        da["answer"] = opt_title[da["options"].index(da["answer"])]
        ans = _upstream_match_choice3(da["model_output"], da)   # sic: the record as "options"
        if len(ans) == 0:
            ans = "A"
        return ans[0] == da["answer"]
    except Exception as exc:  # upstream: traceback.print_exc(); assert False, da
        raise AssertionError("upstream scorer crashed") from exc


# ------------------------------------------------------------ the cases ----
OPTIONS = ["Left", "Right", "Both", "Neither"]
OUTPUTS = [
    "B", "B.", "(B)", "B) Right", "The answer is B", "Answer: B", "**B**", "#B", "'B'",
    "答案是B", "答案为B", "选B", "b", "answer: b", "A", "A lesion on the right: B",
    "I think B", "E", "B and C", "BC", "Right", "right side", "", "   ", "No idea",
    "The lesion is on the right", "C.", "D\n", "(D) neither", "Option D", "AB", "B2",
    "答案：B", "abc", "x", "选项B", "Neither.",
]


def _record(output, answer="Right", options=OPTIONS):
    return {"question": "Which side?", "options": list(options), "answer": answer, "image": [],
            "dataset": "D", "subset": "s", "model_output": output}


class _Item:
    """What score() reads from an EvalItem."""

    def __init__(self, record):
        from huatuo_lite.families.llava import EVAL_OPTION_LETTERS

        self.options = tuple(record["options"])
        self.answer_letter = (None if record["answer"] == "?"
                              else EVAL_OPTION_LETTERS[self.options.index(record["answer"])])


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("answer", ["Right", "Neither", "?"])
def test_same_verdict_as_upstream_and_no_crash(output, answer):
    record = _record(output, answer)
    ours = score(_Item(record), output)
    try:
        expected = _upstream_is_correct(record)
    except AssertionError:
        assert ours == {"letter": None, "parsed": False, "correct": False}   # fixed: wrong, unparsed
        return
    assert ours["correct"] == expected
    assert ours["parsed"] == (first_letter(output) is not None)
    if answer != "?":                    # upstream scores "?" wrong without reading the output
        assert ours["parsed"]


def test_the_hand_made_set_includes_upstream_crashes():
    crashed = []
    for output in OUTPUTS:
        try:
            _upstream_is_correct(_record(output))
        except AssertionError:
            crashed.append(output)
    assert {"", "No idea", "Right", "right side", "BC", "x", "abc"} <= set(crashed)
    assert all(first_letter(o) is None for o in crashed)


def test_upstream_quirks_are_kept():
    assert first_letter("I think B") == "I"         # a pronoun is a standalone letter
    assert first_letter("A lesion: B") == "B"       # but the article "A " is not
    assert first_letter("answer: b") == "b"         # lower case is read, and then never matches
    assert not score(_Item(_record("b")), "b")["correct"]


def test_report_accuracies_match_upstream_per_dataset_and_subset():
    records = []
    for k, output in enumerate(OUTPUTS):
        rec = _record(output, answer=OPTIONS[k % 4])
        rec.update(dataset=f"D{k % 3}", subset=["", "x", "y"][k % 2 + (k % 5 == 0)])
        records.append(rec)
    rows = []
    for rec in records:
        ours = score(_Item(rec), rec["model_output"])
        rows.append({**ours, "dataset": rec["dataset"], "subset": rec["subset"], "n_options": 4})
    report = summarize(rows, {}, {})
    upstream_total, by_set, by_sub = 0, {}, {}
    for rec in records:
        try:
            ok = _upstream_is_correct(rec)
        except AssertionError:
            ok = False                                 # what upstream would have needed
        upstream_total += ok
        by_set.setdefault(rec["dataset"], []).append(ok)
        if rec["subset"] != "":
            by_sub.setdefault(f"{rec['dataset']}_{rec['subset']}", []).append(ok)
    assert report["total"]["accuracy"] == pytest.approx(upstream_total / len(records))
    assert {k: v["accuracy"] for k, v in report["datasets"].items()} == \
        pytest.approx({k: sum(v) / len(v) for k, v in by_set.items()})
    assert {k: v["accuracy"] for k, v in report["subsets"].items()} == \
        pytest.approx({k: sum(v) / len(v) for k, v in by_sub.items()})
    assert report["total"]["chance"] == pytest.approx(0.25)


# ------------------------------------------------------------ the file ----
def _write_set(tmp_path, records):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "a.png").write_bytes(b"png")
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_prompt_is_upstreams_llava_prompt():
    assert build_prompt("Which side?", ["Left", "Right"]) == (
        "Which side?\nA. Left\nB. Right\nAnswer with the option's letter from the given choices directly.")


def test_load_items_reads_the_published_layout(tmp_path):
    base = {"question": "q", "image": ["images/a.png"], "dataset": "VQA-RAD"}
    path = _write_set(tmp_path, [
        {**base, "options": ["yes", "no"], "answer": "no"},
        {**base, "options": "['x', 'y', 'z']", "answer": "z", "subset": "s"},
        {**base, "options": ["yes", "no"], "answer": "yes", "question_type": "open"},
        {**base, "options": [], "answer": "a"},
    ])
    items, skipped = load_items(path)
    assert [i.answer_letter for i in items] == ["B", "C"]
    assert items[1].options == ("x", "y", "z") and items[1].subset == "s"
    assert items[0].images == (str(tmp_path / "images" / "a.png"),)
    assert skipped == {"open": 1, "no_options": 1}
    assert [i.index for i in load_items(path, limit=1)[0]] == [0]


@pytest.mark.parametrize("record, words", [
    ({"options": ["a", "b"], "answer": "c", "image": ["images/a.png"]}, "not one of its options"),
    ({"options": ["a", "b"], "answer": "a", "image": ["images/missing.png"]}, "is missing"),
    ({"options": "not a list", "answer": "a", "image": []}, "not a list"),
    ({"options": [str(i) for i in range(12)], "answer": "1", "image": []}, "at most 11"),
])
def test_bad_records_get_one_sentence(tmp_path, record, words):
    path = _write_set(tmp_path, [{"question": "q", "dataset": "d", **record}])
    with pytest.raises(HuatuoError, match=words):
        load_items(path)
