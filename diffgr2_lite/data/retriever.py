"""The upstream retriever: a small sequential item-to-item model that pre-ranks 10 candidates.

Score of item j for a history h_1..h_t::

    s(j) = sum_{k=1..m} decay^(k-1) * T[h_{t-k+1}, j]  +  eps * pop(j)

where T[a, b] counts how often b followed a within ``window`` steps in the training sequences (normalised per row).
The top 10 by score, in score order, is the "pre-rank" the re-ranker must beat; its own Recall@1/NDCG@3 on the users
whose target is in the list is the floor of every results table.

**Memorisation guard.** A retriever fitted on the very sequences it is asked about has seen the training targets
follow their histories, so its lists would be unrealistically good there. Training examples therefore get
*cross-fitted* candidates: users are split into folds, and a user's training examples are retrieved by a retriever
fitted on the other folds only. Validation and test targets are never in any fitted sequence, so evaluation uses one
retriever fitted on every user's training part.
"""
from __future__ import annotations

import numpy as np


class TransitionRetriever:
    def __init__(self, n_items: int, window: int = 3, history_items: int = 3, decay: float = 0.6, eps: float = 1e-4):
        self.n_items, self.window, self.history_items, self.decay, self.eps = n_items, window, history_items, decay, eps

    def fit(self, sequences: list[list[int]]) -> "TransitionRetriever":
        src, dst, w = [], [], []
        for seq in sequences:
            for i, a in enumerate(seq):
                for gap, b in enumerate(seq[i + 1:i + 1 + self.window]):
                    src.append(a)
                    dst.append(b)
                    w.append(1.0 / (gap + 1))
        n = self.n_items
        src, dst, w = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64), np.asarray(w)
        key = src * n + dst
        order = np.argsort(key, kind="stable")
        key, w = key[order], w[order]
        uniq, start = np.unique(key, return_index=True)
        weights = np.add.reduceat(w, start) if len(w) else np.zeros(0)
        rows, cols = uniq // n, uniq % n
        row_sum = np.bincount(rows, weights=weights, minlength=n)
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
        self.cols = cols
        self.vals = weights / np.maximum(row_sum[rows], 1e-9)
        pop = np.bincount(np.concatenate([np.asarray(s) for s in sequences]) if sequences else np.zeros(0, int),
                          minlength=n).astype(float)
        self.popularity = pop / max(pop.sum(), 1.0)
        return self

    def scores(self, history: list[int]) -> np.ndarray:
        s = self.eps * self.popularity.copy()
        for k, item in enumerate(reversed(history[-self.history_items:])):
            lo, hi = self.indptr[item], self.indptr[item + 1]
            s[self.cols[lo:hi]] += (self.decay ** k) * self.vals[lo:hi]
        s[history] = -np.inf                                  # never recommend what the user already bought
        return s

    def top_k(self, history: list[int], k: int = 10) -> list[int]:
        """The k best items by score, ties broken by item number, the same on every numpy version.

        (``argpartition`` alone picks *some* of the items tied at the k-th score, and which ones differs between
        numpy builds: the GPU image and this machine kept different users.)
        """
        s = self.scores(history)
        kth = -np.partition(-s, k - 1)[k - 1]                        # the k-th largest score
        above, tied = np.flatnonzero(s > kth), np.flatnonzero(s == kth)
        idx = np.concatenate([above, tied[: k - len(above)]])
        return [int(i) for i in idx[np.lexsort((idx, -s[idx]))]]


def user_folds(n_users: int, n_folds: int, seed: int) -> np.ndarray:
    """A fold number per user, balanced and shuffled deterministically."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(n_users) % n_folds)
