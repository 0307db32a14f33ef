"""Ranking metrics over the 10 candidates, validity rates, and paired bootstrap intervals.

One relevant item per example, so with r the 1-based rank of the target::

    Recall@k = 1[r <= k]        NDCG@k = 1[r <= k] / log2(r + 1)      (IDCG = 1)

Two scorings, as DESIGN.md asks: the paper's (an invalid output falls back to the retriever order) and strict
(an invalid output is a miss).
"""
from __future__ import annotations

import numpy as np

from .text import ParsedRanking

METRIC_KEYS = ("recall@1", "recall@3", "ndcg@3", "ndcg@10")


def target_ranks(rankings: list[list[int]], target_pos) -> np.ndarray:
    """1-based rank of the target position in each ranking; 0 when it is absent (a miss at every cutoff)."""
    out = np.zeros(len(rankings), dtype=np.int64)
    for i, (ranking, t) in enumerate(zip(rankings, target_pos)):
        if int(t) in ranking:
            out[i] = ranking.index(int(t)) + 1
    return out


def per_example(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric per example (so two systems can be compared pairwise)."""
    r = np.asarray(ranks, dtype=np.float64)
    hit = r > 0
    gain = np.where(hit, 1.0 / np.log2(np.where(hit, r, 1.0) + 1.0), 0.0)
    return {"recall@1": (hit & (r <= 1)).astype(float), "recall@3": (hit & (r <= 3)).astype(float),
            "ndcg@3": np.where(r <= 3, gain, 0.0), "ndcg@10": np.where(r <= 10, gain, 0.0)}


def score_parses(parses: list[ParsedRanking], target_pos) -> dict:
    """Paper and strict metrics, validity by failure type, mean lengths. Also the per-example arrays (``_per``)."""
    n = len(parses)
    paper = per_example(target_ranks([p.ranking for p in parses], target_pos))
    strict_r = target_ranks([p.ranking if p.valid else [] for p in parses], target_pos)
    strict = per_example(strict_r)
    validity = {
        "valid_rate": float(np.mean([p.valid for p in parses])) if n else 0.0,
        "duplicate_rate": float(np.mean([p.duplicate for p in parses])) if n else 0.0,
        "dropped_rate": float(np.mean([p.dropped for p in parses])) if n else 0.0,
        "out_of_set_rate": float(np.mean([p.out_of_set for p in parses])) if n else 0.0,
        "malformed_rate": float(np.mean([p.malformed for p in parses])) if n else 0.0,
        "mean_reasoning_tokens": float(np.mean([p.reasoning_tokens for p in parses])) if n else 0.0,
        "mean_answer_tokens": float(np.mean([p.answer_tokens for p in parses])) if n else 0.0,
    }
    return {
        "metrics": {**{k: float(v.mean()) for k, v in paper.items()}, **validity},
        "metrics_strict": {**{k: float(v.mean()) for k, v in strict.items()}, **validity},
        "_per": paper,
    }


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Difference of means mean(a) - mean(b) over the same examples, with a percentile bootstrap interval.

    Resampling users (not the two systems separately) keeps the pairing: the interval reflects how much the
    *difference* varies, which is far tighter than two independent intervals when the systems agree on most users.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("paired_bootstrap needs two 1-d arrays of the same, non-zero length")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    diffs = a[idx].mean(1) - b[idx].mean(1)
    lo, hi = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    return {"diff": float(a.mean() - b.mean()), "lo": float(lo), "hi": float(hi),
            "significant": bool(lo > 0 or hi < 0), "n": int(len(a))}


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% for z = 1.96) of a rate measured on ``n`` independent cases.

    Near 0 or 1 the usual rate ± z * sqrt(rate(1 - rate)/n) leaves [0, 1] and collapses when no case fails; Wilson's
    interval does neither. It says how far a valid rate such as 99.2% on 1,741 users is from a 99% bar.
    """
    if n <= 0 or not 0.0 <= rate <= 1.0:
        raise ValueError(f"wilson_interval needs n > 0 and a rate in [0, 1], got rate={rate}, n={n}")
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
