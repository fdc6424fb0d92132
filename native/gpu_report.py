"""The report of native/gpu_check.sh: eval runs compared, the libmtmd self-test, llama-bench.

    python native/gpu_report.py --eval cpu=DIR --eval gpu=DIR [--eval NAME=DIR ...]
        [--selftest selftest.json] [--bench bench.jsonl] [--timings timings.txt]
        [--fact KEY=VALUE ...] [--md GPU_CHECK.md] [--json gpu_check.json]

Each DIR is a `huatuo-lite eval` report folder (results.jsonl + report.json). The first
--eval is the reference; every other one is compared with it question by question:
accuracy, the difference in points, and agreement (the same scored letter, as
`huatuo-lite eval --compare` counts it). A run passes when its accuracy is within
MAX_DELTA_POINTS of the reference's and it agrees on at least MIN_AGREEMENT of the
questions both answered. The check passes when every comparison passes, the GPU
self-test (when given) passed, and llama-bench (when given) measured on a GPU device.

Exit status: 0 passed, 1 failed, 2 bad input (one sentence naming it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MAX_DELTA_POINTS = 0.3      # |accuracy - reference accuracy|, percentage points
MIN_AGREEMENT = 0.99        # share of shared questions with the same scored letter
RESULTS = "results.jsonl"
REPORT = "report.json"
CPU_DEVICES = {"none", ""}  # llama-bench's `devices` field for a CPU-only test (-dev none)


class BadInput(Exception):
    """One sentence naming the input and what to do (exit 2)."""


# ------------------------------------------------------------------ evals ----
def load_eval(folder) -> dict:
    """{"rows": {index: row}, "report": report.json or {}} of an eval report folder.
    A torn last line of results.jsonl (a kill mid-write) is skipped, as the eval does."""
    folder = Path(folder)
    results = folder / RESULTS
    if not results.is_file():
        raise BadInput(f"{folder} holds no {RESULTS}; give a `huatuo-lite eval` report folder.")
    rows = {}
    for line in results.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "index" in row and "correct" in row:
            rows[row["index"]] = row
    if not rows:
        raise BadInput(f"{results} holds no scored questions; run the eval again.")
    report_path = folder / REPORT
    report = read_json(report_path, "rerun the eval") if report_path.is_file() else {}
    return {"rows": rows, "report": report}


def read_json(path: Path, remedy: str) -> dict:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise BadInput(f"{path} is not readable JSON; {remedy}.") from None
    if not isinstance(value, dict):
        raise BadInput(f"{path} holds no JSON object; {remedy}.")
    return value


def accuracy(rows: dict) -> float:
    return sum(bool(r["correct"]) for r in rows.values()) / len(rows)


def compare(reference: dict, candidate: dict) -> dict:
    """Accuracy of each (each over its own questions), the difference in points, and
    agreement over the questions both answered (same scored letter; None = unparsed)."""
    shared = sorted(set(reference) & set(candidate))
    if not shared:
        raise BadInput("the two eval runs share no question; run both on the same eval file.")
    differ = [i for i in shared if reference[i].get("letter") != candidate[i].get("letter")]
    acc_ref, acc_cand = accuracy(reference), accuracy(candidate)
    return {"n_reference": len(reference), "n": len(candidate), "shared": len(shared),
            "accuracy_reference": acc_ref, "accuracy": acc_cand,
            "delta_points": 100.0 * (acc_cand - acc_ref),
            "agreement": (len(shared) - len(differ)) / len(shared),
            "disagreements": differ}


def eval_verdict(comparison: dict, max_delta_points: float = MAX_DELTA_POINTS,
                 min_agreement: float = MIN_AGREEMENT) -> list[str]:
    """Why a comparison fails (empty: it passes)."""
    reasons = []
    if comparison["n"] != comparison["n_reference"] or comparison["shared"] != comparison["n"]:
        reasons.append(f"answered {comparison['n']} questions, the reference {comparison['n_reference']}")
    if abs(comparison["delta_points"]) > max_delta_points + 1e-9:
        reasons.append(f"accuracy differs by {comparison['delta_points']:+.2f} points (limit {max_delta_points})")
    if comparison["agreement"] < min_agreement:
        reasons.append(f"agreement {100 * comparison['agreement']:.1f}% < {100 * min_agreement:.0f}%")
    return reasons


# ------------------------------------------------------------------ bench ----
def load_bench(path) -> list[dict]:
    """llama-bench `-o jsonl` rows (one JSON object a line; other lines are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path} does not exist; give llama-bench's -o jsonl output.")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def bench_test_name(row: dict) -> str:
    """llama-bench's test label: pp512 (prefill), tg128 (decode), pp512+tg128."""
    n_prompt, n_gen = int(row.get("n_prompt", 0)), int(row.get("n_gen", 0))
    parts = ([f"pp{n_prompt}"] if n_prompt else []) + ([f"tg{n_gen}"] if n_gen else [])
    return "+".join(parts) or "none"


def bench_table(rows: list[dict]) -> list[dict]:
    """One entry per test: CPU and GPU tokens/s (mean ± sd) and the GPU/CPU ratio."""
    tests: dict = {}
    for row in rows:
        where = "cpu" if str(row.get("devices", "")).lower() in CPU_DEVICES else "gpu"
        entry = tests.setdefault(bench_test_name(row), {"test": bench_test_name(row)})
        entry[where] = {"tokens_per_s": float(row["avg_ts"]), "sd": float(row.get("stddev_ts", 0.0)),
                        "devices": row.get("devices"), "threads": row.get("n_threads"),
                        "n_gpu_layers": row.get("n_gpu_layers")}
    for entry in tests.values():
        if "cpu" in entry and "gpu" in entry and entry["cpu"]["tokens_per_s"] > 0:
            entry["gpu_over_cpu"] = entry["gpu"]["tokens_per_s"] / entry["cpu"]["tokens_per_s"]
    return list(tests.values())


# ---------------------------------------------------------------- timings ----
def load_timings(path) -> dict:
    """`phase seconds` lines (what gpu_check.sh appends) -> {phase: seconds}."""
    timings = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        name, _, seconds = line.strip().rpartition(" ")
        try:
            timings[name] = float(seconds)
        except ValueError:
            continue
    return timings


# ----------------------------------------------------------------- report ----
def build_report(evals: list[tuple[str, dict]], selftest: dict | None = None, bench: list | None = None,
                 timings: dict | None = None, facts: dict | None = None) -> dict:
    """Everything the check measured, with a verdict and the reasons it failed."""
    if len(evals) < 2:
        raise BadInput("give at least two --eval NAME=DIR runs: the reference first, then the GPU run.")
    ref_name, ref = evals[0]
    report = {"facts": dict(facts or {}), "reference": ref_name,
              "limits": {"max_delta_points": MAX_DELTA_POINTS, "min_agreement": MIN_AGREEMENT},
              "evals": [{"name": ref_name, "n": len(ref["rows"]), "accuracy": accuracy(ref["rows"])}],
              "failures": []}
    for name, run in evals[1:]:
        row = {"name": name, **compare(ref["rows"], run["rows"])}
        row["failures"] = eval_verdict(row)
        report["evals"].append(row)
        report["failures"] += [f"{name}: {reason}" for reason in row["failures"]]
    if selftest is not None:
        report["selftest"] = selftest
        gpu = selftest.get("gpu", {})
        if not gpu.get("passed"):
            report["failures"].append(f"libmtmd self-test on the GPU failed (min cosine {gpu.get('min_cosine')})")
        if gpu.get("backend") in (None, "CPU"):
            report["failures"].append(f"libmtmd's CLIP ran on {gpu.get('backend') or 'an unknown backend'}, not the GPU")
    if bench is not None:
        report["bench"] = bench_table(bench)
        if not any("gpu" in entry for entry in report["bench"]):
            report["failures"].append("llama-bench measured no GPU test")
    if timings:
        report["timings_s"] = timings
    report["passed"] = not report["failures"]
    return report


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def render_markdown(report: dict) -> str:
    lines = ["# GPU check", ""]
    lines += [f"- {key}: {value}" for key, value in report["facts"].items()]
    lines += ["", f"**{'PASSED' if report['passed'] else 'FAILED'}**"]
    lines += [f"- {failure}" for failure in report["failures"]]
    lines += ["", f"## Eval (reference: {report['reference']}; limits: |Δ| <= "
              f"{report['limits']['max_delta_points']} points, agreement >= "
              f"{100 * report['limits']['min_agreement']:.0f}%)", "",
              "| run | n | accuracy % | Δ vs reference (points) | agreement % | differing questions |",
              "|---|---:|---:|---:|---:|---|"]
    for row in report["evals"]:
        if "agreement" not in row:
            lines.append(f"| {row['name']} (reference) | {row['n']} | {_pct(row['accuracy'])} | | | |")
            continue
        differ = ", ".join(map(str, row["disagreements"][:10])) + (" ..." if len(row["disagreements"]) > 10 else "")
        lines.append(f"| {row['name']} | {row['n']} | {_pct(row['accuracy'])} | {row['delta_points']:+.2f} | "
                     f"{_pct(row['agreement'])} | {differ or 'none'} |")
    if "selftest" in report:
        st = report["selftest"]
        lines += ["", f"## libmtmd self-test (image features vs vision.onnx, pass: min cosine >= "
                  f"{st.get('threshold')})", "", "| run | CLIP backend | min cosine | mean cosine | passed |",
                  "|---|---|---:|---:|---|"]
        for name in ("cpu", "gpu"):
            run = st.get(name, {})
            lines.append(f"| {name} | {run.get('backend')} | {run.get('min_cosine')} | {run.get('mean_cosine')} | "
                         f"{run.get('passed')} |")
        if "gpu_vs_cpu_min_cosine" in st:
            lines.append(f"\nGPU vs CPU features: min per-token cosine {st['gpu_vs_cpu_min_cosine']}.")
    if "bench" in report:
        lines += ["", "## llama-bench (tokens/s, mean ± sd)", "",
                  "| test | CPU | GPU | GPU / CPU |", "|---|---:|---:|---:|"]
        for entry in report["bench"]:
            cells = [f"{entry[w]['tokens_per_s']:.1f} ± {entry[w]['sd']:.1f}" if w in entry else "-"
                     for w in ("cpu", "gpu")]
            ratio = f"{entry['gpu_over_cpu']:.2f}x" if "gpu_over_cpu" in entry else "-"
            lines.append(f"| {entry['test']} | {cells[0]} | {cells[1]} | {ratio} |")
    if report.get("timings_s"):
        lines += ["", "## Time (s)", ""] + [f"- {k}: {v:.0f}" for k, v in report["timings_s"].items()]
    return "\n".join(lines) + "\n"


def _pairs(values, what: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise BadInput(f"{what} {value!r} is not NAME=VALUE; write e.g. {what} gpu=path/to/eval-folder.")
        pairs.append((name, rest))
    return pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", action="append", help="NAME=DIR, an eval report folder; the first is the reference")
    parser.add_argument("--selftest", type=Path, help="native/gpu_selftest.py's JSON")
    parser.add_argument("--bench", type=Path, help="llama-bench -o jsonl output")
    parser.add_argument("--timings", type=Path, help="`phase seconds` lines")
    parser.add_argument("--fact", action="append", help="KEY=VALUE shown at the top (device, driver, ...)")
    parser.add_argument("--md", type=Path, help="write the Markdown report here")
    parser.add_argument("--json", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    try:
        evals = [(name, load_eval(folder)) for name, folder in _pairs(args.eval, "--eval")]
        facts = dict(_pairs(args.fact, "--fact"))
        selftest = None
        if args.selftest:
            if not args.selftest.is_file():
                raise BadInput(f"{args.selftest} does not exist; give native/gpu_selftest.py's --json output.")
            selftest = read_json(args.selftest, "run native/gpu_selftest.py --json again")
        bench = load_bench(args.bench) if args.bench else None
        timings = load_timings(args.timings) if args.timings and args.timings.is_file() else None
        report = build_report(evals, selftest, bench, timings, facts)
    except BadInput as exc:
        print(f"gpu_report: {exc}", file=sys.stderr)
        return 2
    text = render_markdown(report)
    if args.md:
        args.md.write_text(text, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(text, end="")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
