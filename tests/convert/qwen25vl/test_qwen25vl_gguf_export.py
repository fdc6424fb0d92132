"""The Qwen2.5-VL GGUF export on the tiny checkpoint: files stock llama.cpp loads, the keys its
qwen2vl / qwen2.5vl_merger loaders read, the manifest, the libmtmd self-test (and that it fails
on a wrong mmproj), the dispatch from `export_gguf`, both tensor layouts, and an interrupted run."""
from __future__ import annotations

import json

import pytest

from support.engines import skip_without

skip_without("torch", "transformers", "gguf", "llama_cpp")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from huatuo_lite.convert.qwen25vl.tiny import make_tiny_qwen25vl

    return make_tiny_qwen25vl(tmp_path_factory.mktemp("qwen-tiny") / "tiny", layout="before-4.52")


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """F32 (text + F32 mmproj) and Q8_0 (text + F16 mmproj) folders, self-tested."""
    from huatuo_lite.convert.qwen25vl.gguf import export_qwen25vl_gguf

    out = {}
    for quant, mmproj in (("F32", "F32"), ("Q8_0", "F16")):
        folder = tmp_path_factory.mktemp(f"qwen-gguf-{quant}")
        export_qwen25vl_gguf(tiny, folder, quant=quant, mmproj_type=mmproj, threads=1)
        out[quant] = folder
    return out


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _only(folder, role):
    names = [n for n, e in _manifest(folder)["files"].items() if e["role"] == role]
    assert len(names) == 1, names
    return folder / names[0]


def _fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_llama_cpp_loads_text_and_mmproj(exported, quant):
    import llama_cpp
    from llama_cpp import mtmd_cpp

    from huatuo_lite.backends.gguf_llama import load_model, quiet_llama

    quiet_llama()
    folder = exported[quant]
    model = load_model(_only(folder, "text"))
    try:
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.warmup = False, 1, False
        ctx = mtmd_cpp.mtmd_init_from_file(str(_only(folder, "mmproj")).encode(), model, params)
        assert ctx, "libmtmd refused the mmproj"
        assert mtmd_cpp.mtmd_support_vision(ctx) and mtmd_cpp.mtmd_decode_use_mrope(ctx)
        mtmd_cpp.mtmd_free(ctx)
        assert llama_cpp.llama_model_n_embd(model) == _manifest(folder)["text"]["n_embd"]
    finally:
        llama_cpp.llama_model_free(model)


def test_text_gguf_is_qwen2vl_with_rope_sections(exported, tiny):
    from gguf import GGMLQuantizationType as Q

    config = json.loads((tiny / "config.json").read_text())
    sections = config["rope_scaling"]["mrope_section"]
    fields, tensors = _fields(_only(exported["Q8_0"], "text"))
    assert fields["general.architecture"] == "qwen2vl"
    assert fields["qwen2vl.rope.dimension_sections"] == sections + [0] * (4 - len(sections))
    assert fields["qwen2vl.embedding_length"] == config["hidden_size"]
    assert fields["qwen2vl.rope.freq_base"] == pytest.approx(config["rope_theta"])
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.eos_token_id"] == config["eos_token_id"]
    assert "<|im_start|>" in fields["tokenizer.chat_template"] and "<|vision_start|>" in fields["tokenizer.chat_template"]
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == config["vocab_size"] and tokens[config["image_token_id"]] == "<|image_pad|>"
    assert tensors["blk.0.ffn_up.weight"].tensor_type == Q.Q8_0 and tensors["output_norm.weight"].tensor_type == Q.F32
    assert "blk.0.attn_q.bias" in tensors and not any(n.startswith(("v.", "mm.")) for n in tensors)


def test_mmproj_keys_and_tensors(exported, tiny):
    from gguf import GGMLQuantizationType as Q

    vision = json.loads((tiny / "config.json").read_text())["vision_config"]
    fields, tensors = _fields(_only(exported["Q8_0"], "mmproj"))
    fullatt = vision["fullatt_block_indexes"]
    expected = {"general.architecture": "clip", "general.type": "mmproj", "clip.projector_type": "qwen2.5vl_merger",
                "clip.has_vision_encoder": True, "clip.use_silu": True, "clip.vision.block_count": vision["depth"],
                "clip.vision.embedding_length": vision["hidden_size"], "clip.vision.patch_size": 14,
                "clip.vision.feed_forward_length": vision["intermediate_size"],
                "clip.vision.projection_dim": vision["out_hidden_size"], "clip.vision.n_wa_pattern": fullatt[0] + 1}
    assert {k: fields.get(k) for k in expected} == expected
    assert all((b + 1) % expected["clip.vision.n_wa_pattern"] == 0 for b in fullatt)   # the graph's full layers
    hidden = vision["hidden_size"]
    assert tuple(tensors["v.patch_embd.weight"].shape) == tuple(tensors["v.patch_embd.weight.1"].shape) == (14, 14, 3, hidden)
    assert tuple(tensors["v.blk.0.attn_q.weight"].shape) == (hidden, hidden)     # qkv cut in three
    assert {"v.post_ln.weight", "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias",
            f"v.blk.{vision['depth'] - 1}.ffn_gate.weight"} <= set(tensors)
    assert tensors["v.patch_embd.weight"].tensor_type == Q.F16 and tensors["v.post_ln.weight"].tensor_type == Q.F32
    f32 = _fields(_only(exported["F32"], "mmproj"))[1]
    assert {t.tensor_type for t in f32.values()} == {Q.F32}


def test_manifest(exported, tiny):
    from huatuo_lite.fsutil import sha256_file

    manifest = _manifest(exported["F32"])
    pre = json.loads((tiny / "preprocessor_config.json").read_text())
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert manifest["format"] == "gguf" and manifest["family"] == "qwen25vl" and manifest["variant"] == "7b-qwen25vl"
    assert manifest["image"] == {"min_pixels": pre["min_pixels"], "max_pixels": pre["max_pixels"]}
    assert {k: manifest["generation"][k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")} == \
        {k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")}
    assert manifest["text"]["eos_token_ids"] == sorted(gen["eos_token_id"]) and manifest["text"]["n_embd"] == 256
    assert sorted(e["role"] for e in manifest["files"].values()) == ["mmproj", "text"]
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(exported["F32"] / name) and entry["quant"]
    assert sorted(p.name for p in exported["F32"].iterdir()) == sorted([*manifest["files"], "manifest.json", "README.md"])


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_self_test_passes(exported, quant):
    verdict = _manifest(exported[quant])["mtmd_self_test"]
    assert verdict["passed"] is True, verdict
    assert verdict["min_cosine"] >= 0.999 and verdict["tokens"] == (140 // 28) * (252 // 28)
    print(f"\n{quant}: libmtmd vs transformers per-token cosine min {verdict['min_cosine']} mean {verdict['mean_cosine']}")


def test_self_test_fails_on_a_wrong_window_pattern(tiny, exported, tmp_path, monkeypatch):
    """The self-test can fail: an mmproj whose window pattern runs window attention in a block
    transformers runs with full attention (only the last block full) gives other features.
    (Pattern 1, full attention everywhere, aborts libmtmd: its graph then lacks the window mask.)"""
    from huatuo_lite.convert.qwen25vl import gguf_vision

    monkeypatch.setattr(gguf_vision, "window_pattern", lambda fullatt: fullatt[-1] + 1)
    from huatuo_lite.convert.qwen25vl.gguf import export_qwen25vl_gguf

    export_qwen25vl_gguf(tiny, tmp_path / "out", quant="F32", mmproj_type="F32", threads=1)
    verdict = _manifest(tmp_path / "out")["mtmd_self_test"]
    assert verdict["passed"] is False and verdict["min_cosine"] < 0.999, verdict


def test_convert_gguf_routes_qwen25vl(tiny, tmp_path):
    from huatuo_lite.convert.gguf.export import export_gguf

    out = export_gguf(tiny, tmp_path / "out", quant="F16", threads=1)
    manifest = _manifest(tmp_path / "out")
    assert out.name.endswith("-F16.gguf") and manifest["family"] == "qwen25vl"
    assert _fields(out)[0]["general.architecture"] == "qwen2vl"


def test_both_layouts_give_the_same_files(tiny, tmp_path):
    from huatuo_lite.convert.qwen25vl.gguf import export_qwen25vl_gguf
    from huatuo_lite.convert.qwen25vl.tiny import make_tiny_qwen25vl
    from huatuo_lite.fsutil import sha256_file

    new = make_tiny_qwen25vl(tmp_path / "new", layout="from-4.52")
    hashes = []
    for src, out in ((tiny, tmp_path / "a"), (new, tmp_path / "b")):
        export_qwen25vl_gguf(src, out, quant="F16", self_test=False, name="same", threads=1)
        hashes.append({n: sha256_file(out / n) for n in _manifest(out)["files"]})
    assert hashes[0] == hashes[1]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_export_leaves_nothing(tiny, tmp_path, monkeypatch, error):
    from huatuo_lite.convert.qwen25vl import gguf, gguf_vision

    def fail(*args, **kwargs):
        raise error("stop")

    monkeypatch.setattr(gguf_vision, "write_mmproj", fail)     # after the text GGUF is written
    with pytest.raises(error):
        gguf.export_qwen25vl_gguf(tiny, tmp_path / "out", quant=["F32", "Q4_K_M"], threads=1)
    assert list(tmp_path.iterdir()) == []      # no output folder, no staging folder, no intermediate


def test_bad_options_are_one_sentence(tiny, tmp_path):
    from huatuo_lite.convert.qwen25vl.gguf import export_qwen25vl_gguf
    from huatuo_lite.errors import HuatuoError

    with pytest.raises(HuatuoError, match="Unknown quant 'Q3_K'"):
        export_qwen25vl_gguf(tiny, tmp_path / "out", quant="Q3_K")
    with pytest.raises(HuatuoError, match="--imatrix is not supported"):
        export_qwen25vl_gguf(tiny, tmp_path / "out", imatrix="calib.json")
    assert not (tmp_path / "out").exists()
