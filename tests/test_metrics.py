"""Ranking metrics on hand-computed cases, paper vs strict scoring, and the paired bootstrap."""
from __future__ import annotations

import os

# One BLAS thread: on a small shared CPU box OpenBLAS's spinning threads make numpy's eigh (semantic IDs) 20x
# slower. Set before numpy is first imported (the first test module collected wins; it is a default only).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import math

import numpy as np
import pytest

from diffgr2_lite.metrics import METRIC_KEYS, paired_bootstrap, per_example, score_parses, target_ranks, wilson_interval
from diffgr2_lite.text import ParsedRanking


def test_target_ranks():
    rankings = [[3, 0, 1, 2], [0, 1, 2, 3], [2, 1], [], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
    assert target_ranks(rankings, [0, 3, 0, 1, 0]).tolist() == [2, 4, 0, 0, 10]
    assert target_ranks(rankings, np.array([3, 0, 2, 0, 9])).tolist() == [1, 1, 1, 0, 1]
    assert target_ranks([], []).tolist() == []


def test_per_example_hand_values():
    ranks = np.array([1, 2, 3, 4, 10, 0])
    m = per_example(ranks)
    assert set(m) == set(METRIC_KEYS)
    assert m["recall@1"].tolist() == [1, 0, 0, 0, 0, 0]
    assert m["recall@3"].tolist() == [1, 1, 1, 0, 0, 0]
    expected_ndcg3 = [1.0, 1 / math.log2(3), 0.5, 0.0, 0.0, 0.0]     # rank 3 -> 1/log2(4) = 0.5
    expected_ndcg10 = [1.0, 1 / math.log2(3), 0.5, 1 / math.log2(5), 1 / math.log2(11), 0.0]
    assert m["ndcg@3"] == pytest.approx(expected_ndcg3)
    assert m["ndcg@10"] == pytest.approx(expected_ndcg10)


def test_per_example_against_a_direct_formula():
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 11, size=200)
    m = per_example(ranks)
    for r, r1, r3, n3, n10 in zip(ranks, m["recall@1"], m["recall@3"], m["ndcg@3"], m["ndcg@10"]):
        hit = r >= 1
        assert r1 == float(hit and r <= 1) and r3 == float(hit and r <= 3)
        assert n3 == pytest.approx(1 / math.log2(r + 1) if hit and r <= 3 else 0.0)
        assert n10 == pytest.approx(1 / math.log2(r + 1) if hit and r <= 10 else 0.0)


def parsed(ranking, valid, **flags):
    return ParsedRanking(ranking=list(ranking), model_ranking=list(ranking) if valid else [], valid=valid, **flags)


def test_score_parses_paper_vs_strict():
    fallback = list(range(10))
    parses = [
        parsed([2, 0, 1, 3, 4, 5, 6, 7, 8, 9], True, reasoning_tokens=10, answer_tokens=30),   # target 2 at rank 1
        parsed([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], True, reasoning_tokens=20, answer_tokens=30),   # target 1 at rank 2
        parsed(fallback, False, duplicate=True, dropped=True, answer_tokens=30),   # target 0: rank 1 (fallback)
        parsed(fallback, False, malformed=True),                                   # target 5: rank 6 (fallback)
    ]
    target = [2, 1, 0, 5]
    s = score_parses(parses, target)
    paper, strict = s["metrics"], s["metrics_strict"]
    # paper: ranks 1, 2, 1, 6
    assert paper["recall@1"] == pytest.approx(2 / 4)
    assert paper["recall@3"] == pytest.approx(3 / 4)
    assert paper["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3) + 1) / 4)
    assert paper["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 + 1 / math.log2(7)) / 4)
    # strict: ranks 1, 2, miss, miss
    assert strict["recall@1"] == pytest.approx(1 / 4)
    assert strict["recall@3"] == pytest.approx(2 / 4)
    assert strict["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert strict["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    for m in (paper, strict):
        assert m["valid_rate"] == pytest.approx(0.5)
        assert m["duplicate_rate"] == pytest.approx(0.25) and m["dropped_rate"] == pytest.approx(0.25)
        assert m["malformed_rate"] == pytest.approx(0.25) and m["out_of_set_rate"] == 0.0
        assert m["mean_reasoning_tokens"] == pytest.approx(7.5) and m["mean_answer_tokens"] == pytest.approx(22.5)
    assert s["_per"]["recall@1"].tolist() == [1, 0, 1, 0]


def test_score_parses_real_parser_outputs():
    from diffgr2_lite.text import build_answer, parse_ranking, sid_tokens

    cands = [sid_tokens((i, 0, 0)) for i in range(10)]
    good = parse_ranking(build_answer([cands[i] for i in [4, 0, 1, 2, 3, 5, 6, 7, 8, 9]]), cands)
    bad = parse_ranking(build_answer([cands[i] for i in [4, 4, 1, 2, 3, 5, 6, 7, 8, 9]]), cands)
    s = score_parses([good, bad], [4, 4])
    assert s["metrics"]["recall@1"] == pytest.approx(0.5)        # bad falls back to retriever order: target at rank 5
    assert s["metrics"]["ndcg@10"] == pytest.approx((1 + 1 / math.log2(6)) / 2)
    assert s["metrics_strict"]["ndcg@10"] == pytest.approx(0.5)
    assert s["metrics"]["duplicate_rate"] == pytest.approx(0.5)


def test_paired_bootstrap_identical():
    a = np.random.default_rng(0).random(50)
    r = paired_bootstrap(a, a.copy())
    assert r["diff"] == 0.0 and r["lo"] == 0.0 and r["hi"] == 0.0 and not r["significant"] and r["n"] == 50


def test_paired_bootstrap_clearly_better_and_sign():
    rng = np.random.default_rng(1)
    b = (rng.random(300) < 0.3).astype(float)
    a = np.maximum(b, (rng.random(300) < 0.4).astype(float))       # a is b plus extra hits
    r = paired_bootstrap(a, b, seed=3)
    assert r["diff"] == pytest.approx(a.mean() - b.mean())
    assert r["significant"] and 0 < r["lo"] <= r["diff"] <= r["hi"]
    back = paired_bootstrap(b, a, seed=3)
    assert back["significant"] and back["hi"] < 0
    assert back["lo"] == pytest.approx(-r["hi"]) and back["hi"] == pytest.approx(-r["lo"])


def test_paired_bootstrap_noise_is_not_significant():
    rng = np.random.default_rng(2)
    a = (rng.random(200) < 0.5).astype(float)
    b = a.copy()
    ones, zeros = np.flatnonzero(a == 1), np.flatnonzero(a == 0)
    b[ones[:2]] = 0                                                  # two users worse, two better: no difference
    b[zeros[:2]] = 1
    r = paired_bootstrap(a, b, seed=0)
    assert r["diff"] == 0.0
    assert r["lo"] < 0 < r["hi"] and not r["significant"]
    assert r["hi"] - r["lo"] < 0.05                                  # pairing: a tight interval


def test_paired_bootstrap_deterministic_by_seed():
    rng = np.random.default_rng(3)
    a, b = rng.random(40), rng.random(40)
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)


@pytest.mark.parametrize("a,b", [
    (np.zeros(5), np.zeros(6)),
    (np.zeros((3, 2)), np.zeros((3, 2))),
    (np.zeros(0), np.zeros(0)),
])
def test_paired_bootstrap_bad_shapes(a, b):
    with pytest.raises(ValueError):
        paired_bootstrap(a, b)


def test_wilson_interval_on_hand_computed_cases():
    # 5 of 10: centre 0.5, half-width z / (1 + z^2/n) * sqrt(0.025 + z^2/400) = 0.26341
    assert wilson_interval(0.5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    # every case valid: the upper end is 1 and the lower end n / (n + z^2), not a zero-width interval
    assert wilson_interval(1.0, 16) == pytest.approx((16 / (16 + 1.96 ** 2), 1.0))
    assert wilson_interval(0.0, 5) == pytest.approx((0.0, 1.96 ** 2 / (5 + 1.96 ** 2)))
    lo, hi = wilson_interval(0.99, 1741)              # the 99% bar on the test users: about half a point each way
    assert 0.984 < lo < 0.985 and 0.993 < hi < 0.994
    for bad in ((0.5, 0), (1.5, 10), (-0.1, 10)):
        with pytest.raises(ValueError, match="wilson_interval needs"):
            wilson_interval(*bad)
