"""bench/run.py on the tiny profile: the JSON and the table have every row and figure,
and every figure is a positive number (no timing is asserted: the machine is shared)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import profiles  # noqa: E402
import report  # noqa: E402
import stock  # noqa: E402

ROWS = ("gguf Q4_K_M", "onnx int8")      # one per converted backend keeps the test short
POSITIVE = ("load_s", "image_encode_s", "prefill_tokens_per_s", "time_to_first_token_s",
            "decode_tokens_per_s", "follow_up_ttft_s", "peak_rss_mb", "size_mb", "bytes_per_token",
            "roofline_tokens_per_s", "roofline_fraction")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    out = work / "result.json"
    command = [sys.executable, str(BENCH / "run.py"), "--profile", "tiny", "--threads", "1", "--repeat", "2",
               "--no-stock", "--work", str(work), "--out", str(out), "--only", *ROWS]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


def test_json_has_every_row_with_positive_figures(tiny_run):
    result, _ = tiny_run
    assert result["profile"] == "tiny" and result["threads"] == 1 and result["repeat"] == 2
    assert result["bandwidth"]["read_gbs"] > 0 and result["bandwidth"]["copy_gbs"] > 0
    assert [row["label"] for row in result["rows"]] == list(ROWS), result["notes"]
    for row in result["rows"]:
        for key in POSITIVE:
            assert row[key] > 0, (row["label"], key)
        assert row["repeats"] == 2 and row["completion_tokens"] == result["new_tokens"]
        assert row["prompt_tokens"] > 576                        # the image's tokens and the question
        assert row["follow_up_ratio"] > 0                         # a median of per-image ratios
    gguf = result["rows"][0]
    assert gguf["follow_up_reused_positions"] > 576              # the image's KV prefix was reused


def test_table_lists_the_rows_and_columns(tiny_run):
    result, stdout = tiny_run
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "row"
    assert len(table[0].split("|")) == len(report.COLUMNS) + 2
    assert [line.split("|")[1].strip() for line in table[2:]] == list(ROWS)
    assert "-" not in [cell.strip() for line in table[2:] for cell in line.split("|")[2:-1]]


def test_roofline_fraction_is_decode_over_bandwidth_per_byte():
    row = {"decode_tokens_per_s": 20.0}
    report.add_roofline(row, bytes_per_token=500_000_000, read_gbs=40.0)
    assert row["roofline_tokens_per_s"] == pytest.approx(80.0)
    assert row["roofline_fraction"] == pytest.approx(0.25)


MTMD_LOG = """\
encoding image slice...
image slice encoded in 1500 ms
decoding image batch 1/1, n_tokens_batch = 576
image decoded (batch 1/1) in 3000 ms
llama_perf_context_print:        load time =     800.00 ms
llama_perf_context_print: prompt eval time =    3500.00 ms /   600 tokens (    5.83 ms per token,   171.43 tokens per second)
llama_perf_context_print:        eval time =    2000.00 ms /    63 runs   (   31.75 ms per token,    31.50 tokens per second)
"""


def test_mtmd_log_timings():
    timings = stock.parse_mtmd_log(MTMD_LOG)
    assert timings["image_encode_s"] == pytest.approx(1.5)
    assert timings["prefill_s"] == pytest.approx(3.5) and timings["prompt_tokens"] == 600
    # the prompt clock already spans the image encode (text comes before the image)
    assert timings["time_to_first_token_s"] == pytest.approx(3.5)
    assert timings["decode_tokens_per_s"] == pytest.approx(31.5)


@pytest.mark.parametrize("name", sorted(n for n, p in profiles.PROFILES.items() if p.maker == "make_tiny"))
def test_every_profile_is_a_valid_tiny_shape(name):
    """The small and 7b shapes pass make_tiny's own checks (without building GBs of weights); the
    Qwen2.5-VL profiles are checked by their own maker's rules (test_bench_qwen25vl.py)."""
    from dataclasses import replace

    from huatuo_lite.convert.tiny import make as tiny

    profile = profiles.get_profile(name)
    tiny._check_sizes(replace(tiny.TinySizes(), **profile.sizes))
    assert profiles.default_labels(profile) and set(profiles.default_labels(profile)) <= set(profiles.all_labels(profile))


def test_mtmd_log_without_perf_lines_keeps_the_encode_time():
    """This llama.cpp's mtmd-cli logs 'mtmd batch encoding done in N ms'; its async logger can
    drop the llama_perf lines at exit."""
    timings = stock.parse_mtmd_log("encoding mtmd batch, n_chunks = 1\nmtmd batch encoding done in 68 ms\n")
    assert timings == {"image_encode_s": pytest.approx(0.068)}
    with pytest.raises(Exception, match="no image encode time"):
        stock.parse_mtmd_log("nothing useful\n")
