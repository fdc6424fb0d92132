"""The tiny checkpoints are format-exact copies of the upstream layouts: config
keys, shard files and index, tensor names and dtypes, and working tokenizers."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402

from huatuo_lite.errors import HuatuoError  # noqa: E402
from huatuo_lite.families.llava import (CONTEXT_LENGTH, IMAGE_MEAN, IMAGE_STD, IMAGE_TOKENS,  # noqa: E402
                                VARIANTS, VISION_SELECT_LAYER)
from huatuo_lite.convert.tiny.make import TinySizes, make_tiny  # noqa: E402

SIZES = TinySizes()
TEXTS = [
    "<|user|>\n<image>\n这张胸部X光片显示了什么异常？\n<|assistant|>\n",
    "The chest radiograph shows a right lower lobe consolidation, 12 mm. \n",
    "  two  spaces, émoji 🩺 and 肺炎 mixed\twith tabs\n\nend",
]
LLAVA_KEYS = ["architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "vocab_size", "rope_theta", "rms_norm_eps",
              "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
              "torch_dtype", "hidden_act", "mm_vision_tower", "mm_projector_type", "mm_hidden_size",
              "mm_vision_select_layer", "mm_vision_select_feature", "image_aspect_ratio",
              "tokenizer_model_max_length", "tokenizer_padding_side", "use_mm_proj"]
QWEN2_ONLY = ["use_sliding_window", "sliding_window", "max_window_layers"]
YI_ONLY = ["pad_token_id", "attention_bias", "pretraining_tp"]
NEVER = ["mm_patch_merge_type", "mm_use_im_start_end", "text_config", "vision_config", "rope_parameters"]
SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


def _config(root: Path) -> dict:
    return json.loads((root / "config.json").read_text())


def _shard_tensors(root: Path) -> dict:
    """{stored name: (shard file, dtype, shape)} read from the shard headers."""
    out = {}
    for shard in sorted(root.glob("model-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                view = f.get_slice(name)
                out[name] = (shard.name, view.get_dtype(), tuple(view.get_shape()))
    return out


@pytest.fixture(scope="module")
def tiny(tiny_7b, tiny_34b, tiny_7b_hf):
    return {"7b": tiny_7b, "34b": tiny_34b, "7b-hf": tiny_7b_hf}


# ----------------------------------------------------------------- config ----
@pytest.mark.parametrize("variant, only, absent", [("7b", QWEN2_ONLY, YI_ONLY), ("34b", YI_ONLY, QWEN2_ONLY)])
def test_llava_config_keys_are_upstream(tiny, variant, only, absent):
    cfg = _config(tiny[variant])
    v = VARIANTS[variant]
    assert cfg["architectures"] == [v.architecture] and cfg["model_type"] == v.model_type
    assert [k for k in LLAVA_KEYS + only if k not in cfg] == []
    assert [k for k in NEVER + absent if k in cfg] == []
    assert cfg["mm_vision_tower"] == "./vit/clip_vit_large_patch14_336"
    assert (cfg["mm_projector_type"], cfg["mm_vision_select_feature"], cfg["image_aspect_ratio"]) == \
        ("mlp2x_gelu", "patch", "pad")
    assert cfg["mm_vision_select_layer"] == VISION_SELECT_LAYER == -2
    assert cfg["mm_hidden_size"] == SIZES.vision_hidden_size
    assert cfg["tokenizer_model_max_length"] == CONTEXT_LENGTH
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "bfloat16"
    assert cfg["rms_norm_eps"] == 1e-6
    assert (cfg["hidden_size"], cfg["intermediate_size"]) == (SIZES.hidden_size, SIZES.intermediate_size)
    assert cfg["hidden_size"] % 256 == 0 and cfg["intermediate_size"] % 256 == 0


def test_qwen2_specifics(tiny):
    cfg = _config(tiny["7b"])
    assert cfg["rope_theta"] == 1e6 and cfg["use_sliding_window"] is False
    assert cfg["bos_token_id"] == cfg["eos_token_id"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]


def test_yi_specifics(tiny):
    cfg = _config(tiny["34b"])
    assert cfg["rope_theta"] == 5e6 and cfg["max_position_embeddings"] == 4096
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    assert not any(n.endswith("q_proj.bias") and "vision" not in n for n in _shard_tensors(tiny["34b"]))


def test_hf_config_is_llava_layout(tiny):
    cfg = _config(tiny["7b-hf"])
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and cfg["model_type"] == "llava"
    assert cfg["text_config"]["model_type"] == "qwen2" and cfg["text_config"]["rope_theta"] == 1e6
    assert cfg["vision_config"]["model_type"] == "clip_vision_model"
    assert cfg["vision_config"]["hidden_size"] != cfg["vision_config"]["intermediate_size"]
    assert (cfg["vision_feature_layer"], cfg["vision_feature_select_strategy"]) == (-2, "default")
    assert cfg["projector_hidden_act"] == "gelu" and cfg["image_seq_length"] == IMAGE_TOKENS == 576
    assert not any(k.startswith("mm_") for k in cfg)


def test_generation_config_matches_config(tiny):
    for root in tiny.values():
        cfg, gen = _config(root), json.loads((root / "generation_config.json").read_text())
        text = cfg.get("text_config", cfg)
        assert (gen["bos_token_id"], gen["eos_token_id"]) == (text["bos_token_id"], text["eos_token_id"])


# ---------------------------------------------------------------- tensors ----
@pytest.mark.parametrize("variant", ["7b", "34b", "7b-hf"])
def test_shards_and_index_agree(tiny, variant):
    root = tiny[variant]
    shards = sorted(p.name for p in root.glob("model-*.safetensors"))
    counts = {SHARD_NAME.fullmatch(s).group(2) for s in shards}
    assert len(shards) >= 2 and counts == {f"{len(shards):05d}"}
    index = json.loads((root / "model.safetensors.index.json").read_text())
    stored = _shard_tensors(root)
    assert index["weight_map"] == {n: shard for n, (shard, _, _) in stored.items()}
    nbytes = sum(2 * torch.Size(shape).numel() for _, _, shape in stored.values())
    assert index["metadata"]["total_size"] == nbytes
    assert {dtype for _, dtype, _ in stored.values()} == {"BF16"}
    assert not list(root.glob("*.bin")) and not any("position_ids" in n for n in stored)


@pytest.mark.parametrize("variant, embed, projector, vision", [
    ("7b", "model.embed_tokens.weight", "model.mm_projector.0.weight",
     "model.vision_tower.vision_tower.vision_model."),
    ("34b", "model.embed_tokens.weight", "model.mm_projector.2.bias",
     "model.vision_tower.vision_tower.vision_model."),
    ("7b-hf", "language_model.model.embed_tokens.weight", "multi_modal_projector.linear_1.weight",
     "vision_tower.vision_model."),
])
def test_upstream_tensor_names(tiny, variant, embed, projector, vision):
    stored = _shard_tensors(tiny[variant])
    cfg = _config(tiny[variant])
    rows = cfg.get("text_config", cfg)["vocab_size"]
    assert stored[embed][2] == (rows, SIZES.hidden_size)
    assert projector in stored
    assert stored[vision + "embeddings.position_embedding.weight"][2] == (IMAGE_TOKENS + 1, SIZES.vision_hidden_size)
    assert stored[vision + "embeddings.patch_embedding.weight"][2] == (SIZES.vision_hidden_size, 3, 14, 14)
    assert vision + "embeddings.patch_embedding.bias" not in stored
    assert vision + "pre_layrnorm.weight" in stored          # sic, as upstream
    lm_head = "language_model.lm_head.weight" if variant == "7b-hf" else "lm_head.weight"
    assert stored[lm_head][2] == (rows, SIZES.hidden_size)


def test_weights_are_plain_random(tiny):
    with safe_open(str(next(tiny["7b"].glob("model-00001-*"))), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight").float()
        norm = f.get_tensor("model.layers.0.input_layernorm.weight").float()
    assert abs(embed.std().item() - 0.02) < 0.002 and abs(embed.mean().item()) < 0.002
    assert abs(norm.mean().item() - 1.0) < 0.01 and norm.std().item() > 0.005


def test_vit_folder_is_a_full_clip_copy(tiny):
    vit = tiny["7b"] / "vit" / "clip_vit_large_patch14_336"
    cfg = json.loads((vit / "config.json").read_text())
    assert cfg["architectures"] == ["CLIPModel"] and {"text_config", "vision_config"} <= set(cfg)
    assert cfg["vision_config"]["hidden_size"] == SIZES.vision_hidden_size
    assert cfg["vision_config"]["hidden_act"] == "quick_gelu"
    pre = json.loads((vit / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": 336, "width": 336} and pre["size"] == {"shortest_edge": 336}
    assert (pre["image_mean"], pre["image_std"], pre["resample"]) == (list(IMAGE_MEAN), list(IMAGE_STD), 3)
    name = "vision_model.embeddings.class_embedding"
    with safe_open(str(vit / "model.safetensors"), "pt") as f:
        vit_class = f.get_tensor(name)
        assert any(k.startswith("text_model.") for k in f.keys())
    # The copy is the "original CLIP": other values than the embedded (trained) tower.
    embedded = "model.vision_tower.vision_tower." + name
    shard = _shard_tensors(tiny["7b"])[embedded][0]
    with safe_open(str(tiny["7b"] / shard), "pt") as f:
        assert vit_class.shape == f.get_tensor(embedded).shape
        assert not torch.equal(vit_class.bfloat16(), f.get_tensor(embedded))


# -------------------------------------------------------------- tokenizer ----
@pytest.mark.parametrize("variant", ["7b", "34b", "7b-hf"])
def test_tokenizers_load_and_round_trip(tiny, variant):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    root = tiny[variant]
    fast = AutoTokenizer.from_pretrained(str(root))
    slow = AutoTokenizer.from_pretrained(str(root), use_fast=False)
    raw = Tokenizer.from_file(str(root / "tokenizer.json"))
    for text in TEXTS:
        ids = fast(text, add_special_tokens=False).input_ids
        assert slow(text, add_special_tokens=False).input_ids == ids
        assert raw.encode(text, add_special_tokens=False).ids == ids
        assert fast.decode(ids) == text
        assert max(ids) < len(fast)


def test_qwen2_tokenizer_layout(tiny):
    from transformers import AutoTokenizer

    cfg = _config(tiny["7b"])
    tok = AutoTokenizer.from_pretrained(str(tiny["7b"]))
    tcfg = json.loads((tiny["7b"] / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "Qwen2Tokenizer" and tcfg["bos_token"] is None
    assert tcfg["model_max_length"] == CONTEXT_LENGTH and tcfg["chat_template"] is None
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert eos == cfg["eos_token_id"] == cfg["bos_token_id"] == tok.eos_token_id
    specials = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    assert specials == [eos, eos + 1, eos + 2] and len(tok) == eos + 3       # right after the vocab
    assert cfg["vocab_size"] > len(tok) and cfg["vocab_size"] % 128 == 0
    # The prompt tags are plain text, a few pieces each, no special ids.
    ids = tok("<|user|>\n<image>\n", add_special_tokens=False).input_ids
    assert 1 < len(ids) <= 8 and not set(ids) & set(specials)
    assert tok("hello", add_special_tokens=True).input_ids == tok("hello", add_special_tokens=False).input_ids


def test_yi_tokenizer_layout(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny["34b"]), use_fast=False)
    assert type(tok).__name__ == "LlamaTokenizer"
    assert [tok.convert_ids_to_tokens(i) for i in (0, 1, 2)] == ["<unk>", "<|startoftext|>", "<|endoftext|>"]
    assert len(tok) == _config(tiny["34b"])["vocab_size"]
    assert tok("hi").input_ids == tok("hi", add_special_tokens=False).input_ids     # no BOS added
    assert "<0xF0>" in tok.convert_ids_to_tokens(tok("🩺", add_special_tokens=False).input_ids)


def test_hf_image_token(tiny):
    from transformers import AutoTokenizer

    cfg = _config(tiny["7b-hf"])
    tok = AutoTokenizer.from_pretrained(str(tiny["7b-hf"]))
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == cfg["image_token_index"] == tok.convert_tokens_to_ids("<|endoftext|>") + 3
    assert tok("<image>\nwhat", add_special_tokens=False).input_ids[0] == image_id
    assert image_id < cfg["text_config"]["vocab_size"] == _config(tiny["7b"])["vocab_size"]


# -------------------------------------------------------------- make_tiny ----
def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny):
    again = make_tiny(tmp_path / "again", variant="7b-hf", seed=0)
    assert _digest(again) == _digest(tiny["7b-hf"])
    other = make_tiny(tmp_path / "other", variant="7b-hf", seed=1)
    assert _digest(other) != _digest(again)
    assert (other / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]      # no leftovers


@pytest.mark.parametrize("kwargs, words", [
    ({"variant": "13b"}, ["13b", "7b-hf"]),
    ({"hidden": 64}, ["hidden", "hidden_size"]),
    ({"vision_intermediate_size": 256}, ["vision_intermediate_size", "differ"]),
    ({"hidden_size": 250}, ["multiple of num_heads"]),
])
def test_make_tiny_refuses_bad_arguments(tmp_path, kwargs, words):
    with pytest.raises(HuatuoError) as err:
        make_tiny(tmp_path / "m", **kwargs)
    assert all(w in str(err.value) for w in words)
    assert not (tmp_path / "m").exists()


def test_make_tiny_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(HuatuoError, match="not empty"):
        make_tiny(tmp_path / "m")
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"
