"""The one sampler every backend shares, in numpy.

It reproduces HF `generate`'s logits pipeline as upstream calls it
(do_sample=True, temperature 0.2, repetition_penalty 1.2, HF's default top_k 50):
repetition penalty -> temperature -> top-k -> top-p -> softmax -> draw.
Greedy (temperature 0) still applies the repetition penalty, as HF does, because
it is a logits *processor*, not a sampling warper.

Upstream passes only `inputs_embeds` to generate, so HF's `input_ids` starts
empty: the penalty sees the tokens generated so far, never the prompt.
"""
from __future__ import annotations

import numpy as np

from .families.common import GenerationConfig


class Sampler:
    """Picks the next token from float32 logits [V]; one instance per answer."""

    def __init__(self, config: GenerationConfig, prompt_ids=()):
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.generated: list[int] = []
        # ids the penalty sees besides the generated ones (a family whose upstream calls
        # generate(input_ids=...), so HF penalises the prompt's tokens too)
        self.prompt_ids = [int(i) for i in prompt_ids]

    def __call__(self, logits: np.ndarray) -> int:
        scores = self._penalised(np.asarray(logits, dtype=np.float32))
        token = int(np.argmax(scores)) if self.config.greedy else self._draw(scores)
        self.generated.append(token)
        return token

    def _penalised(self, scores: np.ndarray) -> np.ndarray:
        penalty = self.config.repetition_penalty
        if penalty == 1.0 or not (self.generated or self.prompt_ids):
            return scores
        scores = scores.copy()
        seen = np.unique(np.asarray(self.prompt_ids + self.generated, dtype=np.int64))
        picked = scores[seen]
        scores[seen] = np.where(picked < 0, picked * penalty, picked / penalty)
        return scores

    def _draw(self, scores: np.ndarray) -> int:
        scores = scores / np.float32(self.config.temperature)
        scores = top_k_filter(scores, self.config.top_k)
        scores = top_p_filter(scores, self.config.top_p)
        probs = softmax(scores)
        return int(self.rng.choice(len(probs), p=probs))


def top_k_filter(scores: np.ndarray, k: int) -> np.ndarray:
    """HF TopKLogitsWarper: keep scores >= the k-th largest (ties kept)."""
    if k <= 0 or k >= len(scores):
        return scores
    kth = np.partition(scores, -k)[-k]
    return np.where(scores < kth, -np.inf, scores).astype(np.float32)


def top_p_filter(scores: np.ndarray, top_p: float) -> np.ndarray:
    """HF TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p (keep >= 1 token)."""
    if top_p >= 1.0:
        return scores
    order = np.argsort(scores, kind="stable")            # ascending
    cumulative = np.cumsum(softmax(scores[order]))
    remove = cumulative <= (1.0 - top_p)
    remove[-1] = False                                    # min_tokens_to_keep = 1
    out = scores.copy()
    out[order[remove]] = -np.inf
    return out


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores.astype(np.float64) - np.max(scores)
    exp = np.exp(shifted)
    return exp / exp.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, float64 (for KL and agreement metrics)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
