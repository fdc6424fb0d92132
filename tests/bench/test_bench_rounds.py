"""bench/rounds.py: ours and stock llama.cpp alternate which goes first, and the rounds
merge into one row each (joined per-image lists for ours, medians for stock)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import rounds  # noqa: E402
from huatuo_lite import llama_tools as native  # noqa: E402


def test_each_peer_goes_first_equally_often_in_an_even_number_of_rounds():
    orders = rounds.round_orders(4)
    assert orders == [("ours", "stock"), ("stock", "ours"), ("ours", "stock"), ("stock", "ours")]
    assert rounds.round_orders(1) == [("ours", "stock")]          # stock needs our prompt depth first


def _child(ttft: float, load: float, rss: float) -> dict:
    run = {"time_to_first_token_s": ttft, "prompt_tokens": 598}
    return {"first": [run], "follow_up": [dict(run, time_to_first_token_s=ttft / 20)], "load_s": load,
            "peak_rss_mb": rss, "peak_anon_mb": rss / 2, "peak_file_mb": None}


def test_children_merge_as_one_child_that_saw_every_image():
    merged = rounds.merge_children([_child(4.0, 1.0, 100), _child(6.0, 3.0, 300), _child(5.0, 2.0, 200)])
    assert [run["time_to_first_token_s"] for run in merged["first"]] == [4.0, 6.0, 5.0]
    assert len(merged["follow_up"]) == 3
    assert merged["load_s"] == 2.0 and merged["peak_rss_mb"] == 300 and merged["peak_anon_mb"] == 150
    assert merged["peak_file_mb"] is None


def test_stock_rounds_take_medians_and_keep_the_arguments():
    rows = [{"label": "llama.cpp Q4_K_M", "decode_tokens_per_s": rate, "llama_bench_args": {"decode": "-r 1"},
             "ttft_estimated": rate == 7.0} for rate in (6.0, 7.5, 7.0)]
    rows[1]["time_to_first_token_s"] = 40.0                       # one round's mtmd-cli kept its timings
    merged = rounds.median_rows(rows)
    assert merged["decode_tokens_per_s"] == 7.0 and merged["time_to_first_token_s"] == 40.0
    assert merged["label"] == "llama.cpp Q4_K_M" and merged["llama_bench_args"] == {"decode": "-r 1"}
    assert merged["ttft_estimated"] is True and merged["rounds"] == 3        # estimated in some round
    assert rounds.per_round(rows) == {"time_to_first_token_s": [None, 40.0, None],
                                      "decode_tokens_per_s": [6.0, 7.5, 7.0]}


@pytest.mark.skipif(native.find_tool("llama-bench", required=False) is None,
                    reason="llama-bench not built (build/bin)")
def test_tiny_paired_run_interleaves_and_reports_both_rows(tmp_path):
    out = tmp_path / "result.json"
    command = [sys.executable, str(BENCH / "run.py"), "--profile", "tiny", "--threads", "1", "--repeat", "2",
               "--no-mtmd", "--work", str(tmp_path), "--out", str(out), "--only", "gguf Q4_K_M"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "round 1/2 on gguf Q4_K_M: ours then stock" in done.stdout
    assert "round 2/2 on gguf Q4_K_M: stock then ours" in done.stdout
    ours, peer = json.loads(out.read_text())["rows"]
    assert (ours["label"], peer["label"]) == ("gguf Q4_K_M", "llama.cpp Q4_K_M")
    assert ours["repeats"] == 2 and peer["rounds"] == 2
    assert ours["interleaved_rounds"] == peer["interleaved_rounds"] == 2
    assert peer["decode_depth"] == ours["prompt_tokens"] and peer["decode_tokens_per_s"] > 0
    for row in (ours, peer):
        per_round = row["per_round"]["decode_tokens_per_s"]
        assert len(per_round) == 2 and min(per_round) <= row["decode_tokens_per_s"] <= max(per_round)


def test_a_failing_child_ends_the_pair_with_one_printed_note(monkeypatch, capsys):
    import types

    import run

    def broken(*_args, **_kwargs):
        raise RuntimeError("exit code 1: boom")

    monkeypatch.setattr(run, "run_child", broken)
    target = types.SimpleNamespace(label="gguf Q4_K_M", backend="gguf", quant="Q4_K_M", folder=Path("x"))
    args = types.SimpleNamespace(threads=1, new_tokens=4, no_mtmd=True)
    rows, notes = run.measure_paired(target, args, [Path("a.png"), Path("b.png")], read_gbs=10.0)
    assert rows == [] and notes == ["gguf Q4_K_M failed: exit code 1: boom"]
    assert "gguf Q4_K_M failed: exit code 1: boom" in capsys.readouterr().out
