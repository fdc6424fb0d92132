"""Benchmark rows -> medians, roofline fractions, a markdown table and comparison lines.

A row (dict) carries, for the first question on an image: image_encode_s, prefill_s,
prefill_tokens_per_s, time_to_first_token_s, decode_tokens_per_s; for the follow-up
on the same image: follow_up_ttft_s and follow_up_ratio (follow-up TTFT / first TTFT);
and load_s, peak_rss_mb, size_mb, bytes_per_token, roofline_tokens_per_s, roofline_fraction.
"""
from __future__ import annotations

import statistics

FIRST_KEYS = ("image_encode_s", "prefill_s", "prefill_tokens_per_s", "time_to_first_token_s",
              "decode_tokens_per_s", "prompt_tokens")
# (header, key, format): one table column each; a missing value prints as "-".
COLUMNS = (
    ("row", "label", "{}"),
    ("size MB", "size_mb", "{:.0f}"),
    ("load s", "load_s", "{:.2f}"),
    ("image s", "image_encode_s", "{:.2f}"),
    ("prefill tok/s", "prefill_tokens_per_s", "{:.1f}"),
    ("TTFT s", "time_to_first_token_s", "{:.2f}"),
    ("decode tok/s", "decode_tokens_per_s", "{:.2f}"),
    ("roofline tok/s", "roofline_tokens_per_s", "{:.1f}"),
    ("of roofline", "roofline_fraction", "{:.0%}"),
    ("2nd TTFT s", "follow_up_ttft_s", "{:.3f}"),
    ("2nd/1st", "follow_up_ratio", "{:.3f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
)


def summarize(measured: dict) -> dict:
    """A child's raw result (lists per repeat) -> medians."""
    first, follow = measured["first"], measured["follow_up"]
    row = {key: statistics.median(run[key] for run in first) for key in FIRST_KEYS}
    row["follow_up_ttft_s"] = statistics.median(run["time_to_first_token_s"] for run in follow)
    row["follow_up_ratio"] = statistics.median(
        b["time_to_first_token_s"] / a["time_to_first_token_s"] for a, b in zip(first, follow))
    row["follow_up_reused_positions"] = follow[-1].get("reused_positions")
    row["completion_tokens"] = first[-1]["completion_tokens"]
    row["token_ids"] = first[0]["token_ids"]          # greedy answer to the first image (agreement check)
    row.update(load_s=measured["load_s"], peak_rss_mb=measured["peak_rss_mb"], repeats=len(first),
               peak_anon_mb=measured.get("peak_anon_mb"), peak_file_mb=measured.get("peak_file_mb"))
    return row


def add_roofline(row: dict, bytes_per_token: int, read_gbs: float) -> None:
    """roofline tok/s = read bandwidth / bytes read per decoded token."""
    row["bytes_per_token"] = bytes_per_token
    row["roofline_tokens_per_s"] = read_gbs * 1e9 / bytes_per_token
    if row.get("decode_tokens_per_s"):
        row["roofline_fraction"] = row["decode_tokens_per_s"] / row["roofline_tokens_per_s"]


def add_agreement(rows: list[dict]) -> None:
    """greedy_same_as_torch: how many leading greedy tokens equal the torch fp32 reference's
    (random weights make near-ties common, so this is a coarse check, not a fidelity figure)."""
    reference = next((row["token_ids"] for row in rows if row["label"] == "torch fp32"), None)
    for row in rows:
        if reference is not None and "token_ids" in row:
            pairs = zip(row["token_ids"], reference)
            row["greedy_same_as_torch"] = next((i for i, (a, b) in enumerate(pairs) if a != b),
                                               min(len(reference), len(row["token_ids"])))


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(header for header, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" if key == "label" else "---:" for _, key, _ in COLUMNS) + "|"]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "-" for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons(rows: list[dict]) -> list[str]:
    """Ours vs stock llama.cpp per GGUF quant, and every row vs the torch fp32 reference."""
    by_label = {row["label"]: row for row in rows}
    lines = []
    for row in rows:
        stock = by_label.get(f"llama.cpp {row.get('quant')}") if row["label"].startswith("gguf") else None
        if stock:
            parts = [f"{row['label']} vs stock llama.cpp:"]
            for name, key, better in (("TTFT", "time_to_first_token_s", "lower"),
                                      ("prefill", "prefill_tokens_per_s", "higher"),
                                      ("decode", "decode_tokens_per_s", "higher")):
                if row.get(key) and stock.get(key):
                    parts.append(f"{name} {row[key] / stock[key]:.2f}x of stock ({better} is better)")
            lines.append(" ".join(parts[:1]) + " " + ", ".join(parts[1:]))
    reference = by_label.get("torch fp32")
    if reference:
        for row in rows:
            if row is reference or not row.get("decode_tokens_per_s"):
                continue
            speed = row["decode_tokens_per_s"] / reference["decode_tokens_per_s"]
            ttft = (reference["time_to_first_token_s"] / row["time_to_first_token_s"]
                    if row.get("time_to_first_token_s") else None)
            memory = (row["peak_rss_mb"] / reference["peak_rss_mb"] if row.get("peak_rss_mb") else None)
            text = f"{row['label']} vs torch fp32: decode {speed:.2f}x"
            text += f", first-token {ttft:.2f}x faster" if ttft else ""
            text += f", peak RSS {memory:.2f}x" if memory else ""
            if row.get("greedy_same_as_torch") is not None:
                text += f", greedy tokens equal to torch's: first {row['greedy_same_as_torch']}"
            lines.append(text)
    return lines


def render(result: dict) -> str:
    """The whole report printed at the end of a run."""
    bw = result["bandwidth"]
    head = [f"# huatuo-lite benchmark: profile {result['profile']} ({result['about']})",
            "",
            f"threads {result['threads']}, repeats {result['repeat']} (medians), {result['new_tokens']} "
            f"new tokens per question; load average at start {result['load_average']}",
            f"memory bandwidth ({bw['method']}, {bw['threads']} threads): read {bw['read_gbs']:.1f} GB/s, "
            f"copy {bw['copy_gbs']:.1f} GB/s; roofline = read bandwidth / text weight bytes per token",
            ""]
    tail = [""] + [f"- {line}" for line in comparisons(result["rows"])]
    tail += [f"- built {what} in {b['seconds']:.0f} s, peak RSS {b['peak_rss_mb']} MB"
             + (f" (anonymous {b['peak_anon_mb']} MB, mmapped files {b['peak_file_mb']} MB)" if "peak_anon_mb" in b else "")
             for what, b in result.get("built_s", {}).items()]
    tail += [f"- {row['label']}: peak RSS {row['peak_rss_mb']:.0f} MB = anonymous up to {row['peak_anon_mb']} MB"
             f" + mmapped files up to {row['peak_file_mb']} MB" for row in result["rows"] if row.get("peak_anon_mb")]
    tail += [f"- note: {note}" for note in result["notes"]]
    return "\n".join(head) + markdown_table(result["rows"]) + "\n" + "\n".join(tail)
