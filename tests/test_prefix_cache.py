"""The persistent cache (huatuo_lite/prefix_cache.py + cache.py): image features and the KV
state of the prompt prefix holding the image survive the process; with them loaded the
numbers are the very numbers of a cold run (GGUF and ONNX); a damaged, truncated or foreign
entry is refused and written again; the cap evicts the least recently used entries."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from support.engines import open_gguf, open_onnx, prompt_segments, skip_without
skip_without("llama_cpp", "onnxruntime")
from huatuo_lite import api, prefix_cache
from huatuo_lite.backends.base import ImageEmbeds
from huatuo_lite.cache import FeatureCache, prefix_segments
from huatuo_lite.errors import HuatuoError
from huatuo_lite.prefix_cache import DiskCache

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "models" / "examples" / "chest_xray.png"
DEMO = {"gguf": ROOT / "models" / "demo" / "gguf", "onnx": ROOT / "models" / "demo" / "onnx"}
GREEDY = dict(temperature=0, max_new_tokens=12, repetition_penalty=1.0)
FIRST, SECOND = "What is shown in this image?", "Describe the findings in detail."


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(prefix_cache.ENV_DIR, str(folder))
    monkeypatch.delenv(prefix_cache.ENV_OFF, raising=False)
    monkeypatch.delenv(prefix_cache.ENV_MAX_BYTES, raising=False)
    return folder


# ------------------------------------------------------------------- store ----
def test_roundtrip_and_lru_eviction_under_the_cap(tmp_path):
    cache = DiskCache(tmp_path, cap=3 * 1300)             # three 1000-byte entries (+ ~220 of header) fit
    for i, key in enumerate("abcd"):
        assert cache.put(key * 64, "prefix", bytes([i]) * 1000)
        os.utime(cache.path(key * 64), ns=(i * 10**9, i * 10**9))   # a, b, c, d: oldest first
        if key == "c":
            assert cache.get("a" * 64, "prefix") == bytes([0]) * 1000    # a is now the most recent
    names = {p.name[:1] for _, _, p in cache.entries()}
    assert names == {"a", "c", "d"}                        # b, least recently used, was evicted
    assert cache.info()["bytes"] <= cache.cap
    assert not cache.put("e" * 64, "prefix", b"x" * 5000)  # larger than the cap: not written
    assert cache.clear() == 3 and cache.info()["entries"] == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "garbage", "empty"])
def test_damaged_entries_are_refused_and_deleted(tmp_path, damage):
    cache = DiskCache(tmp_path, cap=1 << 20)
    key, payload = "k" * 64, os.urandom(4096)
    cache.put(key, "prefix", payload)
    path = cache.path(key)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-100] ^= 0x01
    elif damage == "truncate":
        data = data[:-1]
    elif damage == "foreign":                              # a valid entry of another key under this name
        cache.put("j" * 64, "prefix", payload)
        data = bytearray(cache.path("j" * 64).read_bytes())
    elif damage == "garbage":
        data = bytearray(b"not a cache entry at all")
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    assert cache.get(key, "prefix") is None and not path.exists() and cache.refused == 1
    assert cache.get(key, "features") is None              # and a kind mismatch is a miss too


def test_max_bytes_from_the_environment(monkeypatch):
    for text, value in (("2G", 2 * 1024 ** 3), ("1500", 1500), ("0.5M", 512 * 1024), ("0", 0)):
        monkeypatch.setenv(prefix_cache.ENV_MAX_BYTES, text)
        assert prefix_cache.max_bytes() == value
    monkeypatch.setenv(prefix_cache.ENV_MAX_BYTES, "lots")
    with pytest.raises(HuatuoError, match="HUATUO_LITE_CACHE_MAX_BYTES='lots' is not a size"):
        prefix_cache.max_bytes()


# ----------------------------------------------------------------- engines ----
def _engine_numbers(open_engine, folder, tmp_path):
    """First-token logits and the next step's: cold, and with the prefix restored into a
    second engine from what the first wrote. Returns (cold, warm) lists of arrays."""
    cache = FeatureCache(disk=DiskCache(tmp_path / "c", cap=1 << 30))
    writer, reader, cold = (open_engine(folder) for _ in range(3))
    try:
        # seeded features of the image's shape [576, H]: the quantized folders are text-only
        rows = np.random.default_rng(5).standard_normal((576, writer.hidden_size)).astype(np.float32)
        features = ImageEmbeds(rows * 0.05, key="img-5")
        segments = prompt_segments(writer, [features])
        head = prefix_segments(segments)
        writer.prefill(head)
        cache.save_prefix(writer, head)
        assert cache.restore_prefix(reader, head)
        assert reader.held_positions(head) == sum(len(s.features) if isinstance(s, ImageEmbeds) else len(s)
                                                  for s in head)
        warm = [reader.prefill(segments)]
        assert reader.reused_positions == reader.held_positions(head) > 576
        warm.append(reader.step(int(np.argmax(warm[0]))))
        numbers = [cold.prefill(segments)]
        numbers.append(cold.step(int(np.argmax(numbers[0]))))
        return numbers, warm
    finally:
        for engine in (writer, reader, cold):
            engine.close()


@pytest.mark.parametrize("fixture", ["gguf_7b_f32", "gguf_7b_q4_k_m", "onnx_7b"])
def test_restored_prefix_gives_bitwise_the_cold_logits(fixture, request, tmp_path):
    """F32 (exact: F32 KV, no flash attention), Q4_K_M (llama.cpp's default F16 KV) and ONNX."""
    folder = request.getfixturevalue(fixture)
    opener = open_onnx if fixture.startswith("onnx") else open_gguf
    cold, warm = _engine_numbers(opener, folder, tmp_path)
    for a, b in zip(cold, warm):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["gguf", "onnx"])
def test_demo_answers_with_and_without_the_cache_are_identical(backend, cache_dir, monkeypatch):
    def ask(question, **load):
        with api.load(DEMO[backend], threads=1) as model:
            answer = model.ask(EXAMPLE, question, **GREEDY)
            return answer, model.feature_cache.disk

    first, disk = ask(FIRST)
    assert first.timings["prefix_cache_hit"] == 0 and disk.written == 2      # features + prefix
    second, disk = ask(SECOND)                       # a new model, as a new process would have
    assert second.timings["prefix_cache_hit"] == 1 and disk.hits == 2 and disk.written == 0
    monkeypatch.setenv(prefix_cache.ENV_OFF, "1")
    cold, disk = ask(SECOND)
    assert disk is None and cold.timings["prefix_cache_hit"] == 0
    assert second.token_ids == cold.token_ids and second.text == cold.text
    assert second.prompt_tokens == cold.prompt_tokens


def test_tampered_prefix_entry_is_refused_and_rewritten(cache_dir):
    with api.load(DEMO["gguf"], threads=1) as model:
        first = model.ask(EXAMPLE, FIRST, **GREEDY)
    entries = {p: p.read_bytes() for p in cache_dir.glob("*.hlc")}
    prefix = max(entries, key=lambda p: b'"kind": "prefix"' in entries[p])
    damaged = bytearray(entries[prefix])
    damaged[len(damaged) // 2] ^= 0xFF
    prefix.write_bytes(bytes(damaged))
    with api.load(DEMO["gguf"], threads=1) as model:
        again = model.ask(EXAMPLE, FIRST, **GREEDY)
        disk = model.feature_cache.disk
    assert again.timings["prefix_cache_hit"] == 0 and disk.refused == 1 and disk.written == 1
    assert again.token_ids == first.token_ids
    assert prefix.read_bytes() == entries[prefix]             # the same bytes written again


def test_the_torch_reference_does_not_use_the_disk(tiny_7b, cache_dir):
    with api.load(tiny_7b, backend="torch") as model:
        model.ask(EXAMPLE, FIRST, temperature=0, max_new_tokens=2)
    assert not cache_dir.exists() or not list(cache_dir.iterdir())


# --------------------------------------------------------------------- CLI ----
def _cli(*args, env=None):
    run = subprocess.run([sys.executable, "-m", "huatuo_lite.cli", *args], capture_output=True, text=True,
                         env={**os.environ, "HUATUO_LITE_NO_NOTICE": "1", **(env or {})}, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_second_ask_in_a_new_process_hits_and_answers_as_a_cold_run(cache_dir):
    ask = ["ask", "-m", str(DEMO["gguf"]), "--threads", "1", "--temperature", "0", "--json", str(EXAMPLE)]
    first = json.loads(_cli(*ask, FIRST))
    second = json.loads(_cli(*ask, SECOND))
    cold = json.loads(_cli("--no-cache", *ask, SECOND))
    assert (first["timings"]["prefix_cache_hit"], second["timings"]["prefix_cache_hit"]) == (0, 1)
    assert cold["timings"]["prefix_cache_hit"] == 0 and second["answer"] == cold["answer"]
    assert second["timings"]["prefill_s"] < cold["timings"]["prefill_s"]


def test_models_cache_info_and_clear(cache_dir, monkeypatch):
    from huatuo_lite.cli.main import cli

    DiskCache().put("a" * 64, "features", b"x" * 2000)
    runner = CliRunner()
    info = runner.invoke(cli, ["models", "cache", "info", "--json"])
    assert info.exit_code == 0 and json.loads(info.output)["entries"] == 1
    assert json.loads(info.output)["folder"] == str(cache_dir)
    cleared = runner.invoke(cli, ["models", "cache", "clear"])
    assert cleared.exit_code == 0 and "removed 1 cache entries" in cleared.output
    monkeypatch.setenv(prefix_cache.ENV_MAX_BYTES, "-5")
    bad = runner.invoke(cli, ["models", "cache", "info"])
    assert bad.exit_code == 1 and "HUATUO_LITE_CACHE_MAX_BYTES='-5' is not a size" in bad.output


def test_an_unusable_cache_folder_is_only_a_miss(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(prefix_cache.ENV_DIR, str(blocker / "cache"))    # below a file: cannot be made
    monkeypatch.delenv(prefix_cache.ENV_OFF, raising=False)
    with api.load(DEMO["gguf"], threads=1) as model:
        answer = model.ask(EXAMPLE, FIRST, **GREEDY)
        assert model.feature_cache.disk.written == 0 and answer.timings["prefix_cache_hit"] == 0
    monkeypatch.setenv(prefix_cache.ENV_OFF, "1")
    with api.load(DEMO["gguf"], threads=1) as model:
        assert model.ask(EXAMPLE, FIRST, **GREEDY).token_ids == answer.token_ids
