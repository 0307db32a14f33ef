"""A programmatic teacher that explains a ranking in words, and rejection sampling of its traces.

GR2 distils reasoning from a 32B LLM. We have no such model, so the teacher is a small program. It speaks only of
evidence **a reader can verify in the prompt**: the brands and categories of the shown history and its last item,
and which categories usually follow the last one (complements: Cleansers -> Toners, estimated on training
sequences and named in the trace before they are used).

Per candidate it writes tags, and scores each candidate with a small **points table**::

    points(c) = sum over tags t of c: w_t   +   w_first * [c is the retriever's first]

    tags: =brand  same brand as the last item       brand+  a brand seen earlier in the shown history
          =cat    same category as the last item    cat+    a category seen earlier
          next+   a category step 2 names as likely next

The integer weights are fitted by exhaustive search for the best training Recall@1 (ties go to the retriever's
order). A trace is three steps, as GR2's teacher writes them: the pattern in the history, the category/complement
identification, the candidate selection. Selection **checks every candidate** in retriever order (the tags that
earn it points, and its total), then picks the top five by points, each by number and semantic ID; the other five
keep the retriever's order, so the answer is always "the picks, then the rest as retrieved".

Why this shape (Amazon Beauty, full profile, one H200, 2026-11-26;
``results/checks/2026-11-26-h200-trace-diagnostics.json``): an earlier teacher ranked by a score that also used
evidence the prompt does not show (co-purchase statistics, popularity) and sampled at temperature 1. A student
trained on its traces (which already checked every candidate), asked teacher-forced which candidate to pick first,
chose the retriever's first for 83-100% of validation users at every checkpoint of four SFT variants (learning
rate, weight decay, epochs, reasoning weight): it had learned the prior and none of the evidence, and
its free decoding fell below the retriever. When the decision is a fixed function of tags the model has just
written, each an exact function of the prompt, the student learns it (notebook 02's probe). On the same data the
points table over these tags reaches Recall@1 0.37 on validation users against the retriever's 0.35.

Sampling adds Gumbel noise to points / temperature (a Plackett-Luce draw); **rejection sampling** draws until the
top-1 is the held-out target (training data only) and drops examples where no draw succeeds, as GR2 does. A low
temperature keeps mostly traces whose pick follows the points, so the student sees one consistent rule rather than
the label noise of examples no visible evidence explains (those are the hardest examples, and they drop out).
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..text import word_token
from .catalog import Catalog

TAGS = ("=brand", "brand+", "=cat", "cat+", "next+")
POINT_KEYS = TAGS + ("first",)
# the search space of the points table: each tag worth 0-3 points, being retrieved first worth 0-4
POINT_GRID = tuple([range(4)] * len(TAGS) + [range(5)])


@dataclass
class TeacherStats:
    """What the teacher knows beyond the prompt: category transitions, estimated from training sequences only."""

    leaf_of: np.ndarray               # [n_items] leaf-category index
    leaf_names: list[str]
    transition: np.ndarray            # [n_leaf, n_leaf] P(next leaf | last leaf), smoothed

    @classmethod
    def fit(cls, catalog: Catalog, train_sequences: list[list[int]]) -> "TeacherStats":
        names = sorted({catalog.leaf(i) for i in range(len(catalog))})
        index = {c: k for k, c in enumerate(names)}
        leaf_of = np.array([index[catalog.leaf(i)] for i in range(len(catalog))])
        counts = np.ones((len(names), len(names))) * 0.1
        for seq in train_sequences:
            for a, b in zip(seq[:-1], seq[1:]):
                counts[leaf_of[a], leaf_of[b]] += 1
        return cls(leaf_of, names, counts / counts.sum(1, keepdims=True))


def best_first(scores: np.ndarray) -> list[int]:
    """Positions by descending score, ties in the retriever's order."""
    return [int(i) for i in np.lexsort((np.arange(len(scores)), -np.asarray(scores)))]


class Teacher:
    top = 5   # candidates the teacher picks; the rest keep the retriever's order

    def __init__(self, catalog: Catalog, stats: TeacherStats, points: np.ndarray | None = None):
        self.catalog, self.stats = catalog, stats
        self.points = np.asarray(points if points is not None else [3, 1, 1, 0, 0, 2], dtype=float)

    # ---------------------------------------------------------------- evidence and points
    def next_categories(self, last: int, k: int = 3) -> list[str]:
        """The k leaf categories that most often follow the last item's (the complements step 2 names)."""
        return [self.stats.leaf_names[j] for j in np.argsort(-self.stats.transition[self.stats.leaf_of[last]])[:k]]

    def evidence(self, history: list[int], candidates: list[int]) -> np.ndarray:
        """[n_candidates, len(POINT_KEYS)] 0/1: each candidate's tags, and whether it was retrieved first.

        ``history`` is what the prompt shows (the most recent items): every tag can be checked against it.
        """
        cat = self.catalog
        last = history[-1]
        brands = {cat.brands[h] for h in history if cat.brands[h]}
        leaves = {cat.leaf(h) for h in history}
        nxt = set(self.next_categories(last))
        ev = np.zeros((len(candidates), len(POINT_KEYS)))
        for pos, c in enumerate(candidates):
            brand, leaf = cat.brands[c], cat.leaf(c)
            same_brand = bool(brand) and brand == cat.brands[last]
            ev[pos] = [same_brand, bool(brand) and not same_brand and brand in brands,
                       leaf == cat.leaf(last), leaf != cat.leaf(last) and leaf in leaves, leaf in nxt, pos == 0]
        return ev

    def check(self, history: list[int], candidates: list[int]) -> list[list[str]]:
        """Per candidate, the tags that earn it points as the trace writes them (``first`` for the retriever's first,
        ``-`` for none). Tags worth nothing are left out: every word of the check then bears on the decision."""
        return self._tags(self.evidence(history, candidates))

    def _tags(self, evidence: np.ndarray) -> list[list[str]]:
        ev = evidence * (self.points > 0)
        return [[t for t, on in zip(POINT_KEYS, row) if on] or ["-"] for row in ev]

    def scores(self, history: list[int], candidates: list[int]) -> np.ndarray:
        return self.evidence(history, candidates) @ self.points

    def fit_points(self, examples) -> float:
        """Choose the points table with the best Recall@1 on ``examples`` ((history, candidates, target position)).

        Exhaustive over :data:`POINT_GRID` (5,120 tables), vectorised; ties between tables go to the first found.
        Returns the training Recall@1 of the chosen table.
        """
        ev = np.stack([self.evidence(h, c) for h, c, _ in examples])             # [E, N, K]
        target = np.array([t for _, _, t in examples])
        order_bonus = -1e-3 * np.arange(ev.shape[1])                               # ties: the retriever's order
        tables = np.array(list(itertools.product(*POINT_GRID)), dtype=float)       # [T, K]
        best, best_acc = tables[0], -1.0
        for lo in range(0, len(tables), 256):
            chunk = tables[lo:lo + 256]
            s = np.einsum("enk,tk->ten", ev, chunk) + order_bonus                  # [T, E, N]
            acc = (s.argmax(-1) == target).mean(-1)
            if acc.max() > best_acc:
                best, best_acc = chunk[int(acc.argmax())], float(acc.max())
        self.points = best
        return best_acc

    # ---------------------------------------------------------------- ranking and traces
    def rank(self, history: list[int], candidates: list[int], rng: np.random.Generator | None = None,
             temperature: float = 1.0) -> list[int]:
        """Candidate positions, best first. With ``rng``: a Plackett-Luce sample (Gumbel noise on points / T)."""
        return self._ranking(self.scores(history, candidates), rng, temperature)

    def _ranking(self, s: np.ndarray, rng: np.random.Generator | None, temperature: float) -> list[int]:
        if rng is not None:
            s = s / temperature + rng.gumbel(size=len(s))
        top = best_first(s)[: self.top]
        return top + [i for i in range(len(s)) if i not in top]     # the rest keep the retriever's order

    def rejection_sample(self, history, candidates, target_pos: int, rng: np.random.Generator, tries: int,
                         temperature: float = 1.0) -> tuple[list[int] | None, int]:
        """Draw rankings until the top-1 is the target. Returns (ranking or None, draws used)."""
        s = self.scores(history, candidates)                         # the points are scored once, drawn ``tries`` times
        for k in range(1, tries + 1):
            ranking = self._ranking(s, rng, temperature)
            if ranking[0] == target_pos:
                return ranking, k
        return None, tries

    def trace(self, history: list[int], candidates: list[int], ranking: list[int], sid_words,
              top: int | None = None) -> str:
        """The three-step explanation of ``ranking`` (candidate positions); ``history`` as the prompt shows it."""
        picks = []
        for pos in ranking[: top or self.top]:
            picks += ["pick", str(pos + 1), *sid_words(candidates[pos]), ";"]
        return " ".join([self.reading(history, candidates), *picks, "rest", "in", "retriever", "order", "."])

    def reading(self, history: list[int], candidates: list[int]) -> str:
        """The part of the trace that does not depend on the answer: steps 1-2 and the check of every candidate.

        A pure function of the prompt, so it can be taught on every training prompt, target known or not.
        """
        cat = self.catalog
        leaves = Counter(cat.leaf(h) for h in history)
        brands = Counter(cat.brands[h] for h in history if cat.brands[h])
        last = history[-1]
        step1 = ["step1", "history", ":", str(len(history)), "items", ";", "categories"]
        for name, n in leaves.most_common(3):
            step1 += [word_token(name), f"x{n}"]
        step1 += [";", "brands"]
        for name, n in brands.most_common(2) or [("none", 0)]:
            step1 += [word_token(name), f"x{n}"] if n else ["none"]
        step1 += [";", "last", word_token(cat.leaf(last)), word_token(cat.brands[last] or "no_brand"), "."]
        step2 = ["step2", "after", word_token(cat.leaf(last)), "comes",
                 *[word_token(n) for n in self.next_categories(last)], "."]
        step3 = ["step3", "check"]
        ev = self.evidence(history, candidates)
        points = ev @ self.points
        for pos, tags in enumerate(self._tags(ev)):
            step3 += [str(pos + 1), *tags, "=", str(int(points[pos])), ";"]
        return " ".join(step1 + step2 + step3)
