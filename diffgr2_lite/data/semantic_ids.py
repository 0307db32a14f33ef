"""Semantic IDs: residual k-means over item text features, with a last level that makes every ID unique.

An item's SID is a short tuple of codes, coarse to fine: items that share a prefix are alike in text (same category,
same brand), so the model can generalise across items it rarely saw. Level 1 clusters the feature vectors; level 2
clusters what level 1 left unexplained (the residual); the last level numbers the items that still collide
(GR2 assigns that level at random, and so do we, seeded).

Why a level-2 code names a *node* (a prefix), not a residual cluster shared by every level-1 cluster: the answer is
written by copying candidate SIDs from the prompt, and a from-scratch model copies "the token that followed the
previous occurrence of my last token" (an induction head). With residual codes, ``<b_20>`` follows many different
``<a_..>`` in one prompt (items of one brand land in a few residual clusters), so that rule is ambiguous. Numbering
each level-2 code per parent (as a tree of clusters does: ``<b_1234>`` = "cluster 20 inside cluster 116") makes the
previous token name one node. The price: more level-2 tokens (3,357 on Amazon Beauty). Measured honestly, the change
helped little on its own: the warm-up's teacher-forced copy accuracy stayed near 93% with either numbering (most of
what remains is a genuine choice between candidates that share a prefix), and AR validity after SFT moved within the
noise of single runs.

Why random and spread over the whole last codebook: if the last code were a rank (0 = the most popular item of its
group), ``<c_0>`` would be by far the most frequent target token, and a small model learns to write that prior instead
of copying the candidate's code from the prompt (we saw exactly that: valid rankings under 5%). Drawing each group's
last codes at random from the full codebook makes every last-level token about equally frequent, so copying is the
only way to get it right.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

from .catalog import Catalog

_WORD = re.compile(r"[a-z0-9]+")


def item_features(catalog: Catalog, dim: int = 1024, out_dim: int = 48, seed: int = 0) -> np.ndarray:
    """TF-IDF of hashed words (title, brand, every category level; brand and categories weighted up), reduced by SVD."""
    rows = []
    for title, brand, path in zip(catalog.titles, catalog.brands, catalog.categories):
        words = [(w, 1.0) for w in _WORD.findall(title.lower())]
        if brand:
            words.append(("brand=" + brand.lower(), 3.0))
        words += [(f"cat{depth}=" + c.lower(), 2.0 + depth) for depth, c in enumerate(path)]
        rows.append(words)
    x = np.zeros((len(rows), dim), dtype=np.float32)
    for i, words in enumerate(rows):
        for w, weight in words:
            x[i, zlib.crc32(w.encode()) % dim] += weight
    df = (x > 0).sum(0)
    x *= np.log((1 + len(rows)) / (1 + df)) + 1.0
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-8)
    x -= x.mean(0)
    # a thin SVD through the small Gram matrix of the features (dim x dim), deterministic
    _, vecs = np.linalg.eigh(x.T @ x)
    return (x @ vecs[:, ::-1][:, :out_dim]).astype(np.float32)


def kmeans(x: np.ndarray, k: int, iters: int = 25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding. Returns (centroids [k, d], assignment [n])."""
    rng = np.random.default_rng(seed)
    n = len(x)
    k = min(k, n)
    centers = [x[rng.integers(n)]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1 / n)
        centers.append(x[rng.choice(n, p=probs)])
        d2 = np.minimum(d2, ((x - centers[-1]) ** 2).sum(1))
    c = np.stack(centers)
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        dist = (x ** 2).sum(1, keepdims=True) - 2 * x @ c.T + (c ** 2).sum(1)
        new = dist.argmin(1)
        if (new == assign).all() and _ > 0:
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(0)
    return c, assign


@dataclass
class SemanticIds:
    codes: np.ndarray                  # [n_items, levels] int
    codebook_sizes: tuple[int, ...]    # tokens needed per level (the last level's size is the largest collision)

    @property
    def levels(self) -> int:
        return self.codes.shape[1]

    def uniqueness(self) -> dict:
        """Share of items whose SID is unique: before the last level (the semantic part) and overall."""
        n = len(self.codes)
        semantic = {tuple(r) for r in self.codes[:, :-1]}
        full = {tuple(r) for r in self.codes}
        return {"items": n, "semantic_prefixes": len(semantic),
                "unique_before_last_level": len(semantic) / n, "unique": len(full) / n,
                "last_level_codebook": int(self.codebook_sizes[-1])}


def build_semantic_ids(catalog: Catalog, levels: tuple[int, ...] = (32, 32), popularity: np.ndarray | None = None,
                       seed: int = 0) -> SemanticIds:
    """Residual k-means with the given codebook sizes, then a unique last level (random distinct codes per group)."""
    x = item_features(catalog, seed=seed)
    residual = x.copy()
    codes = []
    for level, k in enumerate(levels):
        centers, assign = kmeans(residual, k, seed=seed + level)
        codes.append(assign)
        residual = residual - centers[assign]
    codes = np.stack(codes, 1)
    sizes = [int(levels[0])] if len(levels) else []
    for level in range(1, len(levels)):           # number each deeper code per node of the tree (see module doc)
        _, codes[:, level] = np.unique(codes[:, :level + 1], axis=0, return_inverse=True)
        sizes.append(int(codes[:, level].max()) + 1)
    rng = np.random.default_rng(seed)
    groups: dict[tuple, list[int]] = {}
    for i, prefix in enumerate(map(tuple, codes)):
        groups.setdefault(prefix, []).append(i)
    last_size = 1 << max(0, (max(len(m) for m in groups.values()) - 1).bit_length())   # a power of two >= largest group
    last = np.zeros(len(x), dtype=np.int64)
    for members in groups.values():
        last[members] = rng.choice(last_size, size=len(members), replace=False)
    codes = np.concatenate([codes, last[:, None]], 1)
    return SemanticIds(codes=codes, codebook_sizes=(*sizes, int(last_size)))
