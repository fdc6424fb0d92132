"""The torch reference backend against a forward pass written out by hand.

The hand-written pass reads the raw safetensors shards and config.json of a tiny
upstream-format folder (its own name table, not convert/checkpoint/read.py's) and
runs plain torch ops: CLIP (patch conv, class + position embeddings,
pre_layrnorm, encoder layers with quick_gelu, hidden_states[-2], CLS dropped) ->
Linear-GELU-Linear -> spliced into the token embeddings -> a Qwen2/Llama decoder
(RMSNorm, RoPE, GQA, SiLU MLP) -> lm_head. Everything in float32.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from huatuo_lite.backends import load_backend  # noqa: E402
from huatuo_lite.backends.base import ImageEmbeds  # noqa: E402
from huatuo_lite.families.llava import IMAGE_LINE, IMAGE_PLACEHOLDER, USER_TAG, ASSISTANT_TAG  # noqa: E402

VARIANT_FIXTURES = ["tiny_7b", "tiny_34b", "tiny_7b_hf"]
ATOL = 1e-5

# Raw stored prefix -> short role prefix, for every layout upstream used. Written
# here independently of the converter's table, so a wrong mapping there is caught.
RAW_PREFIXES = (
    ("model.vision_tower.vision_tower.vision_model.", "v."),   # llava (7B, 34B)
    ("model.mm_projector.0.", "p1."),
    ("model.mm_projector.2.", "p2."),
    ("model.", "t."),
    ("vision_tower.vision_model.", "v."),                        # -hf, 2024
    ("multi_modal_projector.linear_1.", "p1."),
    ("multi_modal_projector.linear_2.", "p2."),
    ("language_model.model.", "t."),
    ("language_model.lm_head.", "head."),
    ("lm_head.", "head."),
)


# ------------------------------------------------------------- raw folder ----
def raw_weights(folder: Path) -> dict:
    """Every tensor of the top-level shards (not the vit/ copy) as float32, by role name."""
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for name, tensor in load_file(str(shard)).items():
            role = next(short + name[len(raw):] for raw, short in RAW_PREFIXES if name.startswith(raw))
            weights[role] = tensor.float()
    return weights


def raw_configs(folder: Path) -> tuple[dict, dict]:
    """(text config, vision config) dicts from config.json (and vit/ for llava)."""
    config = json.loads((folder / "config.json").read_text())
    if "text_config" in config:
        return config["text_config"], config["vision_config"]
    vit = json.loads((folder / config["mm_vision_tower"] / "config.json").read_text())
    return config, vit["vision_config"]


# ------------------------------------------------------- hand-made vision ----
def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def linear(x, w, b=None):
    return x @ w.T + (b if b is not None else 0.0)


def clip_layer(x, W, p, heads, eps):
    """One CLIP encoder layer, x [N, S, D]."""
    n, s, d = x.shape
    hd = d // heads
    h = layer_norm(x, W[p + "layer_norm1.weight"], W[p + "layer_norm1.bias"], eps)
    q, k, v = (linear(h, W[f"{p}self_attn.{n_}_proj.weight"], W[f"{p}self_attn.{n_}_proj.bias"])
               .view(n, s, heads, hd).transpose(1, 2) for n_ in "qkv")       # [N, heads, S, hd]
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)    # no mask in CLIP
    h = (att @ v).transpose(1, 2).reshape(n, s, d)
    x = x + linear(h, W[p + "self_attn.out_proj.weight"], W[p + "self_attn.out_proj.bias"])
    h = layer_norm(x, W[p + "layer_norm2.weight"], W[p + "layer_norm2.bias"], eps)
    h = linear(h, W[p + "mlp.fc1.weight"], W[p + "mlp.fc1.bias"])
    h = h * torch.sigmoid(1.702 * h)                                          # quick_gelu
    return x + linear(h, W[p + "mlp.fc2.weight"], W[p + "mlp.fc2.bias"])


def hand_image_features(W, vcfg, pixels) -> torch.Tensor:
    """[N, 3, 336, 336] -> projected features [N, 576, H]."""
    eps, heads, patch = vcfg["layer_norm_eps"], vcfg["num_attention_heads"], vcfg["patch_size"]
    x = torch.nn.functional.conv2d(pixels, W["v.embeddings.patch_embedding.weight"], stride=patch)
    x = x.flatten(2).transpose(1, 2)                                         # [N, 576, D]
    cls = W["v.embeddings.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + W["v.embeddings.position_embedding.weight"]
    x = layer_norm(x, W["v.pre_layrnorm.weight"], W["v.pre_layrnorm.bias"], eps)
    hidden_states = [x]
    for j in range(vcfg["num_hidden_layers"]):
        x = clip_layer(x, W, f"v.encoder.layers.{j}.", heads, eps)
        hidden_states.append(x)
    feats = hidden_states[-2][:, 1:]                                         # drop CLS
    h = torch.nn.functional.gelu(linear(feats, W["p1.weight"], W["p1.bias"]))  # exact (erf) GELU
    return linear(h, W["p2.weight"], W["p2.bias"])


# ------------------------------------------------------ hand-made decoder ----
def rms_norm(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x, theta):
    """Rotate-half RoPE on x [heads, L, hd] at positions 0..L-1."""
    hd, length = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * cos + half * sin


def decoder_layer(x, W, p, tcfg):
    """One Qwen2/Llama layer, x [L, H]."""
    length, hidden = x.shape
    heads, kv_heads = tcfg["num_attention_heads"], tcfg["num_key_value_heads"]
    hd = hidden // heads
    h = rms_norm(x, W[p + "input_layernorm.weight"], tcfg["rms_norm_eps"])
    proj = {n: linear(h, W[f"{p}self_attn.{n}_proj.weight"], W.get(f"{p}self_attn.{n}_proj.bias"))
            for n in "qkv"}
    q = rope(proj["q"].view(length, heads, hd).transpose(0, 1), tcfg["rope_theta"])
    k = rope(proj["k"].view(length, kv_heads, hd).transpose(0, 1), tcfg["rope_theta"])
    v = proj["v"].view(length, kv_heads, hd).transpose(0, 1)
    group = heads // kv_heads                     # query head i reads kv head i // group
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    att = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    h = (att @ v).transpose(0, 1).reshape(length, hidden)
    x = x + linear(h, W[p + "self_attn.o_proj.weight"])
    h = rms_norm(x, W[p + "post_attention_layernorm.weight"], tcfg["rms_norm_eps"])
    gate, up = linear(h, W[p + "mlp.gate_proj.weight"]), linear(h, W[p + "mlp.up_proj.weight"])
    return x + linear(torch.nn.functional.silu(gate) * up, W[p + "mlp.down_proj.weight"])


def hand_logits(W, tcfg, embeds) -> torch.Tensor:
    """[L, H] input embeddings -> [L, V] logits."""
    x = embeds
    for i in range(tcfg["num_hidden_layers"]):
        x = decoder_layer(x, W, f"t.layers.{i}.", tcfg)
    x = rms_norm(x, W["t.norm.weight"], tcfg["rms_norm_eps"])
    return linear(x, W.get("head.weight", W["t.embed_tokens.weight"]))


def hand_prompt_logits(W, tcfg, vcfg, chunks, pixels) -> np.ndarray:
    """Token chunks with one image between consecutive chunks -> [L, V] logits."""
    feats = hand_image_features(W, vcfg, torch.from_numpy(pixels))
    parts = []
    for i, ids in enumerate(chunks):
        if i:
            parts.append(feats[i - 1])
        parts.append(W["t.embed_tokens.weight"][torch.tensor(ids, dtype=torch.long)])
    return hand_logits(W, tcfg, torch.cat(parts)).numpy()


# ----------------------------------------------------------------- set-up ----
@pytest.fixture(scope="module", params=VARIANT_FIXTURES)
def case(request):
    folder = Path(request.getfixturevalue(request.param))
    engine = load_backend("torch").open_engine(folder, threads=1)
    tcfg, vcfg = raw_configs(folder)
    yield folder, engine, raw_weights(folder), tcfg, vcfg
    engine.close()


def prompt_chunks(engine, n_images: int, question: str = "What abnormality is seen in this chest X-ray?"):
    """The upstream prompt split at <image> and tokenized chunk by chunk."""
    text = USER_TAG + IMAGE_LINE * n_images + question + "\n" + ASSISTANT_TAG
    return [engine.tokenize(chunk) for chunk in text.split(IMAGE_PLACEHOLDER)]


def random_pixels(n: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def interleave(chunks, features):
    segments = [chunks[0]]
    for feats, ids in zip(features, chunks[1:]):
        segments += [ImageEmbeds(feats), ids]
    return segments


# ------------------------------------------------------------------ tests ----
@pytest.mark.parametrize("n_images", [1, 2])
def test_first_token_logits_match_hand_forward(case, n_images):
    folder, engine, W, tcfg, vcfg = case
    chunks = prompt_chunks(engine, n_images)
    pixels = random_pixels(n_images, vcfg["image_size"])
    features = engine.encode_images(pixels)
    assert features.shape == (n_images, (vcfg["image_size"] // vcfg["patch_size"]) ** 2, engine.hidden_size)
    assert features.dtype == np.float32
    with torch.no_grad():
        want_feats = hand_image_features(W, vcfg, torch.from_numpy(pixels)).numpy()
        want = hand_prompt_logits(W, tcfg, vcfg, chunks, pixels)
    np.testing.assert_allclose(features, want_feats, atol=ATOL, rtol=0)
    got = engine.prefill(interleave(chunks, features))
    assert got.shape == (W["t.embed_tokens.weight"].shape[0],) and got.dtype == np.float32
    np.testing.assert_allclose(got, want[-1], atol=ATOL, rtol=0)
    every = engine.prefill(interleave(chunks, features), all_logits=True)
    np.testing.assert_allclose(every, want, atol=ATOL, rtol=0)
    assert np.abs(want[-1]).max() > 1e-2   # the comparison is not between near-zeros


def test_step_after_prefill_equals_longer_prefill(case):
    folder, engine, W, tcfg, vcfg = case
    chunks = prompt_chunks(engine, 1)
    features = engine.encode_images(random_pixels(1, vcfg["image_size"], seed=2))
    extra = engine.tokenize(" The chest radiograph shows")
    engine.prefill(interleave(chunks, features))
    stepped = [engine.step(t) for t in extra]
    longer = interleave(chunks[:-1] + [chunks[-1] + extra], features)
    full = engine.prefill(longer, all_logits=True)
    np.testing.assert_allclose(np.stack(stepped), full[-len(extra):], atol=ATOL, rtol=0)


def test_tokenize_matches_upstream_chunks(case):
    from transformers import AutoTokenizer

    folder, engine, *_ = case
    tok = AutoTokenizer.from_pretrained(str(folder))
    text = USER_TAG + IMAGE_LINE * 2 + "这张胸部X光片显示了什么异常？ Is it pneumonia?\n" + ASSISTANT_TAG
    for chunk in text.split(IMAGE_PLACEHOLDER):
        assert engine.tokenize(chunk) == tok(chunk).input_ids   # upstream: tokenizer(chunk).input_ids
    assert engine.tokenize(USER_TAG) and len(engine.tokenize(USER_TAG)) > 1  # tags are not special


@pytest.mark.parametrize("text", ["The chest radiograph shows a right lower lobe consolidation. \n",
                                  "右下肺叶实变，符合肺炎表现。", "  spaced  out\n\nlines 12 mm é ∑ 🙂"])
def test_token_bytes_reassemble_text(case, text):
    _, engine, *_ = case
    ids = engine.tokenize(text)
    assert b"".join(engine.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_engine_metadata(case):
    folder, engine, W, tcfg, _ = case
    assert engine.name == "torch"
    assert engine.hidden_size == W["t.embed_tokens.weight"].shape[1]
    eos = tcfg["eos_token_id"]
    assert engine.eos_token_ids == frozenset(eos if isinstance(eos, list) else [eos])
    assert 0 < engine.n_ctx <= tcfg["max_position_embeddings"]
    rows = W["t.embed_tokens.weight"].shape[0]
    assert engine.token_bytes(rows - 1) == b"" or rows <= len(engine.tokenizer)
    # Special tokens print nothing: upstream decodes with skip_special_tokens=True.
    assert all(engine.token_bytes(i) == b"" for i in engine.eos_token_ids)
    assert engine.token_bytes(engine.tokenize("X")[0]) == b"X"


def test_greedy_decoding_matches_transformers_generate(case):
    folder, engine, W, tcfg, vcfg = case
    chunks = prompt_chunks(engine, 1)
    features = engine.encode_images(random_pixels(1, vcfg["image_size"], seed=3))
    logits = engine.prefill(interleave(chunks, features))
    ours = []
    for _ in range(8):
        ours.append(int(np.argmax(logits)))
        logits = engine.step(ours[-1])
    embeds = torch.cat([engine.model.get_input_embeddings()(torch.tensor(chunks[0])),
                        torch.from_numpy(features[0]),
                        engine.model.get_input_embeddings()(torch.tensor(chunks[1]))])[None]
    with torch.inference_mode():
        theirs = engine.model.generate(inputs_embeds=embeds, do_sample=False, max_new_tokens=8,
                                       min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    assert ours == theirs[0].tolist()


# ------------------------------------------------------------ refusals ----
class _Without:
    """A checkpoint that hides one tensor (a broken or truncated download)."""

    def __init__(self, ckpt, hidden):
        self._ckpt, self._hidden = ckpt, hidden

    def __getattr__(self, name):
        return getattr(self._ckpt, name)

    def iter_tensors(self, prefix=""):
        return ((n, t) for n, t in self._ckpt.iter_tensors(prefix) if n != self._hidden)


@pytest.mark.parametrize("hidden", ["model.vision_tower.vision_tower.vision_model.post_layernorm.weight",
                                    "model.layers.1.mlp.up_proj.weight", "lm_head.weight"])
def test_missing_tensor_is_refused_not_reinitialised(tiny_7b, hidden):
    from huatuo_lite.convert.reference.build import build_model
    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.errors import ModelFormatError

    with pytest.raises(ModelFormatError):
        build_model(_Without(open_checkpoint(tiny_7b), hidden))


def test_bad_inputs_get_one_sentence(tiny_34b):
    from huatuo_lite.errors import HuatuoError, ImageError, PromptError

    engine = load_backend("torch").open_engine(tiny_34b)
    with pytest.raises(PromptError):
        engine.prefill([])
    with pytest.raises(PromptError):
        engine.prefill([[engine.vocab_rows]])
    with pytest.raises(PromptError):
        engine.prefill([[5] * (engine.n_ctx + 1)])
    with pytest.raises(PromptError):
        engine.prefill([[5], ImageEmbeds(np.zeros((4, engine.hidden_size + 1), np.float32))])
    with pytest.raises(ImageError):
        engine.encode_images(np.zeros((1, 3, 224, 224), np.float32))
    with pytest.raises(HuatuoError):
        load_backend("torch").open_engine(tiny_34b, dtype="int3")


def test_bfloat16_stays_close_to_float32(tiny_7b):
    backend = load_backend("torch")
    f32, bf16 = backend.open_engine(tiny_7b), backend.open_engine(tiny_7b, dtype="bfloat16")
    pixels = random_pixels(1, f32.image_size, seed=4)
    chunks = prompt_chunks(f32, 1)
    want = f32.prefill(interleave(chunks, f32.encode_images(pixels)))
    got = bf16.prefill(interleave(chunks, bf16.encode_images(pixels)))
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert np.corrcoef(got, want)[0, 1] > 0.999
