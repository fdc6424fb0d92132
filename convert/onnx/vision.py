"""vision.onnx: pixel_values [N, 3, S, S] float32 -> image_features [N, T, H] float32.

The graph is upstream's image path after preprocessing: CLIP ViT (hidden_states
at `select_layer`, i.e. the output of the first n+1+select_layer encoder layers,
so layer -2 skips the last block), CLS dropped (T = (S/patch)^2 = 576), then the
mlp2x_gelu projector (Linear Dv->H, exact GELU, Linear H->H). The tower is
transformers' CLIPVisionModel truncated to the layers that feed the selected
hidden state; the unused last block and post_layernorm are never computed.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from huatuo_lite.errors import ModelFormatError

from ..checkpoint.read import PROJECTOR_PREFIX, VISION_PREFIX
from .graph import export_graph

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_features"
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


class VisionGraph(nn.Module):
    """CLIP tower (truncated at the selected layer) + projector."""

    def __init__(self, tower: nn.Module, projector: nn.Module):
        super().__init__()
        self.tower = tower
        self.projector = projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values=pixel_values).last_hidden_state  # [N, 1+T, Dv], pre post_layernorm
        return self.projector(hidden[:, 1:])                               # [N, T, H]


def kept_layers(num_layers: int, select_layer: int) -> int:
    """How many encoder layers produce hidden_states[select_layer]
    (hidden_states has num_layers+1 entries, entry 0 being the embeddings)."""
    return select_layer if select_layer >= 0 else num_layers + 1 + select_layer


def build_tower(ckpt) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vc = ckpt.vision
    keep = kept_layers(vc.num_layers, vc.select_layer)
    config = CLIPVisionConfig(
        hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
        num_hidden_layers=keep, num_attention_heads=vc.num_heads, image_size=vc.image_size,
        patch_size=vc.patch_size, layer_norm_eps=vc.layer_norm_eps, hidden_act=vc.hidden_act,
        num_channels=3)
    config._attn_implementation = "eager"   # plain MatMul/Softmax ops: exact and portable
    tower = CLIPVisionModel(config).eval()
    state = {}
    for name, tensor in ckpt.iter_tensors(VISION_PREFIX):
        local = name[len(VISION_PREFIX):]
        layer = _LAYER.search(local)
        if layer and int(layer.group(1)) >= keep:
            continue                        # blocks after the selected layer are never run
        state["vision_model." + local] = tensor.float()
    _load_strict(tower, state, "vision tower")
    return tower


def _mlp2x_gelu(ckpt) -> nn.Module:
    pc = ckpt.projector
    projector = nn.Sequential(nn.Linear(pc.in_features, pc.out_features), nn.GELU(),
                              nn.Linear(pc.out_features, pc.out_features))
    state = {name[len(PROJECTOR_PREFIX):]: t.float() for name, t in ckpt.iter_tensors(PROJECTOR_PREFIX)}
    _load_strict(projector, state, "projector")
    return projector.eval()


PROJECTOR_BUILDERS = {"mlp2x_gelu": _mlp2x_gelu}


def build_projector(ckpt) -> nn.Module:
    try:
        builder = PROJECTOR_BUILDERS[ckpt.projector.kind]
    except KeyError:
        raise ModelFormatError(
            f"The projector type {ckpt.projector.kind!r} is not supported (only "
            f"{', '.join(PROJECTOR_BUILDERS)}); this is not a HuatuoGPT-Vision checkpoint.") from None
    return builder(ckpt)


def build_vision_graph(ckpt) -> VisionGraph:
    return VisionGraph(build_tower(ckpt), build_projector(ckpt)).eval()


def _load_strict(module: nn.Module, state: dict, what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ModelFormatError(
            f"The checkpoint's {what} does not match its config (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}); the checkpoint is incomplete or not supported.")


def export_vision(ckpt, path: Path, force_external_data: bool = False, exporter: str = "torchscript") -> list[Path]:
    """Write vision.onnx (+ data file). Returns the files written."""
    graph = build_vision_graph(ckpt)
    size = ckpt.vision.image_size
    example = torch.zeros(2, 3, size, size)   # batch 2 so the batch dim stays dynamic
    example.normal_(generator=torch.Generator().manual_seed(0))
    axes = {INPUT_NAME: {0: "images"}, OUTPUT_NAME: {0: "images"}}
    return export_graph(graph, (example,), path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                        dynamic_axes=axes, force_external_data=force_external_data, exporter=exporter)
