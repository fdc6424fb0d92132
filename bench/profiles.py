"""Benchmark profiles (model shapes) and the model folders each one is measured on.

A profile is a random-weight upstream-format checkpoint of a real shape, built by
convert/tiny.py and converted by the normal paths (export_gguf, export_onnx,
quantize_onnx), so the benchmark times what a user would run. Folders are kept
under WORK/<profile>/ and reused by later runs (each one is written atomically by
its converter, so a folder with a manifest is complete).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from huatuo_lite.errors import HuatuoError

# CLIP ViT-L/14-336, the tower every HuatuoGPT-Vision variant uses (576 image tokens).
CLIP_L_336 = dict(vision_hidden_size=1024, vision_intermediate_size=4096, vision_layers=24, vision_heads=16)

GGUF_QUANTS = ("F16", "Q8_0", "Q4_K_M")
ONNX_QUANTS = ("fp32", "int8", "int4")


@dataclass(frozen=True)
class Profile:
    name: str
    sizes: dict                      # make_tiny(**sizes)
    about: str
    new_tokens: int = 64             # decoded per question
    gguf_quants: tuple = GGUF_QUANTS
    onnx_quants: tuple = ONNX_QUANTS
    extra: dict = field(default_factory=dict)


PROFILES = {p.name: p for p in (
    Profile("tiny", {}, "convert/tiny.py's default sizes (2 layers, 256 wide): seconds, for the smoke test",
            new_tokens=8),
    # Qwen2-0.5B: hidden 896, 14 heads of 64, 2 KV heads, SwiGLU 4864, 24 layers, 151936 rows.
    Profile("small", dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                          num_kv_heads=2, vocab_rows=151936, **CLIP_L_336),
            "Qwen2-0.5B-shaped decoder + CLIP ViT-L/14-336 (~0.63B text + 0.3B vision parameters)"),
    # Qwen2-7B: hidden 3584, 28 heads of 128, 4 KV heads, SwiGLU 18944, 28 layers, 152064 rows.
    Profile("7b", dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                       num_kv_heads=4, vocab_rows=152064, num_shards=4, **CLIP_L_336),
            "Qwen2-7B-shaped decoder + CLIP ViT-L/14-336 (manual: ~16 GB of bf16 checkpoint, "
            "tens of GB of converted files, hours on two cores)"),
)}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise HuatuoError(f"Unknown benchmark profile {name!r}: choose one of {', '.join(PROFILES)}.")
    return PROFILES[name]


@dataclass
class Target:
    """One row of the benchmark: a backend on a model folder (quant picks the GGUF file)."""

    label: str                       # "torch fp32", "gguf Q4_K_M", "onnx int4"
    backend: str                     # huatuo_lite backend name
    folder: Path
    quant: str | None = None


def all_labels(profile: Profile) -> list[str]:
    return (["torch fp32"] + [f"gguf {q}" for q in profile.gguf_quants]
            + [f"onnx {q}" for q in profile.onnx_quants])


def _done(folder: Path) -> bool:
    return (folder / "manifest.json").is_file()


def _timed(log: dict, key: str, make) -> None:
    t0 = time.perf_counter()
    make()
    log[key] = round(time.perf_counter() - t0, 2)
    print(f"  built {key} in {log[key]:.1f} s", flush=True)


def prepare(profile: Profile, work: Path, labels: list[str], threads: int) -> tuple[list[Target], dict]:
    """Build (or reuse) the checkpoint and the converted folders the chosen rows need.
    Returns the targets in table order and {what: seconds} for what was built now."""
    from huatuo_lite.convert.gguf_export import export_gguf
    from huatuo_lite.convert.onnx_export import export_onnx, quantize_onnx
    from huatuo_lite.convert.tiny import make_tiny

    root, built = Path(work) / profile.name, {}
    ckpt = root / "ckpt"
    if not (ckpt / "config.json").is_file():
        _timed(built, "checkpoint", lambda: make_tiny(ckpt, variant="7b", seed=0, **profile.sizes))
    targets = []
    for label in labels:
        kind, quant = label.split()
        if kind == "torch":
            targets.append(Target(label, "torch", ckpt))
        elif kind == "gguf":
            folder = root / f"gguf-{quant}"
            if not _done(folder):
                _timed(built, label, lambda: export_gguf(ckpt, folder, quant=quant, threads=threads))
            targets.append(Target(label, "gguf", folder, quant))
        else:
            fp32 = root / "onnx-fp32"
            if not _done(fp32):
                _timed(built, "onnx fp32", lambda: export_onnx(ckpt, fp32, quant="fp32"))
            folder = root / f"onnx-{quant}"
            if not _done(folder):
                _timed(built, label, lambda: quantize_onnx(fp32, folder, quant=quant))
            targets.append(Target(label, "onnx", folder))
    return targets, built


def text_gguf(folder: Path) -> Path:
    """The text GGUF of a one-quant folder written by export_gguf."""
    from huatuo_lite.manifest import read_manifest

    files = read_manifest(folder)["files"]
    return folder / next(name for name, entry in files.items() if entry["role"] == "text")
