"""Does a converted model still answer like the original? Side-by-side eval.

    huatuo-lite eval test_vqa.json -m UPSTREAM_DIR --compare reference,gguf:Q8_0,onnx:int8

Spec syntax (comma-separated):
  reference            the torch backend on --model (an upstream checkpoint)
  FORMAT:QUANT         a converted folder of that format (gguf | onnx) holding
                       that quant (as its manifest records it: Q8_0, Q4_K_M,
                       int8, int4 ...), found under the compare root: the root
                       itself and the folders one or two levels below it. The
                       root is --compare-root, else the folder that holds --model.
  SPEC=PATH            that folder, explicitly (e.g. gguf:Q4_K_M=./out/q4).

For every spec: accuracy; agreement with the reference (the same scored letter,
"unparsed" counting as a letter of its own); and the mean KL divergence
KL(reference || candidate) of the next-token distribution at the first answer
position. The KL is taken over the reference's top TOP_LOGPROBS tokens plus one
bucket for the rest of the vocabulary (a lower bound of the full KL, equal to
it when the rest holds no mass) so that results stay small and resumable.

Converters call `card_after_convert(src, out, fmt, quant)`: when the source
checkpoint holds an eval set (EVAL_SET, beside its images/), it writes
FIDELITY.md next to the converted files.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import HuatuoError
from ..formats import FORMATS, MANIFEST_QUANTS, QUANT_OPTIONS, SPEC_BACKEND
from .report import write_text
from .run import log_softmax, run_eval
from ..families.common import GenerationConfig
from .fidelity_chart import write_chart

EVAL_SET = Path("eval") / "eval.json"      # an upstream checkpoint's own eval set, if any
FIDELITY_CARD = "FIDELITY.md"
FIDELITY_JSON = "fidelity.json"
REFERENCE = FORMATS["upstream"]      # the `reference` spec: the torch run on --model
SPEC_FORMS = ", ".join(f.spec + (":QUANT" if f.quants else "") for f in FORMATS.values())   # for errors
# SPEC_BACKEND (spec prefix -> backend), QUANT_OPTIONS (backend -> load options that pick
# a quant inside a folder; ONNX folders hold one) and MANIFEST_QUANTS come from formats.py


@dataclass(frozen=True)
class Spec:
    name: str            # as written: "reference", "gguf:Q8_0"
    backend: str
    quant: str | None
    path: Path

    @property
    def slug(self) -> str:
        return self.name.replace(":", "-").replace("/", "-")


# ----------------------------------------------------------------- specs ----
# MANIFEST_QUANTS: format -> the quants a manifest says its *language model* is stored
# in (a GGUF folder's mmproj or an ONNX folder's vision graph may carry another quant)


def _manifest_quants(folder: Path) -> tuple[str | None, set]:
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, set()
    fmt = manifest.get("format")
    return fmt, MANIFEST_QUANTS.get(fmt, lambda m: set())(manifest)


def _candidates(root: Path) -> list[Path]:
    level1 = [p for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []
    level2 = [q for p in level1 for q in sorted(p.iterdir()) if q.is_dir()]
    return [root, *level1, *level2]


def find_folder(root: Path, fmt: str, quant: str) -> Path:
    """The one folder under root whose manifest is `fmt` and holds `quant`."""
    found = [p for p in _candidates(root)
             if _manifest_quants(p)[0] == fmt and quant.upper() in _manifest_quants(p)[1]]
    if len(found) == 1:
        return found[0]
    if not found:
        raise HuatuoError(f"No {fmt} folder with {quant} under {root}; convert one, pass --compare-root, "
                          f"or name it as {fmt}:{quant}=PATH.")
    raise HuatuoError(f"Several {fmt} folders hold {quant} under {root} ({', '.join(map(str, found))}); "
                      f"name one as {fmt}:{quant}=PATH.")


def parse_spec(text: str, model: Path, root: Path) -> Spec:
    name, _, explicit = text.strip().partition("=")
    fmt, _, quant = name.partition(":")
    if fmt not in SPEC_BACKEND or (fmt == REFERENCE.spec) == bool(quant):
        raise HuatuoError(f"Unknown compare spec {text!r}: use {SPEC_FORMS}, "
                          "optionally =PATH (e.g. gguf:Q4_K_M=./out).")
    if explicit:
        path = Path(explicit).expanduser()
    else:
        path = model if fmt == REFERENCE.spec else find_folder(root, fmt, quant)
    return Spec(name, SPEC_BACKEND[fmt], quant or None, path)


def parse_specs(text: str, model, compare_root=None) -> list[Spec]:
    """Comma-separated specs -> Specs, the reference first (every other row is compared with it)."""
    model = Path(model).expanduser()
    root = Path(compare_root).expanduser() if compare_root else model.absolute().parent
    specs = [parse_spec(part, model, root) for part in text.split(",") if part.strip()]
    references = [s for s in specs if s.backend == REFERENCE.backend and s.name == REFERENCE.spec]
    if len(references) != 1:
        raise HuatuoError("--compare needs the spec `reference` exactly once (the torch run on --model).")
    if len({s.name for s in specs}) != len(specs):
        raise HuatuoError("--compare names a spec twice; give each once.")
    return references + [s for s in specs if s is not references[0]]


# ------------------------------------------------------------ log-probs ----
def first_position_logprobs(engine, images: Sequence, question: str) -> np.ndarray:
    """log-probs [V] of the first answer token for one question on any engine
    (the same prompt and image path as generation: generate.run's segments)."""
    from ..generate import run

    generation = run(engine, list(images), question, config=GenerationConfig(max_new_tokens=1))
    return log_softmax(engine.prefill(generation.segments))


def item_logprobs(engine, item) -> np.ndarray:
    """first_position_logprobs for an evaluate.EvalItem (its lettered prompt)."""
    return first_position_logprobs(engine, item.images, item.prompt)


def kl_divergence(reference: dict, candidate: dict) -> float:
    """KL(P_ref || P_cand) over the reference's kept ids plus a 'rest' bucket.
    Both are {"ids", "values"} (log-probs); the candidate must hold every reference id."""
    cand = dict(zip(candidate["ids"], candidate["values"]))
    p = np.exp(np.asarray(reference["values"], dtype=np.float64))
    q = np.exp(np.asarray([cand.get(i, -math.inf) for i in reference["ids"]], dtype=np.float64))
    q = np.maximum(q, 1e-30)
    kl = float(np.sum(p * (np.log(np.maximum(p, 1e-30)) - np.log(q))))
    p_rest, q_rest = max(1.0 - p.sum(), 0.0), max(1.0 - q.sum(), 1e-30)
    return kl + (p_rest * math.log(p_rest / q_rest) if p_rest > 1e-12 else 0.0)


# -------------------------------------------------------------- compare ----
def _rows_by_index(out_dir: Path, indices: set) -> dict:
    """This run's result rows (a folder may also hold rows of an earlier, longer run)."""
    from .run import RESULTS_NAME

    rows = {}
    for line in (out_dir / RESULTS_NAME).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("index") in indices:
            rows[row["index"]] = row
    return rows


def fidelity_row(spec: Spec, report: dict, rows: dict, reference: dict) -> dict:
    """One table row: accuracy, agreement and mean KL against the reference rows."""
    shared = [i for i in rows if i in reference]
    agree = sum(rows[i]["letter"] == reference[i]["letter"] for i in shared)
    kls = [kl_divergence(reference[i]["logprobs"], rows[i]["logprobs"]) for i in shared
           if "logprobs" in rows[i] and "logprobs" in reference[i]]
    total = report["total"]
    return {"spec": spec.name, "backend": spec.backend, "path": str(spec.path), "count": total["count"],
            "accuracy": total["accuracy"], "chance": total["chance"], "unparsed": total["unparsed"],
            "agreement": agree / len(shared) if shared else 0.0,
            "mean_kl": float(np.mean(kls)) if kls else 0.0}


def compare(specs: Sequence[Spec], data, out_dir, limit=None, progress=True, threads: int | None = None,
            **gen) -> list[dict]:
    """Evaluate every spec (reference first) into out_dir/<spec>/ and return the
    fidelity rows; also writes out_dir/fidelity.json and out_dir/FIDELITY.md.
    `threads`: CPU threads of every engine (speed only: a resumed run may change it)."""
    from .run import load_items

    out_dir = Path(out_dir)
    indices = {item.index for item in load_items(data, limit)[0]}
    rows, reference = [], None
    for spec in specs:
        folder = out_dir / spec.slug
        extra = None if reference is None else (lambda item, ref=reference: ref[item.index]["logprobs"]["ids"])
        options = {**QUANT_OPTIONS[spec.backend](spec.quant), **({"threads": threads} if threads else {})}
        report = run_eval(spec.path, data, folder, backend=spec.backend, limit=limit, progress=progress,
                          load_options=options, keep_logprobs=True, extra_ids=extra, label=spec.name, **gen)
        results = _rows_by_index(folder, indices)
        reference = results if reference is None else reference
        rows.append(fidelity_row(spec, report, results, reference))
    write_text(out_dir / FIDELITY_JSON, json.dumps(rows, indent=2) + "\n")
    write_fidelity_card(out_dir, rows, data=str(data))
    return rows


def render_card(rows: Sequence[dict], data: str | None = None, note: str | None = None,
                chart: str | None = None) -> str:
    """The FIDELITY.md text; `chart`: the chart image's file name, shown under the table."""
    ref = rows[0]["accuracy"] if rows else 0.0
    lines = ["# Fidelity", "",
             "How closely each converted form of this model answers like the torch reference, on the "
             "closed questions of an eval set (upstream prompt and first-letter scoring, greedy).", ""]
    if data:
        lines += [f"Eval set: `{data}`; chance level {100 * rows[0]['chance']:.1f}%." if rows else "", ""]
    if note:
        lines += [note, ""]
    lines += ["| model | n | accuracy % | Δ vs reference (points) | agreement % | mean KL (nats) | unparsed |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['spec']} | {r['count']} | {100 * r['accuracy']:.1f} | "
                     f"{100 * (r['accuracy'] - ref):+.1f} | {100 * r['agreement']:.1f} | "
                     f"{r['mean_kl']:.2e} | {r['unparsed']} |")
    lines += ["", "Agreement: same scored letter as the reference. KL: KL(reference || model) of the first "
              "answer token's distribution, over the reference's top tokens plus one bucket for the rest."]
    if chart:
        lines += ["", f"![Accuracy and agreement with the reference per model]({chart})"]
    return "\n".join(lines) + "\n"


def write_fidelity_card(folder, rows: Sequence[dict], data: str | None = None, note: str | None = None) -> Path:
    """FIDELITY.md and its chart (fidelity.png) in `folder` (next to a converted model's
    files), each written atomically."""
    chart = write_chart(folder, rows) if rows else None
    path = Path(folder) / FIDELITY_CARD
    write_text(path, render_card(rows, data, note, chart=chart.name if chart else None))
    return path


def card_after_convert(src_dir, out_dir, fmt: str, quant: str, limit: int | None = None,
                       progress: bool = False) -> Path | None:
    """The converters' hook: if the upstream checkpoint src_dir holds EVAL_SET,
    compare the new folder with the reference and write FIDELITY.md into out_dir.
    Returns the card's path, or None when there is no eval set. Work files go to
    out_dir/.fidelity/ (kept, so a second conversion reuses the reference run)."""
    data = Path(src_dir) / EVAL_SET
    if not data.is_file():
        return None
    specs = [Spec(REFERENCE.spec, REFERENCE.backend, None, Path(src_dir)),
             Spec(f"{FORMATS[fmt].spec}:{quant}", FORMATS[fmt].backend, quant, Path(out_dir))]
    rows = compare(specs, data, Path(out_dir) / ".fidelity", limit=limit, progress=progress)
    return write_fidelity_card(out_dir, rows, data=str(EVAL_SET))
