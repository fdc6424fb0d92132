"""bench/quant_speed.py: which candidates it measures and on which folders, the rotating
round order, medians over the rounds that ran, and one sentence for a bad argument.
No model is converted here (the run itself is a benchmark: bench/README.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import profiles  # noqa: E402
import quant_speed  # noqa: E402
from huatuo_lite.errors import HuatuoError  # noqa: E402
from quant_candidates import CANDIDATES  # noqa: E402


def test_selection_keeps_the_table_order_and_names_an_unknown_candidate():
    assert quant_speed.select(None) == list(quant_speed.DEFAULT_CANDIDATES)
    assert quant_speed.select("all") == list(CANDIDATES)
    assert quant_speed.select(" gguf:Q4_0, onnx:int8 ") == ["onnx:int8", "gguf:Q4_0"]
    with pytest.raises(HuatuoError, match=r"^Unknown candidate 'gguf:Q3' in --candidates: choose from onnx:int8, "):
        quant_speed.select("gguf:Q4_0,gguf:Q3")
    with pytest.raises(HuatuoError, match="--candidates is empty"):
        quant_speed.select(" , ")


def test_reused_folders_are_the_profile_rows_with_the_same_options():
    """A REUSE candidate is measured on a profile row: that is only fair when the candidate
    adds no converter option to the row's plain conversion."""
    small = profiles.all_labels(profiles.get_profile("small"))
    for name, label in quant_speed.REUSE.items():
        fmt, quant, options = CANDIDATES[name]
        assert label == f"{fmt} {quant}" and label in small and options == {}
    for name, twin in quant_speed.SAME_LAYOUT.items():   # only the imatrix differs
        assert CANDIDATES[name][:2] == CANDIDATES[twin][:2]
        assert {k: v for k, v in CANDIDATES[name][2].items() if k != "calibrated"} == CANDIDATES[twin][2]
    assert set(quant_speed.DEFAULT_CANDIDATES) <= set(CANDIDATES)


def test_an_imatrix_twin_is_measured_once_even_when_only_it_is_asked_for():
    assert quant_speed.measured_names(["gguf:Q4_K_M+imatrix"]) == ["gguf:Q4_K_M"]
    assert quant_speed.measured_names(["gguf:Q4_K_M", "gguf:Q4_K_M+imatrix", "onnx:int8"]) == \
        ["onnx:int8", "gguf:Q4_K_M"]


def test_each_candidate_runs_in_every_position_once_over_as_many_rounds():
    names = ["a", "b", "c"]
    orders = [quant_speed.round_order(names, index) for index in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for position in range(3):
        assert sorted(order[position] for order in orders) == names
    assert quant_speed.round_order(names, 4) == ["b", "c", "a"]


def _folder(tmp_path: Path, size: int) -> Path:
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "t.gguf").write_bytes(b"\0" * size)
    (folder / "manifest.json").write_text(json.dumps({"files": {"t.gguf": {"role": "text"}}}))
    return folder


def test_medians_skip_failed_rounds_and_a_twin_row_says_whose_figures_it_shows(tmp_path):
    target = profiles.Target("gguf:Q4_K_M", "gguf", _folder(tmp_path, 3 * 2**20), "Q4_K_M")
    figures = {"gguf:Q4_K_M": [
        {"decode_tokens_per_s": rate, "follow_up_decode_tokens_per_s": rate / 2, "completion_tokens": 64}
        for rate in (30.0, 10.0, 20.0)] + [{"error": "exit code 1"}]}
    rows = quant_speed.summarize(["gguf:Q4_K_M", "gguf:Q4_K_M+imatrix"], {"gguf:Q4_K_M": (target, None)}, figures)
    assert [row["decode_tokens_per_s"] for row in rows] == [20.0, 20.0]
    assert rows[0]["rounds"] == 3 and rows[0]["follow_up_decode_tokens_per_s"] == 10.0
    assert rows[1]["measured_as"] == "gguf:Q4_K_M" and rows[0]["text_mb"] == 3.0
    table = quant_speed.render(rows)
    assert "| gguf:Q4_K_M+imatrix (= gguf:Q4_K_M) | 20.00 | 10.00 | 64 | 3 | 30.00, 10.00, 20.00, - | 3 |" in table


@pytest.mark.parametrize("argv, sentence", [
    (["--candidates", "onnx:int5"], "Unknown candidate 'onnx:int5' in --candidates: choose from"),
    (["--rounds", "0"], "--rounds and --threads must be at least 1 and --new-tokens at least 2."),
])
def test_bad_arguments_are_one_sentence_and_exit_2(argv, sentence):
    done = subprocess.run([sys.executable, str(BENCH / "quant_speed.py"), *argv],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert sentence in done.stderr and "Traceback" not in done.stderr
