"""The medical VQA benchmark harness: upstream's eval.py protocol, made resumable.

    summary = run_eval("models/demo", "data/test_vqa.json", "reports/demo")

Data: the upstream evaluation JSON as published — a list of records with
`question`, `options` (a list, or its Python-literal string), `answer` (the
option's text), `image` (paths relative to the JSON's folder), `dataset`,
optional `subset`, optional `question_type` ("open" is skipped).

Prompt (upstream `llava_prompt`): "{question}\\nA. {opt}\\nB. {opt}...\\n" +
family.EVAL_ANSWER_SUFFIX. Score (upstream `scorer.match_choice3`): the first
standalone letter A-N in the output, compared case-sensitively with the
answer's letter. Upstream then crashed on any output without such a letter
(it fell through to a lookup over the record's non-string fields); here that
output scores wrong and is counted as "unparsed".

Per-item results are appended to results.jsonl as they come, so an
interrupted run resumes where it stopped; the report is rebuilt from that file.
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..jsonrecords import read_record_list
from ..resume import check_settings, read_rows
from ..errors import HuatuoError
from ..families.common import (EVAL_ANSWER_SUFFIX, EVAL_MAX_NEW_TOKENS, EVAL_OPTION_LETTERS,
                               EVAL_SKIPPED_QUESTION_TYPES)
from ..families.llava import GENERATION_DEFAULTS

# upstream scorer.match_choice3, first branch: a letter A-N (either case) after
# start / a non-word char / "is " / 是 / 为 / quote / # / * / "(", followed by a
# non-word char or the end, and not the article "a " / "A ".
UPSTREAM_LETTER = re.compile(
    r"(is |是|\*|\W|\ |\(|为|^|'|\"|#)(?![aA] )([abcdefghijklmnABCDEFGHIJKLMN])(\W|$)", re.S)
RESULTS_NAME = "results.jsonl"
RUN_NAME = "run.json"
TOP_LOGPROBS = 64       # answer-position log-probs kept per item (fidelity KL)


# ----------------------------------------------------------------- items ----
@dataclass(frozen=True)
class EvalItem:
    """One closed question, its images as absolute paths."""

    index: int               # position in the JSON file (stable across runs)
    question: str
    options: tuple
    answer: str
    images: tuple
    dataset: str
    subset: str
    key: str                 # fingerprint: a results line belongs to this item

    @property
    def answer_letter(self) -> str | None:
        """Upstream: "?" answers are always wrong (None never matches)."""
        return None if self.answer == "?" else EVAL_OPTION_LETTERS[self.options.index(self.answer)]

    @property
    def prompt(self) -> str:
        return build_prompt(self.question, self.options)


def build_prompt(question: str, options: Sequence[str]) -> str:
    """Upstream eval's question text (the chat template is added by prompt.py)."""
    lines = [f"{letter}. {option}" for letter, option in zip(EVAL_OPTION_LETTERS, options)]
    return "\n".join([question, *lines, EVAL_ANSWER_SUFFIX])


def parse_options(record: dict, where: str) -> list:
    """A record's options as texts (a list, or upstream's Python-literal string of one)."""
    options = record.get("options", [])
    if isinstance(options, str):   # upstream accepts a Python-literal list
        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError):
            raise HuatuoError(f"{where}: 'options' is a string that is not a list; fix the record.") from None
    if not isinstance(options, (list, tuple)) or len(options) > len(EVAL_OPTION_LETTERS):
        raise HuatuoError(f"{where}: 'options' must be a list of at most {len(EVAL_OPTION_LETTERS)} texts.")
    return [str(o) for o in options]


def _item(record: dict, index: int, root: Path, where: str) -> EvalItem:
    options = parse_options(record, where)
    answer = str(record.get("answer", ""))
    if answer != "?" and answer not in options:
        raise HuatuoError(f"{where}: the answer {answer!r} is not one of its options; fix the record.")
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    paths = tuple(str(root / p) for p in images)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise HuatuoError(f"{where}: image {missing[0]} is missing; keep the images/ folder next to the JSON.")
    key = hashlib.sha1(json.dumps([record.get("question"), options, answer, images],
                                  ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
    return EvalItem(index, str(record.get("question", "")), tuple(options), answer, paths,
                    str(record.get("dataset", "unknown")), str(record.get("subset") or ""), key)


def load_items(path, limit: int | None = None) -> tuple[list[EvalItem], dict]:
    """Closed items of an eval JSON (first `limit` of them) and counts of skipped records."""
    path = Path(path)
    records = read_record_list(path, "eval file", "an upstream-format eval file")
    items, skipped = [], {"open": 0, "no_options": 0}
    for index, record in enumerate(records):
        if limit is not None and len(items) >= limit:
            break
        if not isinstance(record, dict):
            raise HuatuoError(f"{path} record {index} is not an object; fix the file.")
        if record.get("question_type") in EVAL_SKIPPED_QUESTION_TYPES:
            skipped["open"] += 1
            continue
        if not record.get("options"):
            skipped["no_options"] += 1
            continue
        items.append(_item(record, index, path.parent, f"{path} record {index}"))
    return items, skipped


# --------------------------------------------------------------- scoring ----
def first_letter(output: str) -> str | None:
    """The letter upstream's scorer reads from an output, or None (unparsed)."""
    match = UPSTREAM_LETTER.search(output)
    return match.group(2) if match else None


def score(item: EvalItem, output: str) -> dict:
    """letter (None if unparsed), parsed, correct — as upstream, minus its crash."""
    letter = first_letter(output)
    return {"letter": letter, "parsed": letter is not None,
            "correct": letter is not None and letter == item.answer_letter}


# ------------------------------------------------------------- answering ----
class _FirstLogits:
    """An engine wrapper that keeps the logits of the first answer position
    (what prefill returns), so fidelity needs no second prefill."""

    def __init__(self, engine):
        self._engine, self.logits = engine, None

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def prefill(self, segments, all_logits: bool = False):
        out = self._engine.prefill(segments, all_logits)
        self.logits = out if not all_logits else out[-1]
        return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of a logits vector [V]."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def compact_logprobs(logprobs: np.ndarray, extra_ids: Sequence[int] = ()) -> dict:
    """The top TOP_LOGPROBS ids and their log-probs, plus any `extra_ids` (the
    reference's top ids, so a candidate's KL can be computed later)."""
    top = np.argsort(-logprobs)[:TOP_LOGPROBS].tolist()
    ids = top + [int(i) for i in extra_ids if int(i) not in set(top)]
    values = [float(logprobs[i]) if 0 <= i < len(logprobs) else float("-inf") for i in ids]
    return {"ids": ids, "values": values}


def model_answerer(model, config, extra_ids: Callable[[EvalItem], Sequence[int]] | None = None,
                   keep_logprobs: bool = False) -> Callable[[EvalItem], dict]:
    """item -> {"output", "logprobs"?} with a loaded HuatuoVision model."""
    from ..generate import run

    def answer(item: EvalItem) -> dict:
        with model.lock:
            engine = _FirstLogits(model.engine)
            generation = run(engine, list(item.images), item.prompt, config=config)
            for _ in generation:
                pass
        result = {"output": generation.answer.text}
        if keep_logprobs:
            ids = extra_ids(item) if extra_ids else ()
            result["logprobs"] = compact_logprobs(log_softmax(engine.logits), ids)
        return result

    return answer


def eval_config(temperature: float = 0.0, seed: int | None = None, max_new_tokens: int | None = None,
                defaults=None):
    """Greedy by default; the model's (`defaults`, else upstream LLaVA's: temperature 0.2,
    penalty 1.2) sampling when asked."""
    return (defaults or GENERATION_DEFAULTS).with_overrides(temperature=temperature, seed=seed,
                                              max_new_tokens=max_new_tokens or EVAL_MAX_NEW_TOKENS)


# ---------------------------------------------------------------- resume ----
def read_results(path: Path, items: Sequence[EvalItem]) -> dict:
    """Finished results by item index; a torn last line (a kill mid-write) is cut off."""
    return {row["index"]: row for row in read_rows(path, {item.index: item.key for item in items}, "eval file")}


def check_run(out_dir: Path, run_info: dict) -> None:
    """Refuse to resume a report folder made by another model or settings."""
    from ..fsutil import ensure_writable_dir

    ensure_writable_dir(out_dir)
    check_settings(out_dir / RUN_NAME, run_info, out_dir / RESULTS_NAME)


def evaluate_items(items: Sequence[EvalItem], answer: Callable[[EvalItem], dict], out_dir,
                   progress: bool = True, desc: str = "eval") -> list[dict]:
    """Answer and score every item not yet in out_dir/results.jsonl, appending as
    it goes; returns all rows in item order (each item once)."""
    from tqdm import tqdm

    from ..fsutil import ensure_writable_dir

    ensure_writable_dir(Path(out_dir))
    results_path = Path(out_dir) / RESULTS_NAME
    done = read_results(results_path, items)
    todo = [item for item in items if item.index not in done]
    with open(results_path, "a", encoding="utf-8") as log, \
            tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, disable=not progress,
                 unit="q") as bar:
        for item in todo:
            result = answer(item)
            row = {"index": item.index, "key": item.key, "dataset": item.dataset, "subset": item.subset,
                   "n_options": len(item.options), "answer": item.answer_letter, **result,
                   **score(item, result["output"])}
            log.write(json.dumps(row, ensure_ascii=False) + "\n")
            log.flush()
            done[item.index] = row
            bar.update(1)
    return [done[item.index] for item in items]


def run_eval(model, data, out_dir, backend: str | None = None, limit: int | None = None,
             temperature: float = 0.0, seed: int | None = None, max_new_tokens: int | None = None,
             progress: bool = True, load_options: dict | None = None, keep_logprobs: bool = False,
             extra_ids=None, label: str | None = None) -> dict:
    """Evaluate one model on one eval file; writes results.jsonl, report.json and
    report.md into out_dir and returns the report dict."""
    from ..api import load
    from ..families import generation_defaults
    from .report import summarize, write_reports

    items, skipped = load_items(data, limit)
    if not items:
        raise HuatuoError(f"{data} has no closed questions to evaluate.")
    out_dir = Path(out_dir)
    with load(model, backend=backend, **(load_options or {})) as hv:
        config = eval_config(temperature, seed, max_new_tokens, generation_defaults(hv.engine))
        run_info = {"model": str(Path(hv.path).resolve()), "backend": hv.backend, "data": str(Path(data).resolve()),
                    "temperature": config.temperature, "seed": config.seed,
                    "max_new_tokens": config.max_new_tokens, "logprobs": keep_logprobs,
                    # threads change speed, not answers: a run may resume with others
                    "options": {k: v for k, v in (load_options or {}).items() if k != "threads"}}
        check_run(out_dir, run_info)
        rows = evaluate_items(items, model_answerer(hv, config, extra_ids, keep_logprobs), out_dir,
                              progress, desc=label or hv.backend)
    # the sampling settings the answers were made with: the model's own defaults (a Qwen2.5-VL
    # folder's penalty 1.05, LLaVA's 1.2) under the options given; not in run_info, which
    # pins the model already (older report folders resume as before)
    report = summarize(rows, skipped, {**run_info, "label": label or hv.backend, "generation": asdict(config)})
    write_reports(out_dir, report)
    return report
