"""A principled, deterministic vision tower for the demo model (instead of CLIP pretraining).

CLIP's contrastive pretraining cannot be done here, and a randomly initialised
tower trained from scratch on a few hundred synthetic images learns too slowly
on a CPU. So the demo's tower is *designed*, not learned, and stays frozen
while the projector and language model train (as in upstream's stage 2):

- patch embedding [Dv, 3, P, P]: local mean filters -- per colour channel the
  whole-patch mean, the four quarter-patch means and a centre-minus-patch
  contrast (18 features);
- position embedding [T+1, Dv]: a 2-D code of each patch's column/row u, v in
  [-1, 1]: u, v, tanh(4u), tanh(4v) and sin/cos(pi k u), sin/cos(pi k v), k=1..8
  (36 features); the class position and class embedding are zero;
- one constant feature, so the pre-layernorm (which normalises each token)
  keeps intensity differences instead of rescaling them away;
- every feature is written twice, as +f and -f, so each token's channel mean
  is zero and pre_layrnorm (weight 1, bias 0) only rescales;
- every encoder layer is an exact identity: attention out_proj and mlp.fc2
  (weights and biases) are zero, so each residual block adds nothing -- except
  layers 0 and 1 with readout=True, which demo_pooling designs to write a lesion
  detector and global summaries (where, how much, which colours) into every token.

The selected features (hidden_states[-2]) are then pre_layrnorm(patch + position)
of each patch: what is where, which the trained projector and LLM read.
Only the checkpoint's embedded tower is rewritten (the `vit/` copy is untouched,
as upstream loads the embedded weights).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TOWER = "model.vision_tower.vision_tower.vision_model."
FIRST_QUERY = "model.layers.0.self_attn.q_proj."
FIRST_KEY = "model.layers.0.self_attn.k_proj."
PROJECTOR_OUT = "model.mm_projector.2."
INTENSITY_GAIN = 1.0      # pixels arrive CLIP-normalised, about [-1.8, 2.1]
POSITION_GAIN = 1.0
CONSTANT = 2.0
FREQUENCIES = 8


def _patch_filters(patch: int) -> np.ndarray:
    """[18, 3, P, P]: per colour the mean, four quarter means and centre-minus-mean."""
    half, quarter = patch // 2, patch // 4
    filters = []
    for colour in range(3):
        whole = np.zeros((3, patch, patch))
        whole[colour] = 1.0 / patch ** 2
        filters.append(whole)
        for y0, x0 in ((0, 0), (0, half), (half, 0), (half, half)):
            part = np.zeros((3, patch, patch))
            part[colour, y0:y0 + half, x0:x0 + half] = 1.0 / half ** 2
            filters.append(part)
        centre = np.zeros((3, patch, patch))
        centre[colour, quarter:patch - quarter, quarter:patch - quarter] = 1.0 / (patch - 2 * quarter) ** 2
        filters.append(centre - whole)
    return np.stack(filters)


def _position_codes(grid: int) -> np.ndarray:
    """[grid*grid, 36]: row-major patches, u = column, v = row, both in [-1, 1]."""
    axis = (np.arange(grid) - (grid - 1) / 2) / ((grid - 1) / 2)
    v, u = np.meshgrid(axis, axis, indexing="ij")
    u, v = u.reshape(-1), v.reshape(-1)
    codes = [u, v, np.tanh(4 * u), np.tanh(4 * v)]
    for k in range(1, FREQUENCIES + 1):
        codes += [np.sin(math.pi * k * u / 2), np.cos(math.pi * k * u / 2),
                  np.sin(math.pi * k * v / 2), np.cos(math.pi * k * v / 2)]
    return np.stack(codes, axis=1)


def designed_tower(state: dict, vision_hidden: int, patch: int, grid: int) -> dict:
    """The tower tensors of `state` (canonical HF names, any dtype) replaced by the
    designed ones; returns a new dict with only the changed tensors."""
    filters = _patch_filters(patch) * INTENSITY_GAIN                  # [18, 3, P, P]
    positions = _position_codes(grid) * POSITION_GAIN                 # [T, 36]
    n_int, n_pos = len(filters), positions.shape[1]
    if 2 * (n_int + n_pos + 1) > vision_hidden:
        raise ValueError(f"vision_hidden_size {vision_hidden} is too small for the designed tower.")
    weight = np.zeros((vision_hidden, 3, patch, patch))
    weight[:n_int], weight[n_int:2 * n_int] = filters, -filters
    table = np.zeros((grid * grid + 1, vision_hidden))                # row 0: the class position
    start = 2 * n_int
    table[1:, start:start + n_pos], table[1:, start + n_pos:start + 2 * n_pos] = positions, -positions
    table[1:, start + 2 * n_pos], table[1:, start + 2 * n_pos + 1] = CONSTANT, -CONSTANT
    out = {}
    like = lambda name, array: torch.tensor(array, dtype=state[name].dtype).reshape(state[name].shape)
    out[TOWER + "embeddings.patch_embedding.weight"] = like(TOWER + "embeddings.patch_embedding.weight", weight)
    out[TOWER + "embeddings.position_embedding.weight"] = like(TOWER + "embeddings.position_embedding.weight",
                                                                table)
    out[TOWER + "embeddings.class_embedding"] = torch.zeros_like(state[TOWER + "embeddings.class_embedding"])
    for name in state:
        if name.startswith(TOWER + "encoder.layers.") and (".self_attn.out_proj." in name or ".mlp.fc2." in name):
            out[name] = torch.zeros_like(state[name])
    for norm in ("pre_layrnorm",):
        out[TOWER + norm + ".weight"] = torch.ones_like(state[TOWER + norm + ".weight"])
        out[TOWER + norm + ".bias"] = torch.zeros_like(state[TOWER + norm + ".bias"])
    return out


def apply_designed_tower(model_dir, readout: bool = True) -> int:
    """Rewrite the embedded vision tower of an upstream-layout checkpoint folder in
    place (each shard written to a temporary name, then renamed); returns the count
    of tensors replaced. readout: also demo_pooling's designed layers 0-1 (needs a
    tower of 3 or more layers; the selected layer -2 is then layer 1's output)."""
    root = Path(model_dir)
    config = json.loads((root / "config.json").read_text())
    vision = _vision_sizes(root, config)
    index = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted({index[name] for name in index if name.startswith(TOWER)})
    tower = {name: t for shard in shards for name, t in load_file(root / shard).items() if name.startswith(TOWER)}
    new = designed_tower(tower, vision["hidden_size"], vision["patch_size"],
                         vision["image_size"] // vision["patch_size"])
    if readout:                       # layers 0-1: marker detector + global summaries (demo_pooling)
        from .pooling import designed_readout

        new.update(designed_readout({**tower, **new}, vision["hidden_size"], vision["intermediate_size"],
                                    vision["num_attention_heads"]))
    for shard in shards:
        state = load_file(root / shard)
        temp = root / (shard + ".tmp")
        save_file({**state, **{k: v for k, v in new.items() if k in state}}, str(temp), metadata={"format": "pt"})
        temp.rename(root / shard)
    return len(new)


IMAGE_FLAG = -30.0        # projector output channel 0 of every image row (a constant "I am image" flag)
SLOW_DIM = 31             # the head dim whose RoPE frequency is lowest: cos(delta * theta) ~ 1 at any distance
TEXT_GAIN = 8.0           # query bias = sqrt(64): q . k / sqrt(64) = the key's SLOW_DIM value
KEY_GAIN = 1.0            # key = flag channel after RMSNorm: ~ -15 on image rows, ~ N(0, 1) on text rows


def designed_first_attention(model_dir, head_dim: int = 64, heads_per_kv: int = 2, passthrough: bool = True) -> int:
    """The language model's first layer starts with two kinds of heads, in place:

    - kv group 0 (query heads 0, 1): a text reader. The projector's last bias puts
      IMAGE_FLAG in residual channel 0 of every image row (its weight row 0 is
      zero), k_proj row SLOW_DIM reads channel 0 and the query bias is TEXT_GAIN
      there, so image rows score ~ -15 and text rows ~ 0: these heads average the
      prompt's words (which kind of question, which options) for the answer position;
    - kv group 1 (query heads 2, 3): uniform (zero query): the average over the
      prefix, mostly the 576 image rows -- a pooled summary of the image.

    All of q_proj's weight is zero at the start; training moves everything.
    passthrough: the projector also starts as demo_pooling.projector_passthrough."""
    root = Path(model_dir)
    index = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    edits = {FIRST_QUERY + "weight": lambda t: torch.zeros_like(t),
             FIRST_QUERY + "bias": lambda t: _query_bias(t, head_dim, heads_per_kv),
             FIRST_KEY + "weight": lambda t: _key_weight(t),
             FIRST_KEY + "bias": lambda t: _zero_row(t, SLOW_DIM),
             PROJECTOR_OUT + "weight": lambda t: _zero_row(t, 0),
             PROJECTOR_OUT + "bias": lambda t: _set(t, 0, IMAGE_FLAG)}
    if passthrough:                   # the summaries of demo_pooling reach the LM at full size
        from .pooling import projector_passthrough, reader_values

        names = [n for n in index if n.startswith("model.mm_projector.") or n.startswith("model.layers.0.self_attn.")]
        current = {n: t for shard in sorted({index[n] for n in names}) for n, t in load_file(root / shard).items()
                   if n in names}
        designed = {**projector_passthrough(current), **reader_values(current, head_dim, heads_per_kv)}
        for name, value in designed.items():
            edits[name] = _start_from(value, then=edits.get(name))
    for shard in sorted({index[n] for n in edits}):
        state = load_file(root / shard)
        temp = root / (shard + ".tmp")
        save_file({k: (edits[k](v.clone()) if k in edits else v) for k, v in state.items()}, str(temp),
                  metadata={"format": "pt"})
        temp.rename(root / shard)
    return len(edits)


def _start_from(value, then=None):
    """An edit that replaces a tensor by `value` (in the tensor's dtype), then applies `then`."""
    def edit(tensor):
        start = value.clone().to(tensor.dtype)
        return then(start) if then else start
    return edit


def _query_bias(bias, head_dim: int, heads_per_kv: int):
    bias.zero_()
    for head in range(heads_per_kv):              # the query heads of kv group 0
        bias[head * head_dim + SLOW_DIM] = TEXT_GAIN
    return bias


def _key_weight(weight):                          # [kv_heads * head_dim, hidden]
    weight[SLOW_DIM].zero_()
    weight[SLOW_DIM, 0] = KEY_GAIN          # (a gain of 8 here made each head pick one random word)
    return weight


def _zero_row(tensor, row: int):
    tensor[row] = 0
    return tensor


def _set(tensor, row: int, value: float):
    tensor[row] = value
    return tensor


def _vision_sizes(root: Path, config: dict) -> dict:
    """hidden_size, patch_size, image_size of the tower, from the vit/ CLIP config."""
    from ..tiny.configs import VIT_SUBDIR

    clip = json.loads((root / VIT_SUBDIR / "config.json").read_text())
    return clip.get("vision_config", clip)
