"""The retriever's top-k against a brute-force sort, ties included."""
import numpy as np

from diffgr2_lite.data.retriever import TransitionRetriever


def brute_top_k(scores, k):
    return [i for _, i in sorted((-s, i) for i, s in enumerate(scores))][:k]


def test_top_k_equals_a_full_sort_with_ties_by_item_number(monkeypatch):
    rng = np.random.default_rng(0)
    r = TransitionRetriever(40).fit([[0, 1, 2]])
    for trial in range(200):
        s = rng.integers(0, 4, size=40).astype(float)        # many ties at every score
        monkeypatch.setattr(r, "scores", lambda history, s=s: s)
        for k in (1, 5, 10):
            assert r.top_k([0], k) == brute_top_k(s, k)


def test_history_items_are_never_retrieved():
    seqs = [[0, 1, 2, 3], [1, 2, 4], [2, 3, 5], [0, 2, 5]]
    r = TransitionRetriever(6).fit(seqs)
    assert not set(r.top_k([0, 2], 4)) & {0, 2}
    assert r.top_k([1], 3)[0] == 2                           # 2 follows 1 in two sequences
