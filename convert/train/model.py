"""The trainable model: transformers' Llava built from the checkpoint, set up per
mode, and the training forward (image features spliced at IMAGE_SLOT, loss on
the reply tokens only).

Modes (MODE_SETUPS): align - only the projector trains; lora / qlora - LoRA on
the language model's q/k/v/o/gate/up/down (a regex keeps the CLIP tower's own
q/k/v_proj out), projector optional, vision frozen; qlora quantizes those
language-model Linears to NF4 first (bitsandbytes); full - everything trains.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from huatuo_lite.convert.reference.build import build_model, hf_name
from huatuo_lite.errors import HuatuoError
from huatuo_lite.prompt import IMAGE_SLOT

from .data import IGNORE

# Module names in transformers 4.57's LlavaForConditionalGeneration.
VISION = "model.vision_tower"
PROJECTOR = "model.multi_modal_projector"
LM_HEAD = "lm_head"
# Full names (a regex matched by peft with re.fullmatch): only the language model's layers.
LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
# Kept unquantized in qlora, matched as full-name prefixes (a bare "vision_tower"
# matches nothing in some transformers versions, see notes/onnx-and-training.md).
QUANT_SKIP = (VISION, PROJECTOR, LM_HEAD)


@dataclass(frozen=True)
class LoraOptions:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    train_projector: bool = True


# ------------------------------------------------------------------ setup ----
def _freeze_all(model) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _setup_align(model, lora: LoraOptions):
    _freeze_all(model)
    for p in model.get_submodule(PROJECTOR).parameters():
        p.requires_grad_(True)
    return model


def _setup_full(model, lora: LoraOptions):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_config(lora: LoraOptions):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                      target_modules=LORA_TARGETS,
                      modules_to_save=[PROJECTOR] if lora.train_projector else None)


def _setup_lora(model, lora: LoraOptions):
    from peft import get_peft_model

    _freeze_all(model)
    return get_peft_model(model, lora_config(lora))


def _setup_qlora(model, lora: LoraOptions):
    quantize_language_model(model)
    return _setup_lora(model, lora)


MODE_SETUPS = {"align": _setup_align, "lora": _setup_lora, "qlora": _setup_qlora, "full": _setup_full}


def quantize_language_model(model, skip: tuple = QUANT_SKIP) -> int:
    """Replace every nn.Linear outside `skip` (full-name prefixes) by an NF4 bnb Linear4bit
    (in place, on the weights' device); returns how many. One clear sentence if bnb cannot run."""
    bnb = _bitsandbytes()
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not name.startswith(skip)]
    for name, linear in targets:
        device = linear.weight.device
        quant = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=linear.weight.dtype, quant_type="nf4", device="meta")
        quant.weight = bnb.nn.Params4bit(linear.weight.data.contiguous(), requires_grad=False,
                                         quant_type="nf4", module=quant)._quantize(device)
        if linear.bias is not None:
            quant.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quant)
    return len(targets)


def _bitsandbytes():
    """bitsandbytes, checked on a small NF4 round trip; else one sentence suggesting lora."""
    try:
        import bitsandbytes as bnb

        probe = bnb.functional.quantize_4bit(torch.ones(64, 64), quant_type="nf4")
        bnb.functional.dequantize_4bit(*probe, quant_type="nf4")
    except Exception as err:   # ImportError, missing native library, unsupported device
        raise HuatuoError(f"4-bit QLoRA needs bitsandbytes, which cannot run here ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'no detail'}); use --mode lora instead.") from None
    return bnb


def build_trainable(ckpt, mode: str, lora: LoraOptions = LoraOptions(), dtype=torch.float32,
                    device: str = "cpu", gradient_checkpointing: bool = False):
    """(model to optimise - a PeftModel for lora modes -, the Llava model inside it)."""
    if mode not in MODE_SETUPS:
        raise HuatuoError(f"Unknown training mode {mode!r}: choose one of {', '.join(MODE_SETUPS)}.")
    base = build_model(ckpt, dtype).to(device)
    model = MODE_SETUPS[mode](base, lora)
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    if gradient_checkpointing:
        # non-reentrant: needs no requires_grad on the inputs (our inputs_embeds often have none)
        llava.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, llava


def trainable_state(model) -> dict:
    """name -> tensor of every parameter that trains (what a resumable checkpoint saves)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def canonical_state(llava, ckpt) -> dict:
    """The Llava model's tensors under the checkpoint's canonical names (see checkpoint.py)."""
    state = llava.state_dict()
    return {name: state[hf_name(name)] for name in ckpt.names()}


# ---------------------------------------------------------------- forward ----
def freeze_tower(llava) -> None:
    for p in llava.get_submodule(VISION).parameters():
        p.requires_grad_(False)


def tower_trains(llava) -> bool:
    return any(p.requires_grad for p in llava.get_submodule(VISION).parameters())


def vision_hidden(llava, pixels: torch.Tensor, select_layer: int) -> torch.Tensor:
    """[N, 3, S, S] -> [N, T, Dv]: CLIP hidden_states[select_layer] without CLS.
    No graph through the tower when it is frozen (saves its activations)."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trains(llava)):
        return llava.get_submodule(VISION)(pixels, output_hidden_states=True).hidden_states[select_layer][:, 1:]


def splice(llava, examples: list, features: torch.Tensor) -> tuple:
    """Token embeddings with each IMAGE_SLOT replaced by its image's T feature rows,
    right-padded into a batch: (embeds [B, L, H], attention_mask [B, L], labels [B, L])."""
    embed = llava.get_input_embeddings()
    rows, labels = [], []
    image = 0
    for ex in examples:
        ids = torch.tensor(ex.input_ids)
        lab = torch.tensor(ex.labels)
        parts, part_labels, start = [], [], 0
        slots = (ids == IMAGE_SLOT).nonzero().flatten().tolist()
        for slot in slots + [len(ids)]:
            if slot > start:
                parts.append(embed(ids[start:slot].to(features.device)))
                part_labels.append(lab[start:slot])
            if slot < len(ids):
                parts.append(features[image].to(parts[0].dtype if parts else features.dtype))
                part_labels.append(torch.full((features.shape[1],), IGNORE))
                image += 1
            start = slot + 1
        rows.append(torch.cat(parts))
        labels.append(torch.cat(part_labels))
    return _pad(rows, labels)


def _pad(rows: list, labels: list) -> tuple:
    length = max(r.shape[0] for r in rows)
    hidden, device = rows[0].shape[1], rows[0].device
    embeds = rows[0].new_zeros(len(rows), length, hidden)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
    padded = torch.full((len(rows), length), IGNORE, dtype=torch.long, device=device)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        embeds[i, :len(r)] = r
        mask[i, :len(r)] = 1
        padded[i, :len(r)] = lab.to(device)
    return embeds, mask, padded


def batch_loss(llava, examples: list, hidden: torch.Tensor | None) -> tuple:
    """(mean cross-entropy over the reply tokens of the batch, number of those tokens).
    hidden: [N, T, Dv] vision features of the batch's images in order (vision_hidden)."""
    weight = llava.get_input_embeddings().weight
    if hidden is not None and len(hidden):
        features = llava.get_submodule(PROJECTOR)(hidden.to(weight.device, weight.dtype))   # [N, T, H]
    else:
        features = weight.new_zeros(0, 0, 0)
    embeds, mask, labels = splice(llava, examples, features)
    hidden = llava.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    # position t predicts token t + 1; only rows whose next token is trained reach lm_head
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = llava.lm_head(hidden[:, :-1][keep]).float()        # [n_trained, V]
    return F.cross_entropy(logits, targets[keep]), int(keep.sum())
