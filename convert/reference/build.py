"""Build transformers' own LlavaForConditionalGeneration from a Checkpoint.

The reference backend runs the model through transformers (4.57) classes, not
through code of ours, so that it is an independent judge of the GGUF and ONNX
ports. This module only translates: checkpoint dims -> LlavaConfig, canonical
tensor names -> the Llava state-dict keys, and loads every tensor exactly once
into a model built without weights (a 7B is never randomly initialised).
"""
from __future__ import annotations

import torch

from huatuo_lite.errors import HuatuoError, ModelFormatError
from huatuo_lite.families.text import TEXT_ARCHS

# User-facing dtype names -> torch dtypes. float32 is the reference.
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# Upstream mm_projector_type -> transformers' projector_hidden_act.
PROJECTOR_ACTS = {"mlp2x_gelu": "gelu"}

# Canonical (upstream 7B layout) prefix -> transformers 4.57 Llava state-dict
# prefix. Checked in order: the vision and projector prefixes also start with
# "model.", so they must come before the language-model catch-all.
NAME_PREFIXES = (
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_model."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
EMBED_NAME = "model.embed_tokens.weight"
LM_HEAD_NAME = "lm_head.weight"


def torch_dtype(name: str) -> torch.dtype:
    """'float32' / 'bfloat16' -> torch dtype; anything else is one clear sentence."""
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise HuatuoError(
            f"The torch backend cannot compute in {name!r}: use one of {', '.join(DTYPES)}."
        ) from None


def hf_name(canonical: str) -> str:
    """A canonical tensor name -> its key in LlavaForConditionalGeneration.state_dict()."""
    for prefix, target in NAME_PREFIXES:
        if canonical.startswith(prefix):
            return target + canonical[len(prefix):]
    raise ModelFormatError(f"The checkpoint holds an unexpected tensor {canonical!r}; is it a HuatuoGPT-Vision model?")


def _text_config(text):
    """TextConfig -> Qwen2Config or LlamaConfig (Yi): the class and its constant kwargs are
    TextArch.config_class / reference_kwargs. Both read rope_theta at top level."""
    import transformers

    common = dict(
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_kv_heads,
        vocab_size=text.vocab_size,
        rope_theta=text.rope_theta,
        rms_norm_eps=text.rms_norm_eps,
        max_position_embeddings=text.max_position_embeddings,
        hidden_act="silu",
        # lm_head is always loaded explicitly (copied from the embeddings when tied),
        # so transformers must not tie or re-tie anything behind our back.
        tie_word_embeddings=False,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
    )
    arch = TEXT_ARCHS.get(text.arch)
    if arch is None:
        raise ModelFormatError(
            f"The text model architecture {text.arch!r} is not supported: expected one of {', '.join(TEXT_ARCHS)}."
        )
    # Qwen2 always has q/k/v bias and no o bias; Llama takes a flag (Yi: no bias).
    bias = {arch.reference_bias_kwarg: text.attention_bias} if arch.reference_bias_kwarg else {}
    return getattr(transformers, arch.config_class)(**arch.reference_kwargs, **bias, **common)


def _vision_config(vision):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        layer_norm_eps=vision.layer_norm_eps,
        hidden_act=vision.hidden_act,
        num_channels=3,
    )


def llava_config(ckpt, attn_implementation: str = "sdpa"):
    """Checkpoint dims -> LlavaConfig (features from hidden_states[select_layer], CLS dropped)."""
    from transformers import LlavaConfig

    try:
        act = PROJECTOR_ACTS[ckpt.projector.kind]
    except KeyError:
        raise ModelFormatError(
            f"The projector type {ckpt.projector.kind!r} is not supported: expected one of {', '.join(PROJECTOR_ACTS)}."
        ) from None
    config = LlavaConfig(
        vision_config=_vision_config(ckpt.vision),
        text_config=_text_config(ckpt.text),
        vision_feature_layer=ckpt.vision.select_layer,
        vision_feature_select_strategy="default",  # "patch" upstream: drop CLS
        projector_hidden_act=act,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    return config


def _state_dict(ckpt, dtype: torch.dtype, expected: dict) -> dict:
    """Every checkpoint tensor under its Llava key, cast to dtype, shape-checked.
    A tied checkpoint (no lm_head) shares the embedding tensor as lm_head."""
    state = {}
    for canonical, tensor in ckpt.iter_tensors():
        key = hf_name(canonical)
        if key in state:
            raise ModelFormatError(f"The checkpoint holds tensor {canonical!r} twice; re-download or re-convert it.")
        want = expected.get(key)
        if want is not None and tuple(want.shape) != tuple(tensor.shape):
            raise ModelFormatError(
                f"Tensor {canonical!r} has shape {tuple(tensor.shape)} but the config implies "
                f"{tuple(want.shape)}; the checkpoint and its config.json disagree."
            )
        state[key] = tensor.to(dtype)
    if LM_HEAD_NAME not in state and ckpt.text.tie_word_embeddings:
        state[LM_HEAD_NAME] = state[hf_name(EMBED_NAME)]
    return state


def build_model(ckpt, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """A LlavaForConditionalGeneration holding exactly the checkpoint's tensors (eval mode).

    Built on the meta device (buffers such as RoPE's inv_freq and CLIP's
    position_ids stay real and float32), then every parameter is assigned from
    the checkpoint with strict=True: a missing or extra tensor is an error, never
    a silent random initialisation. CLIP's post_layernorm is loaded although
    LLaVA never runs it (features come from hidden_states[-2]).
    """
    from transformers import LlavaForConditionalGeneration
    from transformers.integrations.accelerate import init_empty_weights

    config = llava_config(ckpt, attn_implementation)
    with init_empty_weights(include_buffers=False):
        model = LlavaForConditionalGeneration(config)
    expected = model.state_dict()
    state = _state_dict(ckpt, dtype, expected)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelFormatError(
            f"The checkpoint does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}."
        )
    model.load_state_dict(state, strict=True, assign=True)
    still_empty = [name for name, p in model.named_parameters() if p.is_meta]
    if still_empty:  # would mean a parameter not in state_dict(): never expected
        raise ModelFormatError(f"Parameters were not loaded from the checkpoint: {still_empty[:3]}.")
    return model.eval()
