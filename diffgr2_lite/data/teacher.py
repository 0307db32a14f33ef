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
identification, the candidate selection. Selection **checks every candidate** by its label, in retriever order, in
fixed-width columns (one per tag group that earns points, ``-`` where none holds) with its points, then **picks one**::

    step3 check [1] =brand =cat first 6 ; [2] brand+ - - 1 ; ... ; [10] - - - 0 ; pick [1] .

The answer is then fixed by the check: the pick first, the other nine **by points, ties in the retriever's order**.
Nothing in a trace is random except the pick, so everything after it can be learned exactly from what the prompt
shows. (An earlier teacher picked five candidates with Gumbel noise on integer points: in 95% of kept traces picks
2-5 broke ties at random, and the student could not learn an order that no evidence determines.) The whole trace has
a fixed width, so every answer starts at the same position of the completion.
With ``decision_block`` (the diffusion block size), ``-`` fill the gap before ``pick`` so that the decision is the
last token of a block (:meth:`Teacher.decision_fill` says why a parallel decoder needs this).

Why this shape (Amazon Beauty, full profile, one H200, 2026-11-26;
``results/checks/2026-11-26-h200-trace-diagnostics.json``): an earlier teacher ranked by a score that also used
evidence the prompt does not show (co-purchase statistics, popularity) and sampled at temperature 1. A student
trained on its traces (which already checked every candidate), asked teacher-forced which candidate to pick first,
chose the retriever's first for 83-100% of validation users at every checkpoint of four SFT variants (learning
rate, weight decay, epochs, reasoning weight): it had learned the prior and none of the evidence, and
its free decoding fell below the retriever. When the decision is a fixed function of tags the model has just
written, each an exact function of the prompt, the student learns it (notebook 02's probe). On the same data the
points table over these tags reaches Recall@1 0.37 on validation users against the retriever's 0.35.

The pick is drawn with Gumbel noise on points / temperature (a sample from their softmax); **rejection sampling**
draws until the pick is the held-out target (training data only) and drops examples where no draw succeeds, as GR2
does. A low temperature keeps mostly traces whose pick follows the points, so the student sees one consistent rule
rather than the label noise of examples no visible evidence explains (those are the hardest examples, and they drop
out).
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..text import label_token, word_token
from .catalog import Catalog

TAGS = ("=brand", "brand+", "=cat", "cat+", "next+")
POINT_KEYS = TAGS + ("first",)
# the check's columns: tags of one group never hold together (same brand as the last item, or a brand seen earlier)
TAG_SLOTS = (("=brand", "brand+"), ("=cat", "cat+"), ("next+",), ("first",))
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


def rank_tokens(ranking: list[int]) -> list[str]:
    """Each candidate's place in ``ranking`` (a permutation of the positions 0..n-1), in retriever order:
    ranking [1, 0, 2] -> ['#2', '#1', '#3']."""
    place = {c: k for k, c in enumerate(ranking)}
    return [f"#{place[c] + 1}" for c in range(len(ranking))]


def best_first(scores: np.ndarray) -> list[int]:
    """Positions by descending score, ties in the retriever's order."""
    return [int(i) for i in np.lexsort((np.arange(len(scores)), -np.asarray(scores)))]


class Teacher:
    """Evidence, points, the deterministic ranking that follows a pick, and the trace that explains it."""

    def __init__(self, catalog: Catalog, stats: TeacherStats, points: np.ndarray | None = None,
                 write_ranks: bool = True, decision_block: int | None = None):
        self.catalog, self.stats, self.write_ranks = catalog, stats, write_ranks
        self.decision_block = decision_block
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

    def scores(self, history: list[int], candidates: list[int]) -> np.ndarray:
        return self.evidence(history, candidates) @ self.points

    def fit_points(self, examples) -> float:
        """Choose the points table with the best Recall@1 on ``examples`` ((history, candidates, target position)).

        Exhaustive over :data:`POINT_GRID` (5,120 tables); ties between tables go to the first. Returns the training
        Recall@1 of the chosen table.

        Vectorised through patterns: a candidate's evidence is one of 2^K 0/1 patterns, so a table scores the 64
        patterns once and a candidate's score is a look-up. Scores are integers, so ``key = N * score + (N - 1 -
        position)`` orders candidates by score with ties to the retriever's order (as :meth:`ranking` does), and
        the table picks the target exactly when the target's key is its row's largest.
        """
        ev = np.stack([self.evidence(h, c) for h, c, _ in examples])                    # [E, N, K] 0/1
        if not np.isin(ev, (0, 1)).all():               # the points of POINT_GRID are whole numbers (ranges)
            raise ValueError("fit_points needs 0/1 evidence (its keys are integers)")
        ev = ev.astype(np.int64)
        target = np.array([t for _, _, t in examples])
        n_ex, n, k = ev.shape
        pattern = (ev @ (1 << np.arange(k))).T                                        # [N, E]: 0 .. 2^K - 1
        patterns = (np.arange(2 ** k)[:, None] >> np.arange(k)) & 1                    # [2^K, K]
        tables = np.array(list(itertools.product(*POINT_GRID)), dtype=np.int64)       # [T, K]
        keys_of = (n * (tables @ patterns.T)).astype(np.int32)                         # [T, 2^K]
        tie = (n - 1 - np.arange(n, dtype=np.int32))[:, None]                          # [N, 1]
        target_pattern = pattern[target, np.arange(n_ex)]
        hits = []
        for lo in range(0, len(tables), 128):
            chunk = keys_of[lo:lo + 128]                                               # [t, 2^K]
            best = (chunk[:, pattern] + tie).max(axis=1)                               # [t, E]
            hits.append((best == chunk[:, target_pattern] + tie[target, 0]).sum(-1))
        acc = np.concatenate(hits) / n_ex
        self.points = tables[int(acc.argmax())].astype(float)
        return float(acc.max())

    # ---------------------------------------------------------------- ranking and traces
    def ranking(self, points: np.ndarray, first: int) -> list[int]:
        """The full ranking once the first pick is made: ``first``, then the others by points, ties in the
        retriever's order. Deterministic: given the prompt (and the pick) there is exactly one answer to learn."""
        return [first] + [int(i) for i in best_first(points) if i != first]

    def first_pick(self, points: np.ndarray, rng: np.random.Generator | None = None, temperature: float = 1.0) -> int:
        """Greedy: the most points, ties to the retriever's order. With ``rng``: a Gumbel-max draw at ``temperature``
        (a sample from softmax(points / T))."""
        if rng is None:
            return best_first(points)[0]
        return int(np.argmax(points / temperature + rng.gumbel(size=len(points))))

    def rank(self, history: list[int], candidates: list[int], rng: np.random.Generator | None = None,
             temperature: float = 1.0) -> list[int]:
        """Candidate positions, best first: the first pick (greedy, or drawn with ``rng``), then the rest by points."""
        s = self.scores(history, candidates)
        return self.ranking(s, self.first_pick(s, rng, temperature))

    def rejection_sample(self, history, candidates, target_pos: int, rng: np.random.Generator, tries: int,
                         temperature: float = 1.0) -> tuple[list[int] | None, int]:
        """Draw first picks until one is the target. Returns (ranking or None, draws used)."""
        s = self.scores(history, candidates)                         # the points are scored once, drawn ``tries`` times
        for k in range(1, tries + 1):
            if self.first_pick(s, rng, temperature) == target_pos:
                return self.ranking(s, target_pos), k
        return None, tries

    def trace(self, history: list[int], candidates: list[int], ranking: list[int]) -> str:
        """The three-step explanation of ``ranking``: ending in its first pick and, with ``write_ranks``, every
        candidate's rank in it (the answer is written from the same ranking, so the two always agree).

        The ranks (``ranks #2 #1 #3 ...``: candidate ``[k]``'s place in the answer, in the check's order) split the
        answer's one hard step, "which candidate comes k-th", into two easy ones. A rank is a count: the pick is
        ``#1``, any other candidate is one more than the number of others ahead of it (more points, or as many and
        earlier in the retriever's order). The answer's k-th item is then the label whose rank is ``#k``, a lookup
        that needs no other slot of the answer, which is what a parallel decoder that fills slots in any order needs.
        """
        reading = self.reading(history, candidates)
        words = [reading, *["-"] * self.decision_fill(len(reading.split())), "pick", label_token(ranking[0])]
        if self.write_ranks:
            words += [";", "ranks", *rank_tokens(ranking)]
        return " ".join(words + ["."])

    def decision_fill(self, reading_len: int) -> int:
        """How many ``-`` go between the check and ``pick`` so that the decision (the label after ``pick``) is the
        last token of a diffusion block (``decision_block``; 0 without one).

        Why: a block-diffusion decoder commits a block's tokens in confidence order. The decision is the one
        uncertain token of the trace, and the ranks and the answer are fixed functions of it; in the same block they
        would be committed *before* it, from the model's guess of a decision it has not made yet. Ending a block on
        the decision makes everything after it a function of committed tokens. The completion starts with
        ``<think>``, so the decision's index is ``1 + reading_len + fill + 1``.
        """
        if not self.decision_block:
            return 0
        return -(reading_len + 3) % self.decision_block

    def slots(self) -> list[tuple[str, ...]]:
        """The check's columns: groups of mutually exclusive tags, kept when one of their tags earns points."""
        weight = dict(zip(POINT_KEYS, self.points))
        return [g for g in TAG_SLOTS if any(weight[t] > 0 for t in g)]

    def check(self, history: list[int], candidates: list[int]) -> list[list[str]]:
        """Per candidate, one word per column of :meth:`slots`: the tag that earns it points there, or ``-``."""
        return self._tags(self.evidence(history, candidates))

    def _tags(self, evidence: np.ndarray) -> list[list[str]]:
        on = evidence * (self.points > 0)
        col = {t: k for k, t in enumerate(POINT_KEYS)}
        slots = self.slots()
        return [[next((t for t in group if row[col[t]]), "-") for group in slots] for row in on]

    def reading(self, history: list[int], candidates: list[int]) -> str:
        """Steps 1-3 up to the pick: a pure function of the prompt, and of fixed width (every row's trace has the same
        length, so the answer always starts at the same position).

        step1 counts the history's top 3 categories and top 2 brands (``- -`` where there are fewer) and names the
        last item's category and brand; step2 names the 3 categories that usually follow it; step3 checks every
        candidate: its label, one column per scoring tag group, and its points.
        """
        cat = self.catalog
        leaves = Counter(cat.leaf(h) for h in history).most_common(3)
        brands = Counter(cat.brands[h] for h in history if cat.brands[h]).most_common(2)
        last = history[-1]
        step1 = ["step1", "history", str(len(history)), "items", ";", "categories"]
        for item in leaves + [None] * (3 - len(leaves)):
            step1 += [word_token(item[0]), f"x{item[1]}"] if item else ["-", "-"]
        step1 += [";", "brands"]
        for item in brands + [None] * (2 - len(brands)):
            step1 += [word_token(item[0]), f"x{item[1]}"] if item else ["-", "-"]
        step1 += [";", "last", word_token(cat.leaf(last)), word_token(cat.brands[last] or "no_brand"), "."]
        step2 = ["step2", "after", word_token(cat.leaf(last)), "comes",
                 *[word_token(n) for n in self.next_categories(last)], "."]
        step3 = ["step3", "check"]
        ev = self.evidence(history, candidates)
        points = ev @ self.points
        for pos, tags in enumerate(self._tags(ev)):
            step3 += [label_token(pos), *tags, str(int(points[pos])), ";"]
        return " ".join(step1 + step2 + step3)
