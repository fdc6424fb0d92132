"""open_checkpoint: variant detection, dims, canonical names across layouts, lazy
tensors, and one clear sentence for every malformed folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from huatuo_lite.errors import ModelFormatError  # noqa: E402
from huatuo_lite.convert.checkpoint.read import (HF_NEW_PREFIXES, PROJECTOR_PREFIX, VISION_PREFIX,  # noqa: E402
                                            open_checkpoint, required_names, to_hf_name)
from huatuo_lite.convert.tiny.make import TinySizes, make_tiny  # noqa: E402

SIZES = TinySizes()


@pytest.fixture(scope="module")
def tiny(tiny_7b, tiny_34b, tiny_7b_hf):
    return {"7b": tiny_7b, "34b": tiny_34b, "7b-hf": tiny_7b_hf}


def _clone(src: Path, dst: Path, skip=()) -> Path:
    """A folder of symlinks to src's files (cheap), minus `skip`; edit by replacing links."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name not in skip:
            (dst / p.name).symlink_to(p.resolve(), target_is_directory=p.is_dir())
    return dst


def _edit_config(root: Path, **changes) -> None:
    cfg = json.loads((root / "config.json").read_text())
    cfg.update(changes)
    (root / "config.json").unlink()
    (root / "config.json").write_text(json.dumps(cfg))


def _all_tensors(root: Path) -> dict:
    out = {}
    for shard in sorted(root.glob("model-*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _single_file(src: Path, dst: Path, tensors: dict) -> Path:
    """src's files with the weights replaced by one model.safetensors holding `tensors`."""
    root = _clone(src, dst, skip={p.name for p in src.glob("model*.safetensors*")})
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    return root


# ----------------------------------------------------------------- happy ----
@pytest.mark.parametrize("variant, arch, bias, eos", [
    ("7b", "qwen2", True, None), ("34b", "llama", False, 2), ("7b-hf", "qwen2", True, None)])
def test_variants_and_dims(tiny, variant, arch, bias, eos):
    ckpt = open_checkpoint(tiny[variant])
    assert ckpt.variant.name == variant and ckpt.root == tiny[variant]
    t, v, p = ckpt.text, ckpt.vision, ckpt.projector
    assert (t.arch, t.attention_bias, t.tie_word_embeddings) == (arch, bias, False)
    assert (t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads) == \
        (SIZES.hidden_size, SIZES.intermediate_size, SIZES.num_layers, SIZES.num_heads, SIZES.num_kv_heads)
    assert t.vocab_size == ckpt.shape("model.embed_tokens.weight")[0]
    assert t.rope_theta == {"qwen2": 1e6, "llama": 5e6}[arch] and t.rms_norm_eps == 1e-6
    assert eos is None or t.eos_token_id == eos
    assert (v.hidden_size, v.intermediate_size, v.num_layers, v.num_heads) == \
        (SIZES.vision_hidden_size, SIZES.vision_intermediate_size, SIZES.vision_layers, SIZES.vision_heads)
    assert (v.image_size, v.patch_size, v.select_layer, v.hidden_act) == (336, 14, -2, "quick_gelu")
    assert (p.kind, p.in_features, p.out_features) == ("mlp2x_gelu", v.hidden_size, t.hidden_size)
    assert ckpt.tokenizer_dir == tiny[variant]
    assert ckpt.config["architectures"] == [ckpt.variant.architecture]


def test_7b_and_7b_hf_give_identical_canonical_tensors(tiny):
    a, b = open_checkpoint(tiny["7b"]), open_checkpoint(tiny["7b-hf"])
    assert sorted(a.names()) == sorted(b.names())
    assert set(required_names(a.text, a.vision)) <= set(a.names())
    for name in a.names():
        assert a.shape(name) == b.shape(name) and a.dtype(name) == b.dtype(name) == "bfloat16"
        assert torch.equal(a.get(name), b.get(name)), name


def test_transformers_452_layout_single_file(tiny, tmp_path):
    ref = open_checkpoint(tiny["7b-hf"])
    new = {to_hf_name(n, HF_NEW_PREFIXES): t for n, t in ref.iter_tensors()}
    assert "model.language_model.embed_tokens.weight" in new and "lm_head.weight" in new
    ckpt = open_checkpoint(_single_file(tiny["7b-hf"], tmp_path / "new", new))
    assert ckpt.variant.name == "7b-hf" and sorted(ckpt.names()) == sorted(ref.names())
    assert torch.equal(ckpt.get(PROJECTOR_PREFIX + "0.weight"), ref.get(PROJECTOR_PREFIX + "0.weight"))


def test_iter_tensors_streams_every_tensor_once_in_shard_order(tiny):
    ckpt = open_checkpoint(tiny["7b"])
    seen = [(name, t.dtype, tuple(t.shape)) for name, t in ckpt.iter_tensors()]
    assert [n for n, _, _ in seen] == ckpt.names()
    assert all(dtype == torch.bfloat16 and shape == ckpt.shape(n) for n, dtype, shape in seen)
    index = json.loads((tiny["7b"] / "model.safetensors.index.json").read_text())["weight_map"]
    shards = [index[n] for n, _, _ in seen]
    assert shards == sorted(shards)               # grouped: one shard open at a time
    vision = [n for n, _ in ckpt.iter_tensors(VISION_PREFIX)]
    assert vision and all(n.startswith(VISION_PREFIX) for n in vision)
    assert len([n for n, _ in ckpt.iter_tensors(PROJECTOR_PREFIX)]) == 4


def test_embedded_tower_wins_over_vit_copy_and_vit_config_gives_heads(tiny, tmp_path):
    src = make_tiny(tmp_path / "src", variant="7b", vision_heads=2, hidden_size=512, num_heads=8)
    ckpt = open_checkpoint(src)
    assert (ckpt.vision.num_heads, ckpt.text.hidden_size, ckpt.text.num_heads) == (2, 512, 8)
    vit = load_file(str(src / "vit/clip_vit_large_patch14_336/model.safetensors"))
    name = "embeddings.position_embedding.weight"
    assert not torch.equal(ckpt.get(VISION_PREFIX + name), vit["vision_model." + name].bfloat16())
    # Without the vit/ copy, the heads fall back to CLIP's head width of 64.
    bare = open_checkpoint(_clone(src, tmp_path / "bare", skip={"vit"}))
    assert bare.vision.num_heads == SIZES.vision_hidden_size // 64
    assert bare.vision.hidden_size == ckpt.vision.hidden_size


def test_pickle_opt_in(tiny, tmp_path):
    root = _clone(tiny["34b"], tmp_path / "pkl", skip={p.name for p in tiny["34b"].glob("model*.safetensors*")})
    torch.save(_all_tensors(tiny["34b"]), root / "pytorch_model.bin")
    with pytest.raises(ModelFormatError) as err:
        open_checkpoint(root)
    assert "pickle" in str(err.value) and "--allow-pickle" in str(err.value)
    ckpt = open_checkpoint(root, allow_pickle=True)
    ref = open_checkpoint(tiny["34b"])
    assert ckpt.variant.name == "34b" and sorted(ckpt.names()) == sorted(ref.names())
    name = "model.layers.1.mlp.down_proj.weight"
    assert ckpt.dtype(name) == "bfloat16" and torch.equal(ckpt.get(name), ref.get(name))
    assert sum(1 for _ in ckpt.iter_tensors()) == len(ref.names())


# ------------------------------------------------------------- malformed ----
def _drop(src, dst, *prefixes):
    tensors = {n: t for n, t in _all_tensors(src).items() if not n.startswith(prefixes)}
    return _single_file(src, dst, tensors)


def _rewrite_index(src, dst):
    root = _clone(src, dst, skip={"model.safetensors.index.json"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = "model-00001-of-00003.safetensors"
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def _bad_json(src, dst):
    root = _clone(src, dst, skip={"config.json"})
    (root / "config.json").write_text("{not json")
    return root


def _config_change(**changes):
    def make(src, dst):
        root = _clone(src, dst)
        _edit_config(root, **changes)
        return root
    return make


def _hf_tensors_under_llava_config(tiny):
    def make(src, dst):
        root = _clone(tiny["7b-hf"], dst, skip={"config.json"})
        shutil.copy(tiny["7b"] / "config.json", root / "config.json")
        return root
    return make


MALFORMED = {
    "no config": ("7b", lambda src, dst: _clone(src, dst, skip={"config.json"}),
                  ["not a model folder", "config.json"]),
    "bad json": ("7b", _bad_json, ["config.json", "JSON"]),
    "unknown architecture": ("7b", _config_change(architectures=["Qwen2_5_VLForConditionalGeneration"],
                                                  model_type="qwen2_5_vl"),
                             ["Qwen2_5_VLForConditionalGeneration", "LlavaQwen2ForCausalLM", "not a supported"]),
    "missing shard": ("7b", lambda src, dst: _clone(src, dst, skip={"model-00002-of-00003.safetensors"}),
                      ["model-00002-of-00003.safetensors", "missing", "index"]),
    "index/shard mismatch": ("7b", _rewrite_index, ["model.layers.0.mlp.extra.weight", "does not hold"]),
    "no weights": ("7b", lambda src, dst: _clone(src, dst, skip={p.name for p in src.glob("model*")}),
                   ["no weights", "model.safetensors"]),
    "no projector": ("34b", lambda src, dst: _drop(src, dst, PROJECTOR_PREFIX),
                     ["no projector", "text-only"]),
    "mm_hidden_size": ("7b", _config_change(mm_hidden_size=1024), ["mm_hidden_size", "1024", "256"]),
    "projector type": ("7b", _config_change(mm_projector_type="mlp3x_gelu"), ["mlp3x_gelu", "mlp2x_gelu"]),
    "missing tensor": ("7b", lambda src, dst: _drop(src, dst, "model.layers.1.mlp.down_proj"),
                       ["model.layers.1.mlp.down_proj.weight", "missing"]),
    "missing vision layer": ("7b", lambda src, dst: _drop(src, dst, VISION_PREFIX + "encoder.layers.0.mlp.fc1."),
                             [VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight", "missing"]),
    "missing lm_head": ("34b", lambda src, dst: _drop(src, dst, "lm_head"), ["lm_head.weight"]),
    "text-only model": ("7b", _config_change(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
                        ["Qwen2ForCausalLM", "not a supported"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_folders_get_one_clear_sentence(tiny, tmp_path, case):
    variant, make, words = MALFORMED[case]
    root = make(tiny[variant], tmp_path / "bad")
    with pytest.raises(ModelFormatError) as err:
        open_checkpoint(root)
    message = str(err.value)
    assert all(w in message for w in words), message
    assert "\n" not in message and message.endswith(".") and len(message) < 400


def test_config_and_tensor_layout_must_agree(tiny, tmp_path):
    root = _hf_tensors_under_llava_config(tiny)(tiny["7b"], tmp_path / "mix")
    with pytest.raises(ModelFormatError, match="do not belong together"):
        open_checkpoint(root)


def test_not_a_folder(tmp_path):
    with pytest.raises(ModelFormatError, match="not a model folder"):
        open_checkpoint(tmp_path / "nowhere")


def test_saved_buffers_are_not_weights(tiny, tmp_path):
    tensors = _all_tensors(tiny["7b"])
    tensors[VISION_PREFIX + "embeddings.position_ids"] = torch.arange(577).unsqueeze(0)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(32)
    ckpt = open_checkpoint(_single_file(tiny["7b"], tmp_path / "buffers", tensors))
    assert sorted(ckpt.names()) == sorted(open_checkpoint(tiny["7b"]).names())
