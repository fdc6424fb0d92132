"""`huatuo-lite convert onnx` for a Qwen2.5-VL folder: vision.onnx + embed.onnx +
decoder.onnx (+ .data) + tokenizer files + manifest.json, in a staging folder
renamed into place when complete.

All three graphs are written with the project's own builder and their weights
streamed one tensor at a time (convert/onnx/stream.py), as for the LLaVA family:
no torch.onnx, so no torch model is materialised and int8/int4 come out of the same
per-tensor quantizers. The graphs take every size-dependent table as an input
(onnx_vision.py, onnx_decoder.py); the runtime (huatuo_lite/backends/onnx_qwen25vl.py)
computes them in numpy from the manifest's "vision" / "text" facts.

Quant options: --quant fp32|fp16|int8|int4 for the decoder (int4 with the per-tensor
algorithms; gptq's calibration reads LLaVA prompts, so it is refused here), the
embedding table as the LLaVA export stores it, --vision-quant fp32|int8.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from huatuo_lite.errors import HuatuoError
from huatuo_lite.families import qwen25vl as fam
from huatuo_lite.fsutil import staging_dir
from huatuo_lite.manifest import file_entry, write_manifest

from ..onnx.algorithms import CALIBRATED
from ..onnx.builder import build_embed
from ..onnx.export import (DECODER, EMBED, EMBED_QUANT, GRAPHS, INT4_DEFAULT, VISION, _check_options, _tools,
                           copy_tokenizer, int4_plan)
from ..onnx.graph import check_graph
from ..onnx.stream import write_streamed
from ..provenance import source_entry
from .onnx_decoder import export_decoder_streamed
from .onnx_vision import VisionDims, export_vision_streamed, vision_dims

# what the manifest records of the checkpoint's generation_config (the plan's "generation")
GENERATION_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


def manifest(ckpt, dims: VisionDims, files: dict, onnx_section: dict) -> dict:
    t = ckpt.text
    generation = asdict(ckpt.generation)
    return {
        "format": "onnx",
        "family": fam.NAME,
        "name": Path(ckpt.root).resolve().name,
        "variant": fam.VARIANT.name,
        "files": files,
        "text": {"arch": "qwen2vl", "n_embd": t.hidden_size, "n_vocab": t.vocab_size, "n_layer": t.num_layers,
                 "n_head_kv": t.num_kv_heads, "head_dim": t.head_dim,
                 "n_ctx": min(fam.CONTEXT_LENGTH, t.max_position_embeddings),
                 "eos_token_ids": sorted(int(i) for i in ckpt.eos_token_ids), "rope_theta": t.rope_theta,
                 "mrope_section": list(t.mrope_section)},
        "vision": dims.manifest(),
        "image": {"min_pixels": int(ckpt.image_pixels[0]), "max_pixels": int(ckpt.image_pixels[1])},
        "generation": {k: generation[k] for k in GENERATION_KEYS},
        "onnx": onnx_section,
        "source": source_entry(ckpt),
        "tools": _tools(),
    }


def write_onnx_folder(ckpt, out_dir, quant: str = "int4", vision_quant: str = "fp32", block_size: int = 32,
                      force_external_data: bool = False, algorithm: str | None = None,
                      symmetric: bool | None = None, keep_int8: str | None = None,
                      embed_quant: str | None = None, name: str | None = None) -> Path:
    """Write the three graphs of an opened checkpoint (checkpoint.QwenCheckpoint: canonical
    names visual.* / model.* / lm_head.*, its text / vision / image / generation facts) into
    out_dir; returns out_dir/decoder.onnx."""
    _check_options(quant, vision_quant, block_size)
    if algorithm in CALIBRATED:
        raise HuatuoError(f"--algorithm {algorithm} needs calibration prompts of the LLaVA family; for a "
                          "Qwen2.5-VL model use one of the per-tensor algorithms (default, rtn, k_quant, hqq).")
    plan = int4_plan(quant, block_size, algorithm, symmetric, keep_int8)
    if embed_quant is None:
        embed_quant = INT4_DEFAULT["embed_quant"] if quant == "int4" else EMBED_QUANT[quant]
    if embed_quant not in (EMBED_QUANT[quant], "fp16"):
        raise HuatuoError(f"--embed-quant {embed_quant} is not supported with --quant {quant}: "
                          f"use {EMBED_QUANT[quant]} or fp16.")
    t, dims, weights = ckpt.text, vision_dims(ckpt), ckpt
    modes = {VISION: vision_quant, EMBED: embed_quant, DECODER: quant}
    files = {}
    with staging_dir(out_dir) as stage:
        writers = {
            VISION: lambda p: export_vision_streamed(weights, dims, p, vision_quant, block_size, force_external_data),
            EMBED: lambda p: write_streamed(weights, build_embed(t, embed_quant, block_size), p, "embed", (),
                                            force_external_data),
            DECODER: lambda p: export_decoder_streamed(weights, t, p, quant, block_size, force_external_data, plan),
        }
        for graph, write in writers.items():
            written = write(stage / graph)
            check_graph(stage / graph)
            files.update({p.name: file_entry(p, GRAPHS[graph] if p.name == graph else "data", quant=modes[graph])
                          for p in written})
        for path in copy_tokenizer(ckpt, stage):
            files[path.name] = file_entry(path, "tokenizer")
        section = {"quant": quant, "vision_quant": vision_quant, "embed_quant": embed_quant,
                   "block_size": block_size if quant in ("int4", "int8") or vision_quant == "int8" else None,
                   "graphs": {"vision": VISION, "embed": EMBED, "decoder": DECODER}}
        if quant == "int4":
            section["int4"] = {"algorithm": plan.algorithm, "symmetric": plan.symmetric, "keep_int8": plan.keep_int8}
        record = manifest(ckpt, dims, files, section)
        record["name"] = name or record["name"]
        write_manifest(stage, record)
    return Path(out_dir) / DECODER


def export_onnx(src, out_dir, quant: str = "int4", vision_quant: str = "fp32", block_size: int = 32,
                force_external_data: bool = False, name: str | None = None, algorithm: str | None = None,
                symmetric: bool | None = None, keep_int8: str | None = None, embed_quant: str | None = None,
                calibration=None, exporter: str = "stream", **ignored) -> Path:
    """`convert onnx` for a Qwen2.5-VL folder (either tensor layout), called by the LLaVA
    export's entry point with the same keywords. `ignored`: allow_pickle (safetensors only
    here unless set), base_repo / license (no model card is written for this family yet)."""
    from .checkpoint import open_qwen25vl

    if calibration is not None:
        raise HuatuoError("--calibration applies to --algorithm gptq, which a Qwen2.5-VL model does not offer; "
                          "drop it.")
    if exporter != "stream":
        raise HuatuoError(f"The {exporter!r} exporter is for the LLaVA family; a Qwen2.5-VL model is always "
                          "written by the streaming builder: drop the option.")
    return write_onnx_folder(open_qwen25vl(src, allow_pickle=bool(ignored.get("allow_pickle"))), out_dir, quant, vision_quant, block_size, force_external_data,
                             algorithm, symmetric, keep_int8, embed_quant, name)


__all__ = ["export_onnx", "write_onnx_folder"]
