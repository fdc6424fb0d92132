"""README.md model cards for converted folders (GGUF and ONNX), in the Hugging Face form:
YAML front matter (license, base_model, pipeline_tag, tags, library_name) and then what the
folder holds, how well it answers (where measured) and how to run it."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from huatuo_lite.families.llava import RESEARCH_NOTICE
from huatuo_lite.fsutil import atomic_path
from huatuo_lite.manifest import MANIFEST_NAME
from huatuo_lite.llama_tools import self_test_verdict

CARD = "README.md"
PIPELINE_TAG = "image-text-to-text"
TAGS = {"gguf": ["gguf", "llama.cpp", "llava", "multimodal", "medical", "huatuo-lite"],
        "onnx": ["onnx", "onnxruntime", "llava", "multimodal", "medical", "huatuo-lite"]}
FIDELITY_ROW = re.compile(r"^\| (\S+) \| (\d+) \| ([\d.]+) \| [^|]+ \| ([\d.]+) \|", re.M)
# the notice, less the CLI's way to silence it
NOTICE = RESEARCH_NOTICE.split(" (Silence")[0]


def fidelity_from_card(path: Path) -> list[dict]:
    """(spec, n, accuracy %, agreement %) rows of a FIDELITY.md table, [] if there is none."""
    if not Path(path).is_file():
        return []
    text = Path(path).read_text(encoding="utf-8")
    return [{"spec": m[0], "count": int(m[1]), "accuracy": float(m[2]), "agreement": float(m[3])}
            for m in FIDELITY_ROW.findall(text)]


def _front_matter(meta, library: str, extra_tags: Sequence[str] = ()) -> list[str]:
    lines = ["---"]
    if meta.license:
        lines.append(f"license: {meta.license}")
    if meta.base_repo:
        lines += [f"base_model: {meta.base_repo}", "base_model_relation: quantized"]
    lines += [f"pipeline_tag: {PIPELINE_TAG}", f"library_name: {library}", "tags:"]
    lines += [f"- {tag}" for tag in [*TAGS[library], *extra_tags]]
    return lines + ["---", ""]


def _files_table(manifest: dict) -> list[str]:
    lines = ["| file | role | quant | size |", "|---|---|---|---:|"]
    for name, entry in sorted(manifest.get("files", {}).items()):
        size = entry.get("size", 0)
        lines.append(f"| `{name}` | {entry.get('role', '')} | {entry.get('quant', '')} | {size / 1e6:.1f} MB |")
    return lines


def _fidelity(rows: Sequence[dict], link: str | None, fmt: str) -> list[str]:
    lines = ["## Fidelity", ""]
    if not rows:
        return lines + [f"Not measured for this folder. Measure it with `huatuo-lite eval EVAL.json -m UPSTREAM "
                        f"--compare reference,{fmt}:QUANT` (see the huatuo-lite README).", ""]
    lines += ["| model | n | accuracy % | agreement with reference % |", "|---|---:|---:|---:|"]
    lines += [f"| {r['spec']} | {r['count']} | {r['accuracy']:.1f} | {r['agreement']:.1f} |" for r in rows]
    if link:
        lines += ["", f"Details (KL divergence, eval set, chart): [FIDELITY.md]({link})."]
    return lines + [""]


def render_card(meta, manifest: dict, fidelity_rows: Sequence[dict] = (), fidelity_link: str | None = None,
                about: str | None = None, extra_tags: Sequence[str] = ()) -> str:
    fmt = manifest.get("format", "gguf")
    lines = _front_matter(meta, fmt, extra_tags)
    lines += [f"# {meta.name} ({fmt.upper()})", ""]
    if about:
        lines += [about, ""]
    if meta.base_repo:
        lines += [f"A {fmt.upper()} conversion of [{meta.base_repo}]({meta.base_url}), written by "
                  f"{meta.quantized_by} (`huatuo-lite convert {fmt}`).", ""]
    lines += [f"**{NOTICE}**", "", "## Files", ""] + _files_table(manifest) + [""]
    quants = sorted({e["quant"] for e in manifest.get("files", {}).values() if e.get("role") in ("text", "decoder")
                     and e.get("quant")} | ({manifest.get("onnx", {}).get("quant")} - {None}))
    lines += [f"Quants: {', '.join(quants) or 'see the table'}.", ""]
    lines += _fidelity(fidelity_rows, fidelity_link, fmt)
    lines += USAGE[fmt](manifest)
    return "\n".join(lines).rstrip() + "\n"


def _gguf_usage(manifest: dict) -> list[str]:
    files = manifest.get("files", {})
    text = next((n for n, e in sorted(files.items()) if e.get("role") == "text"), "MODEL.gguf")
    mmproj = next((n for n, e in sorted(files.items()) if e.get("role") == "mmproj"), "MMPROJ.gguf")
    return ["## Use", "", self_test_verdict(manifest.get("mtmd_self_test")), "", "```sh",
            'huatuo-lite ask -m . scan.png "What abnormality is seen?"',
            f'llama-mtmd-cli -m {text} --mmproj {mmproj} --image scan.png -p "What abnormality is seen?"',
            "ollama create huatuo -f Modelfile && ollama run huatuo", "```", ""]


def _onnx_usage(manifest: dict) -> list[str]:
    return ["## Use", "", "```sh", 'huatuo-lite ask -m . scan.png "What abnormality is seen?"', "```", ""]


USAGE = {"gguf": _gguf_usage, "onnx": _onnx_usage}


def write_card(folder, meta, manifest: dict, **options) -> Path:
    """README.md beside the files; FIDELITY.md's numbers are shown when the folder has one."""
    folder = Path(folder)
    card_rows = fidelity_from_card(folder / "FIDELITY.md")
    options.setdefault("fidelity_rows", card_rows)
    options.setdefault("fidelity_link", "FIDELITY.md" if card_rows else None)
    path = folder / CARD
    with atomic_path(path) as tmp:
        tmp.write_text(render_card(meta, manifest, **options), encoding="utf-8")
    return path


__all__ = ["CARD", "MANIFEST_NAME", "render_card", "self_test_verdict", "write_card", "fidelity_from_card"]
