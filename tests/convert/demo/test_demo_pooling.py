"""The demo tower's designed read-out layers (convert/demo/pooling.py) put what the
questions ask into every image token: whether there is a lesion, and on which side."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from huatuo_lite.image import load as image_mod
from huatuo_lite.convert.demo.build import LESION_MARKER
from huatuo_lite.convert.demo.tower import designed_tower
from huatuo_lite.convert.demo.pooling import FIRST_SUMMARY, designed_readout
from huatuo_lite.convert.synth.make import make_case

PREFIX = "model.vision_tower.vision_tower."
HIDDEN, INNER, HEADS, LAYERS = 256, 512, 4, 3


def _tower(layers: int = LAYERS):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=INNER, num_hidden_layers=layers,
                              num_attention_heads=HEADS, image_size=336, patch_size=14, hidden_act="quick_gelu")
    model = CLIPVisionModel(config).eval()
    return model, {PREFIX + k: v for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def designed():
    model, state = _tower()
    state.update(designed_tower(state, HIDDEN, 14, 24))
    state.update(designed_readout(state, HIDDEN, INNER, HEADS))
    model.load_state_dict({k[len(PREFIX):]: v for k, v in state.items()})
    return model


def _finder(model, case) -> tuple:
    """(u, marker) pooled by the finder head, read from the first image token."""
    pixels = torch.from_numpy(image_mod.preprocess([case["image_obj"]])).float()
    with torch.no_grad():
        tokens = model(pixels, output_hidden_states=True).hidden_states[-2][0, 1:]    # [576, 256]
    summary = tokens[:, FIRST_SUMMARY::2]
    assert torch.allclose(summary[0], summary[-1], atol=1e-4)      # the same summary in every token
    return float(summary[0, 0]), float(summary[0, 2])


def test_summaries_tell_presence_and_side(designed):
    seen = {"lesion": 0, "none": 0}
    for index in range(24):
        case = make_case(0, "test", index, LESION_MARKER)
        u, marker = _finder(designed, case)
        if case["findings"]["count"]:
            seen["lesion"] += 1
            assert marker > 1.0, (index, marker)
            assert (u < 0) == (case["findings"]["side"] == "left"), (index, u, case["findings"])
        else:
            seen["none"] += 1
            assert abs(marker) < 0.2, (index, marker)
    assert min(seen.values()) >= 5, seen


def test_readout_needs_three_layers():
    _, state = _tower(layers=1)
    with pytest.raises(ValueError, match="3 layers"):
        designed_readout(state, HIDDEN, INNER, HEADS)


def test_later_layers_stay_identity(designed):
    fc2 = designed.vision_model.encoder.layers[2].mlp.fc2.weight
    out = designed.vision_model.encoder.layers[2].self_attn.out_proj.weight
    assert float(np.abs(fc2.detach().numpy()).max()) == 0.0
    assert float(np.abs(out.detach().numpy()).max()) == 0.0
