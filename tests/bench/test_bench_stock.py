"""bench/stock.py holds stock llama.cpp to our settings: decode at our rows' depth, and the
exact-mode attention flags (F32 KV cache, no flash attention) exactly where our GGUF
backend uses exact mode (unquantized files)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import stock  # noqa: E402
from support.engines import skip_without
skip_without('torch', 'gguf', 'llama_cpp')
from huatuo_lite import llama_tools as native  # noqa: E402

EXACT = {"llama-bench": ["-fa", "off"],          # it parses no f32 cache type: K/V stay F16
         "llama-mtmd-cli": ["-fa", "off", "-ctk", "f32", "-ctv", "f32"]}


def _flag(args: list, name: str):
    """The value after `name` in an argument list (None when absent)."""
    return args[args.index(name) + 1] if name in args else None


def _has_run(args: list, run: list) -> bool:
    return any(args[i:i + len(run)] == run for i in range(len(args)))


@pytest.mark.parametrize("quant, exact", [("F16", True), ("F32", True), ("BF16", True),
                                          ("Q8_0", False), ("Q4_K_M", False)])
def test_attention_flags_follow_our_exact_mode(quant, exact):
    runs = stock.bench_args(Path("m.gguf"), quant, threads=2, repeat=3, prompt_tokens=598,
                            new_tokens=64, depth=598)
    for args in runs.values():
        assert _has_run(args, EXACT["llama-bench"]) is exact, (quant, args)
        assert ("-fa" in args) is exact and "-ctk" not in args
    assert stock.attention_args(quant, "llama-mtmd-cli") == (EXACT["llama-mtmd-cli"] if exact else [])


def test_decode_runs_at_the_given_depth_and_prefill_from_empty():
    runs = stock.bench_args(Path("m.gguf"), "Q4_K_M", threads=2, repeat=3, prompt_tokens=598,
                            new_tokens=64, depth=598)
    prefill, decode = runs["prefill"], runs["decode"]
    assert (_flag(prefill, "-p"), _flag(prefill, "-n"), _flag(prefill, "-d")) == (598, 0, None)
    assert (_flag(decode, "-p"), _flag(decode, "-n"), _flag(decode, "-d")) == (0, 64, 598)
    assert _flag(decode, "-t") == 2 and _flag(decode, "-r") == 3 and _flag(decode, "-o") == "json"


needs_llama_bench = pytest.mark.skipif(native.find_tool("llama-bench", required=False) is None,
                                       reason="llama-bench not built (build/bin)")


@needs_llama_bench
@pytest.mark.parametrize("fixture", ["gguf_7b_f16", "gguf_7b_q4_k_m"])
def test_llama_bench_accepts_the_arguments_and_records_them(fixture, request):
    """A real llama-bench run on a tiny GGUF: the flags parse, both rates come back, and the
    row carries the exact command-line arguments it was measured with."""
    from profiles import text_gguf

    folder = request.getfixturevalue(fixture)
    quant = "F16" if fixture.endswith("f16") else "Q4_K_M"
    result = stock.llama_bench(text_gguf(folder), threads=1, new_tokens=4, repeat=1, prompt_tokens=16,
                               quant=quant, depth=24)
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
    decode = result["llama_bench_args"]["decode"].split()
    assert _flag(decode, "-d") == "24" and _flag(decode, "-n") == "4"
    for phase in ("prefill", "decode"):
        assert (" ".join(EXACT["llama-bench"]) in result["llama_bench_args"][phase]) is (quant == "F16")


@pytest.mark.skipif(native.find_tool("llama-mtmd-cli", required=False) is None,
                    reason="llama-mtmd-cli not built (build/bin)")
def test_mtmd_cli_accepts_the_exact_flags(gguf_7b_f16, tmp_path):
    """llama-mtmd-cli with F32 KV, no flash attention and EOS ignored on a tiny F16 GGUF: it
    runs (a rejected flag would fail the tool) and encodes the image."""
    import numpy as np
    from PIL import Image

    from huatuo_lite.manifest import read_manifest
    from profiles import text_gguf

    files = read_manifest(gguf_7b_f16)["files"]
    mmproj = gguf_7b_f16 / next(name for name, entry in files.items() if entry["role"] == "mmproj")
    image = tmp_path / "random.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8)).save(image)
    timings = stock.mtmd_first_answer(text_gguf(gguf_7b_f16), mmproj, image, "Describe it.", threads=1,
                                      new_tokens=4, quant="F16")
    assert timings["image_encode_s"] > 0


def test_bench_args_take_median_token_counts_as_integers():
    """Rows report medians over repeats (598.0); llama-bench refuses "-p 598.0"."""
    from stock import bench_args

    args = bench_args(Path("m.gguf"), "Q4_K_M", 2, 1, 598.0, 64, 598.0)
    assert args["prefill"][args["prefill"].index("-p") + 1] == 598
    assert args["decode"][args["decode"].index("-d") + 1] == 598
