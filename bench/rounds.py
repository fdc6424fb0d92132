"""Ours and stock llama.cpp on one GGUF file, in alternating rounds.

Why: on this VM the order of two back-to-back runs moved their ratio (the 7B decode read
0.86-0.88x of stock with ours always run first, 1.03x in hand-alternated runs with stock
first). So each repeat is a round of one image for each peer, and the order flips every
round (ours first in rounds 0, 2, ...; stock first in 1, 3, ...): with an even number of
rounds each peer goes first equally often and order drops out of the medians.
"""
from __future__ import annotations

import statistics

OURS, STOCK = "ours", "stock"


def round_orders(rounds: int) -> list[tuple[str, str]]:
    """[(first, second)] per round: ours first in even rounds, stock first in odd ones."""
    return [(OURS, STOCK) if index % 2 == 0 else (STOCK, OURS) for index in range(rounds)]


def merge_children(parts: list[dict]) -> dict:
    """Several bench/measure.py results (one image each) -> one result as if one child had
    asked about every image: the per-image lists joined; load time their median; peaks the
    highest (each child's own process)."""
    merged = {"first": [run for part in parts for run in part["first"]],
              "follow_up": [run for part in parts for run in part["follow_up"]],
              "load_s": statistics.median(part["load_s"] for part in parts)}
    for key in ("peak_rss_mb", "peak_anon_mb", "peak_file_mb"):
        values = [part[key] for part in parts if part.get(key) is not None]
        merged[key] = max(values) if values else None
    return merged


def median_rows(rows: list[dict]) -> dict:
    """Stock rows of single rounds -> one row: numbers are medians over the rounds that have
    them; anything else (label, arguments) is the first round's."""
    merged = dict(rows[0])
    for key in {key for row in rows for key in row}:
        values = [row[key] for row in rows if key in row]
        if all(isinstance(value, bool) for value in values):
            merged[key] = any(values)                 # e.g. ttft_estimated in any round
        elif all(isinstance(value, (int, float)) for value in values):
            merged[key] = statistics.median(values)
    merged["rounds"] = len(rows)
    return merged


ROUND_KEYS = ("time_to_first_token_s", "decode_tokens_per_s")


def per_round(figures: list[dict]) -> dict:
    """{key: [value of each round, None where missing]} for the headline figures."""
    return {key: [entry.get(key) for entry in figures] for key in ROUND_KEYS}
