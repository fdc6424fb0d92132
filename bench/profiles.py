"""Benchmark profiles (model shapes) and the model folders each one is measured on.

A profile is a random-weight upstream-format checkpoint of a real shape, built by
its family's tiny maker (MAKERS: convert/tiny/make.py for LLaVA, convert/qwen25vl/tiny.py
for Qwen2.5-VL) and converted by the normal paths (export_gguf, export_onnx,
quantize_onnx), so the benchmark times what a user would run. Folders are kept
under WORK/<profile>/ and reused by later runs (each one is written atomically by
its converter, so a folder with a manifest is complete).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from huatuo_lite.errors import HuatuoError

# CLIP ViT-L/14-336, the tower every HuatuoGPT-Vision variant uses (576 image tokens).
CLIP_L_336 = dict(vision_hidden_size=1024, vision_intermediate_size=4096, vision_layers=24, vision_heads=16)

# Qwen2.5-VL-7B's vision tower (vision_config of Qwen/Qwen2.5-VL-7B-Instruct): 32 layers x 1280,
# 16 heads of 80, SwiGLU 3420, 112-px windows with full attention in 7, 15, 23, 31;
# out_hidden_size = the text width (the maker sets it).
QWEN25VL_VISION = dict(vision_hidden_size=1280, vision_intermediate_size=3420, vision_depth=32, vision_heads=16,
                       fullatt_block_indexes=(7, 15, 23, 31), window_size=112)

GGUF_QUANTS = ("F16", "Q8_0", "Q4_K_M")
ONNX_QUANTS = ("fp32", "int8", "int4")


@dataclass(frozen=True)
class Profile:
    name: str
    sizes: dict                      # MAKERS[maker](**sizes)
    about: str
    maker: str = "make_tiny"         # key of MAKERS: the family's tiny maker
    new_tokens: int = 64             # decoded per question
    gguf_quants: tuple = GGUF_QUANTS
    onnx_quants: tuple = ONNX_QUANTS
    skip_by_default: tuple = ()      # rows run only when named with --only
    onnx_direct: bool = False        # export each ONNX quant from the checkpoint (no fp32 copy on disk)
    checkpoint_gb: float = 0.1       # disk the checkpoint takes
    row_gb: dict | None = None       # label -> disk its build needs at its peak (temporaries included)


PROFILES = {p.name: p for p in (
    Profile("tiny", {}, "convert/tiny/make.py's default sizes (2 layers, 256 wide): seconds, for the smoke test",
            new_tokens=8),
    # Qwen2-0.5B: hidden 896, 14 heads of 64, 2 KV heads, SwiGLU 4864, 24 layers, 151936 rows.
    Profile("small", dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                          num_kv_heads=2, vocab_rows=151936, **CLIP_L_336),
            "Qwen2-0.5B-shaped decoder + CLIP ViT-L/14-336 (~0.63B text + 0.3B vision parameters)",
            checkpoint_gb=3, row_gb={"gguf F16": 3, "gguf Q8_0": 2.5, "gguf Q4_K_M": 3.5,   # K-quant: + BF16 intermediate
                                     "onnx fp32": 3.5, "onnx int8": 2, "onnx int4": 1.5}),
    # Qwen2.5-VL: the real vision tower + a Qwen2-0.5B text model (hidden 896, 14 heads of 64, 2 KV
    # heads, SwiGLU 4864, 24 layers, 151936 rows); the 0.5B head is 64 wide, so mrope_section is the
    # 7B's [16, 24, 24] scaled to 32 rotary pairs: [8, 12, 12].
    Profile("qwen25vl-small", dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                                   num_kv_heads=2, vocab_rows=151936, mrope_section=(8, 12, 12),
                                   num_shards=2, **QWEN25VL_VISION),
            "Qwen2.5-VL vision tower (32 x 1280, ~0.67B) + Qwen2-0.5B-shaped text model, mrope_section "
            "[8, 12, 12] (~0.63B)", maker="make_tiny_qwen25vl", new_tokens=32, gguf_quants=("F16", "Q4_K_M"),
            skip_by_default=("torch fp32", "onnx fp32", "onnx int8", "onnx int4"), onnx_direct=True,
            checkpoint_gb=3, row_gb={"gguf F16": 4, "gguf Q4_K_M": 5, "onnx fp32": 6, "onnx int8": 3,
                                     "onnx int4": 3}),
    # Qwen2.5-VL-7B: text 3584 wide, 28 layers, 28 heads of 128 / 4 KV, SwiGLU 18944, 152064 rows,
    # mrope_section [16, 24, 24]; the same vision tower.
    Profile("qwen25vl-7b", dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                                num_kv_heads=4, vocab_rows=152064, mrope_section=(16, 24, 24), num_shards=5,
                                **QWEN25VL_VISION),
            "Qwen2.5-VL-7B shape (manual: a ~17 GB bf16 checkpoint; build ~7 min, GGUF Q4_K_M rows ~15 min on two cores)",
            maker="make_tiny_qwen25vl", gguf_quants=("F16", "Q4_K_M"),
            skip_by_default=("torch fp32", "onnx fp32", "onnx int8", "onnx int4", "gguf F16", "gguf Q4_K_M"),
            onnx_direct=True, checkpoint_gb=17,
            row_gb={"gguf F16": 17, "gguf Q4_K_M": 23, "onnx fp32": 33, "onnx int8": 10, "onnx int4": 6}),
    # Qwen2-7B: hidden 3584, 28 heads of 128, 4 KV heads, SwiGLU 18944, 28 layers, 152064 rows.
    Profile("7b", dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                       num_kv_heads=4, vocab_rows=152064, num_shards=8, **CLIP_L_336),
            "Qwen2-7B-shaped decoder + CLIP ViT-L/14-336 (manual: a 16 GB bf16 checkpoint, ~50 GB of "
            "converted files, hours on two cores)",
            # fp32 torch needs ~31 GB of RAM and ONNX fp32 another 30 GB of disk: only on request.
            skip_by_default=("torch fp32", "onnx fp32"), onnx_direct=True,
            # 15.2 GB bf16 text + vision + the fp32 vit/ copy; a K-quant's build also holds a 15.2 GB
            # BF16 intermediate beside its ~4.7 GB output and the 0.6 GB mmproj.
            checkpoint_gb=17, row_gb={"gguf F16": 16, "gguf Q8_0": 9, "gguf Q4_K_M": 21,
                                      "onnx fp32": 31, "onnx int8": 9, "onnx int4": 5}),
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


def default_labels(profile: Profile) -> list[str]:
    return [label for label in all_labels(profile) if label not in profile.skip_by_default]


def _done(folder: Path) -> bool:
    return (folder / "manifest.json").is_file()


# converter name -> "module:function"; each build runs in its own process (its peak RSS is its own)
CONVERTERS = {"make_tiny": "huatuo_lite.convert.tiny.make:make_tiny",
              "make_tiny_qwen25vl": "huatuo_lite.convert.qwen25vl.tiny:make_tiny_qwen25vl",
              "export_gguf": "huatuo_lite.convert.gguf.export:export_gguf",
              "export_onnx": "huatuo_lite.convert.onnx.export:export_onnx",
              "quantize_onnx": "huatuo_lite.convert.onnx.export:quantize_onnx"}


# tiny maker (a CONVERTERS key) -> the arguments it takes beside the profile's sizes
MAKERS = {"make_tiny": {"variant": "7b", "seed": 0},
          "make_tiny_qwen25vl": {"layout": "before-4.52", "seed": 0}}


def build(log: dict, key: str, converter: str, *args, **kwargs) -> None:
    """Run one converter in a child process; log[key] = {seconds, peak_rss_mb}."""
    spec = json.dumps({"converter": converter, "args": [str(a) for a in args], "kwargs": kwargs})
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, spec], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-4:])
        raise HuatuoError(f"Building {key} failed ({converter}); its last lines say:\n{tail}")
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    log[key] = {"seconds": round(time.perf_counter() - t0, 2), **peaks, "peak_rss_mb": round(peaks["peak_rss_mb"])}
    print(f"  built {key} in {log[key]['seconds']:.1f} s, peak RSS {peaks['peak_rss_mb']:.0f} MB "
          f"(anonymous {peaks.get('peak_anon_mb', float('nan')):.0f} MB, mmapped files "
          f"{peaks.get('peak_file_mb', float('nan')):.0f} MB)", flush=True)


def disk_needed_gb(profile: Profile, root: Path, labels: list[str]) -> float:
    """Disk the chosen rows still need: the checkpoint unless built, each unbuilt row's folder."""
    rows = profile.row_gb or {}
    need = 0.0 if (root / "ckpt" / "config.json").is_file() else profile.checkpoint_gb
    return need + sum(rows.get(label, 0.0) for label in labels
                      if not label.startswith("torch") and not _done(root / label.replace(" ", "-")))


def _check_disk(profile: Profile, root: Path, labels: list[str]) -> None:
    """Refuse to start builds that cannot fit."""
    root.mkdir(parents=True, exist_ok=True)
    need_gb, free_gb = disk_needed_gb(profile, root, labels), shutil.disk_usage(root).free / 1e9
    if free_gb < need_gb:
        raise HuatuoError(f"The {profile.name} profile's rows {', '.join(labels)} need about {need_gb:.0f} GB "
                          f"free in {root}, which has {free_gb:.0f} GB: free space, choose rows with --only "
                          "or pass another --work folder.")


def prepare(profile: Profile, work: Path, labels: list[str], threads: int) -> tuple[list[Target], dict]:
    """Build (or reuse) the checkpoint and the converted folders the chosen rows need.
    Returns the targets in table order and {what: {seconds, peak_rss_mb}} for what was built now."""
    root, built = Path(work) / profile.name, {}
    ckpt = root / "ckpt"
    _check_disk(profile, root, labels)
    if not (ckpt / "config.json").is_file():
        build(built, "checkpoint", profile.maker, ckpt, **MAKERS[profile.maker], **profile.sizes)
    targets = []
    for label in labels:
        kind, quant = label.split()
        folder = root / f"{kind}-{quant}"
        if kind == "torch":
            targets.append(Target(label, "torch", ckpt))
            continue
        if kind == "gguf" and not _done(folder):
            build(built, label, "export_gguf", ckpt, folder, quant=quant, threads=threads)
        elif kind == "onnx" and not _done(folder):
            if profile.onnx_direct or quant == "fp32":
                build(built, label, "export_onnx", ckpt, folder, quant=quant)
            else:                      # one fp32 export serves every quant
                fp32 = root / "onnx-fp32"
                if not _done(fp32):
                    build(built, "onnx fp32", "export_onnx", ckpt, fp32, quant="fp32")
                build(built, label, "quantize_onnx", fp32, folder, quant=quant)
        targets.append(Target(label, kind, folder, quant if kind == "gguf" else None))
    return targets, built


def text_gguf(folder: Path) -> Path:
    """The text GGUF of a one-quant folder written by export_gguf."""
    from huatuo_lite.manifest import read_manifest

    files = read_manifest(folder)["files"]
    return folder / next(name for name, entry in files.items() if entry["role"] == "text")


def _child(spec: dict) -> None:
    """Entry of a build process: run the converter, print {"peak_rss_mb": VmHWM, "peak_anon_mb",
    "peak_file_mb"} (VmHWM includes mmapped input files, e.g. llama.cpp's quantizer maps its
    whole intermediate; the sampled anonymous peak is what the conversion itself holds)."""
    import importlib

    from measure import PeakSampler, peak_rss_mb

    module, function = CONVERTERS[spec["converter"]].split(":")
    with PeakSampler() as sampler:
        getattr(importlib.import_module(module), function)(*spec["args"], **spec["kwargs"])
    sys.stdout.write("\n" + json.dumps({"peak_rss_mb": peak_rss_mb(), **sampler.peaks()}) + "\n")


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
