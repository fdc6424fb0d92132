"""bench/decode_pages.py and bench/prefill_split.py on the shipped demo GGUF: rotating order, one child
per peer and round, and figures that come from the run (the benchmark itself: bench/README.md)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import decode_pages  # noqa: E402

DEMO = ROOT / "models/demo/gguf"


def test_two_rounds_without_stock_rotate_the_order_and_measure_each_child(capsys):
    result = decode_pages.run(DEMO, rounds=2, threads=1, prompt=16, new_tokens=4, with_stock=False)
    out = capsys.readouterr().out
    firsts = [line.split(":")[0] for line in out.splitlines() if line.startswith("round ")]
    assert firsts == ["round 1 ours huge", "round 1 ours 4k", "round 2 ours 4k", "round 2 ours huge"]
    for peer in ("ours huge", "ours 4k"):
        runs = result["runs"][peer]
        assert len(runs) == 2 and all(r["decode_tokens_per_s"] > 0 and r["load_s"] > 0 for r in runs)
        assert result["median_decode_tokens_per_s"][peer] > 0
    assert "load average at start" in out and "stock" not in result["runs"]


def test_prefill_split_times_three_plans_of_the_same_positions(capsys):
    import prefill_split

    result = prefill_split.main([str(DEMO), "--rounds", "2", "--threads", "1"])
    out = capsys.readouterr().out
    lengths = {name: sum(len(values) for _, values in plan)
               for name, plan in prefill_split.plans(8, __import__("numpy").random.default_rng(0)).items()}
    assert set(lengths.values()) == {prefill_split.BEFORE + prefill_split.IMAGE + prefill_split.AFTER}
    assert all(len(result["seconds"][name]) == 2 and min(result["seconds"][name]) > 0 for name in lengths)
    assert out.count("round ") == 2 and "x split3" in out
