"""Designed global read-out layers for the demo's frozen vision tower (after demo_init).

demo_init's tower gives each of the 576 patch tokens only its own colour and
position. A lesion then lives in one to nine of 576 tokens, and the 2-layer demo
language model has to learn, from a few hundred CPU steps, to find those few
tokens among 576 -- which it did not (it answered from the question alone).

So two more encoder layers are *designed* (frozen, documented, deterministic),
the way a pretrained CLIP has layers that mix global context into every token:

- layer 0, MLP: a per-patch "marker" detector, m = sum over the patch's four quarters of
  quick_gelu(GAIN * (redness - THRESHOLD)) * MARK_SCALE, redness = R - (G + B) / 2 of the
  quarter mean after layer_norm2; written to
  channels MARK (+m) and MARK + 1 (-m) of the residual. ~0 on every drawn
  anatomy, ~6 on a patch filled with the lesion marker colour.
- layer 1, attention (4 heads, each with a constant query, so every token gets
  the same four summaries, added to its residual):
    head 0 "finder":   logits ~ FIND_GAIN * m: the mean position (u, v) and marker
                       of the marked patches (uniform when there is none);
    head 1 "uniform":  the image mean of colour, marker (~ lesion area), contrast;
    head 2 "top":      the colour and marker mean weighted to the upper rows;
    head 3 "bottom":   the same, weighted to the lower rows.
  Every summary is written as +s and -s into free channels, so each token keeps a
  zero channel mean (layer norms only rescale, as in demo_init).

With mm_vision_select_layer -2 on a 3-layer tower, the selected features are the
output of layer 1: every image token carries its own patch plus these global
summaries, which the trained projector and language model read.
"""
from __future__ import annotations

import torch

LAYER = "model.vision_tower.vision_tower.vision_model.encoder.layers.{}."
# demo_init's channel layout (after the +f/-f doubling): colour c at 6c + {0 mean, 1-4 quarters, 5 centre}
RED, GREEN, BLUE = 0, 6, 12
CENTRE = (5, 11, 17)
U, V = 36, 37                     # the position code's u (column) and v (row), in [-1, 1]
CONSTANT = 108
MARK = 110                        # first free channel: +m, -m
FIRST_SUMMARY = 112
GAIN, THRESHOLD = 6.0, 1.5        # redness after layer norm: ~4.9 full marker, <= ~0.8 anatomy
MARK_SCALE = 0.075                # m ~ 6 on a full marker patch (keeps layer norms near 1)
QUARTERS = (1, 2, 3, 4)
FIND_GAIN = 40.0                  # q . k / sqrt(64) = 5 m: ~40 on a full marker patch
ROW_GAIN = 16.0                   # top/bottom heads: logits +-2 v / std
VALUE_GAIN = {U: 4.0, V: 4.0}     # the lesion's mean u, v (~ +-0.5) pooled at the size of the colours (~ +-2)


def _redness_row(hidden: int, quarter: int) -> torch.Tensor:
    """R - (G + B) / 2 of one quarter-patch mean (quarter 1-4 of demo_init's filters)."""
    row = torch.zeros(hidden)
    row[RED + quarter], row[GREEN + quarter], row[BLUE + quarter] = 1.0, -0.5, -0.5
    return row


def _unit(hidden: int, channel: int, value: float = 1.0) -> torch.Tensor:
    row = torch.zeros(hidden)
    row[channel] = value
    return row


def marker_mlp(hidden: int, inner: int) -> dict:
    """Layer 0's MLP: fc1 [inner, hidden] row 0 detects the marker, fc2 [hidden, inner]
    writes it to MARK (+) and MARK + 1 (-). Suffix -> tensor."""
    fc1, fc1_bias = torch.zeros(inner, hidden), torch.zeros(inner)
    fc2 = torch.zeros(hidden, inner)
    for quarter in QUARTERS:           # a lesion of radius >= 6 px fills most of some 7x7 quarter
        fc1[quarter], fc1_bias[quarter] = GAIN * _redness_row(hidden, quarter), -GAIN * THRESHOLD
        fc2[MARK, quarter], fc2[MARK + 1, quarter] = MARK_SCALE, -MARK_SCALE
    return {"mlp.fc1.weight": fc1, "mlp.fc1.bias": fc1_bias, "mlp.fc2.weight": fc2,
            "mlp.fc2.bias": torch.zeros(hidden)}


# head -> (query gain on key dim 0, key row for dim 0 (None: uniform), the channels it pools)
def _heads(hidden: int) -> list:
    colours = [RED, GREEN, BLUE]
    return [
        (FIND_GAIN, _unit(hidden, MARK), [U, V, MARK, CONSTANT]),
        (0.0, None, [MARK, *colours, *CENTRE]),
        (ROW_GAIN, _unit(hidden, V, -1.0), [MARK, *colours]),
        (ROW_GAIN, _unit(hidden, V, 1.0), [MARK, *colours]),
    ]


def summary_attention(hidden: int, heads: int) -> dict:
    """Layer 1's attention: q [hidden, hidden] is zero with a constant bias, k reads one
    feature per head, v copies the pooled channels, out_proj writes each pooled value
    as +s / -s from FIRST_SUMMARY on. Suffix -> tensor."""
    head_dim = hidden // heads
    q, q_bias = torch.zeros(hidden, hidden), torch.zeros(hidden)
    k, v = torch.zeros(hidden, hidden), torch.zeros(hidden, hidden)
    out = torch.zeros(hidden, hidden)
    channel = FIRST_SUMMARY
    for head, (gain, key_row, pooled) in enumerate(_heads(hidden)):
        base = head * head_dim
        if key_row is not None:
            q_bias[base], k[base] = gain, key_row
        for slot, source in enumerate(pooled):
            v[base + slot, source] = VALUE_GAIN.get(source, 1.0)
            out[channel, base + slot], out[channel + 1, base + slot] = 1.0, -1.0
            channel += 2
    if channel > hidden:
        raise ValueError(f"vision_hidden_size {hidden} is too small for the designed summaries ({channel}).")
    zero = torch.zeros(hidden)
    return {"self_attn.q_proj.weight": q, "self_attn.q_proj.bias": q_bias, "self_attn.k_proj.weight": k,
            "self_attn.k_proj.bias": zero, "self_attn.v_proj.weight": v, "self_attn.v_proj.bias": zero,
            "self_attn.out_proj.weight": out, "self_attn.out_proj.bias": zero}


def _unit_norms(hidden: int) -> dict:
    ones, zeros = torch.ones(hidden), torch.zeros(hidden)
    return {f"{norm}.{part}": (ones if part == "weight" else zeros)
            for norm in ("layer_norm1", "layer_norm2") for part in ("weight", "bias")}


def designed_readout(state: dict, hidden: int, inner: int, heads: int) -> dict:
    """The layer-0 and layer-1 tensors of `state` (canonical names) replaced by the
    designed ones (dtype and shape of the originals); layers from 2 on stay the
    identity demo_init made them. Needs a tower of at least 3 layers."""
    layer0 = {**_unit_norms(hidden), **marker_mlp(hidden, inner)}
    layer1 = {**_unit_norms(hidden), **summary_attention(hidden, heads)}
    out = {}
    for index, tensors in ((0, layer0), (1, layer1)):
        for suffix, value in tensors.items():
            name = LAYER.format(index) + suffix
            if name not in state:
                raise ValueError(f"The vision tower has no {name}; the designed read-out needs 3 layers.")
            out[name] = value.to(state[name].dtype).reshape(state[name].shape)
    return out


SUMMARY_CHANNELS = range(FIRST_SUMMARY, FIRST_SUMMARY + 2 * 19)   # 4 + 7 + 4 + 4 pooled values, +s/-s
PROJECTOR_IN, PROJECTOR_OUT = "model.mm_projector.0.", "model.mm_projector.2."


def projector_passthrough(state: dict) -> dict:
    """An informed start for the (trained) projector: its rows 1..38 carry the summary
    channels straight through (Linear -> GELU -> Linear keeps +s and -s, each >= 0 half
    passing GELU), instead of N(0, 0.02) rows that shrink them ~30x. Row 0 stays for
    demo_init's image flag; every other row keeps its random start."""
    out = {}
    for prefix, source_of in ((PROJECTOR_IN, lambda row: SUMMARY_CHANNELS[row - 1]),
                              (PROJECTOR_OUT, lambda row: row)):
        weight, bias = state[prefix + "weight"].clone(), state[prefix + "bias"].clone()   # [H, in], [H]
        for row in range(1, len(SUMMARY_CHANNELS) + 1):
            weight[row].zero_()
            weight[row, source_of(row)] = 1.0
            bias[row] = 0.0
        out[prefix + "weight"], out[prefix + "bias"] = weight, bias
    return out


FIRST_VALUE, FIRST_OUT = "model.layers.0.self_attn.v_proj.", "model.layers.0.self_attn.o_proj."
TEXT_CHANNELS = range(64, 128)    # 64 embedding channels the text reader carries to the answer position
TEXT_READ_GAIN = 4.0              # the mean of ~40 prompt words is ~1/6 the size of one word
IMAGE_READ_GAIN = 4.0            # image rows are ~ 1/2 their size after RMSNorm (the flag channel dominates)


def reader_values(state: dict, head_dim: int = 64, heads_per_kv: int = 2) -> dict:
    """An informed start for the LM's first-layer values and output (demo_init's heads):
    kv group 0 (the text reader) copies TEXT_CHANNELS of the prompt words, kv group 1
    (the uniform image pool) copies the summary rows 1..38 the projector passes
    through; o_proj writes the first query head of each group back to those same
    residual channels (the second head of each group starts at zero). So the answer
    position starts with "which question" and "what the image shows" at similar sizes."""
    v_weight, v_bias = state[FIRST_VALUE + "weight"].clone(), state[FIRST_VALUE + "bias"].clone()   # [kv*hd, H]
    o_weight = state[FIRST_OUT + "weight"].clone()                                                # [H, heads*hd]
    routes = ((0, TEXT_CHANNELS, TEXT_READ_GAIN),
              (1, range(1, len(SUMMARY_CHANNELS) + 1), IMAGE_READ_GAIN))
    for group, channels, gain in routes:
        v_weight[group * head_dim:(group + 1) * head_dim].zero_()
        v_bias[group * head_dim:(group + 1) * head_dim] = 0.0
        for heads in range(heads_per_kv):
            o_weight[:, (group * heads_per_kv + heads) * head_dim:(group * heads_per_kv + heads + 1) * head_dim] = 0.0
        first_head = group * heads_per_kv * head_dim
        for slot, channel in enumerate(channels):
            v_weight[group * head_dim + slot, channel] = gain
            o_weight[channel, first_head + slot] = 1.0
    return {FIRST_VALUE + "weight": v_weight, FIRST_VALUE + "bias": v_bias, FIRST_OUT + "weight": o_weight}
