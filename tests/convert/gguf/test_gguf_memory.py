"""Conversion streams tensors: peak memory grows by about one tensor, not the model."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from support.memory_probe import child_peak_mb

pytest.importorskip("torch")
pytest.importorskip("gguf")

# ~320 MB of bf16 weights in 8 shards (14 layers of 1024 x 2816); the largest tensor is ~6 MB.
BIG = dict(hidden_size=1024, intermediate_size=2816, num_layers=14, num_heads=8, num_kv_heads=2, num_shards=8)

BASELINE = """
import sys
from huatuo_lite.convert.gguf import export as gguf_export
from huatuo_lite.convert.checkpoint.read import open_checkpoint
import llama_cpp, tqdm
ckpt = open_checkpoint(sys.argv[1])
"""
CONVERT = """
import sys
from huatuo_lite.convert.gguf.export import export_gguf
export_gguf(sys.argv[1], sys.argv[2], quant="F16", vision_onnx=False)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_conversion_peak_rss_is_far_below_checkpoint_size(tmp_path):
    from huatuo_lite.convert.tiny.make import make_tiny

    src = make_tiny(tmp_path / "big", variant="7b", seed=0, **BIG)
    shards = sorted(Path(src).glob("*.safetensors"))
    checkpoint_mb = sum(p.stat().st_size for p in shards) / 2**20
    assert len(shards) >= 4 and checkpoint_mb > 250
    baseline = child_peak_mb(BASELINE, src)
    peak = child_peak_mb(CONVERT, src, tmp_path / "out")
    growth = peak - baseline
    print(f"checkpoint {checkpoint_mb:.0f} MB in {len(shards)} shards; conversion peak RSS {peak:.0f} MB "
          f"(baseline {baseline:.0f} MB, growth {growth:.0f} MB)")
    assert (tmp_path / "out" / "manifest.json").is_file()
    # the reader maps one shard at a time (1/8 here), plus a tensor's float32/encoded copies and
    # allocator slack; holding the model would grow by the checkpoint size or more (2x as float32)
    assert growth < 0.6 * checkpoint_mb
