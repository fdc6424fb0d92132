"""Accuracy tables from scored eval rows: report.json and report.md.

Grouping as upstream's scorer: per `dataset`, and per `{dataset}_{subset}`
for records with a subset; the total is correct / all items (micro). Each
group also gives its unparsed count and its chance level (mean 1/n_options).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..fsutil import atomic_path

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def _group(rows: Sequence[dict]) -> dict:
    count = len(rows)
    correct = sum(bool(r["correct"]) for r in rows)
    return {"count": count, "correct": correct, "accuracy": correct / count if count else 0.0,
            "unparsed": sum(not r["parsed"] for r in rows),
            "chance": sum(1.0 / r["n_options"] for r in rows) / count if count else 0.0}


def _by(rows: Sequence[dict], key) -> dict:
    groups: dict = {}
    for row in rows:
        name = key(row)
        if name is not None:
            groups.setdefault(name, []).append(row)
    return {name: _group(members) for name, members in sorted(groups.items())}


def summarize(rows: Sequence[dict], skipped: dict, run_info: dict) -> dict:
    """The report dict: run settings, total, datasets, subsets, skipped records."""
    return {**run_info, "total": _group(rows),
            "datasets": _by(rows, lambda r: r["dataset"]),
            "subsets": _by(rows, lambda r: f"{r['dataset']}_{r['subset']}" if r.get("subset") else None),
            "skipped": dict(skipped)}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _table(title: str, groups: dict) -> list[str]:
    lines = [f"| {title} | n | accuracy % | chance % | unparsed |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {g['count']} | {_pct(g['accuracy'])} | {_pct(g['chance'])} | {g['unparsed']} |"
              for name, g in groups.items()]
    return lines


def render_markdown(report: dict) -> str:
    """A short human report: settings, then accuracy tables."""
    total = report["total"]
    penalty = (report.get("generation") or {}).get("repetition_penalty")     # reports before it was recorded: none
    lines = [f"# Eval: {report.get('label', report.get('backend', ''))}", "",
             f"- model: `{report.get('model')}` ({report.get('backend')})",
             f"- data: `{report.get('data')}`",
             f"- decoding: temperature {report.get('temperature')}, seed {report.get('seed')}, "
             f"max {report.get('max_new_tokens')} new tokens"
             + (f", repetition penalty {penalty} (the model's own)" if penalty is not None else ""),
             f"- skipped records: {report['skipped']}", "",
             f"**Accuracy {_pct(total['accuracy'])}%** on {total['count']} questions "
             f"(chance {_pct(total['chance'])}%, unparsed {total['unparsed']}).", ""]
    lines += _table("dataset", report["datasets"]) + [""]
    if report["subsets"]:
        lines += _table("dataset_subset", report["subsets"]) + [""]
    return "\n".join(lines)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_reports(out_dir, report: dict) -> None:
    """report.json and report.md, each written whole or not at all."""
    out_dir = Path(out_dir)
    write_text(out_dir / REPORT_JSON, json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    write_text(out_dir / REPORT_MD, render_markdown(report) + "\n")
