"""Block-causal masks against double loops written straight from their definitions."""
from __future__ import annotations

import os

# One BLAS thread: on a small shared CPU box OpenBLAS's spinning threads make numpy's eigh (semantic IDs) 20x
# slower. Set before numpy is first imported (the first test module collected wins; it is a default only).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import itertools

import pytest
import torch

from diffgr2_lite.diffusion.masks import block_causal_mask, block_ids, to_4d, view_mask, view_positions

SHAPES = [(1, 1, 1), (3, 4, 1), (3, 4, 2), (3, 4, 4), (5, 6, 3), (4, 8, 4), (2, 12, 4), (6, 9, 9), (1, 8, 2)]


def reference_block_causal(P: int, C: int, B: int) -> torch.Tensor:
    """Straight from the prose: prompt causal, completion blocks bidirectional inside / causal across, prompt blind."""
    L = P + C
    m = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            if q < P:                                   # prompt query: plain causal over the prompt, never completion
                m[q, k] = k < P and k <= q
            elif k < P:                                 # completion query sees the whole prompt
                m[q, k] = True
            else:                                       # completion query, completion key: block of k <= block of q
                m[q, k] = (k - P) // B <= (q - P) // B
    return m


def reference_view_mask(P: int, C: int, B: int, view_blocks: list[int]) -> torch.Tensor:
    """The four bullets of ``view_mask``'s docstring, one pair of positions at a time."""
    L = P + C
    V = len(view_blocks)
    clean = reference_block_causal(P, C, B)

    def block_of(k: int):                              # None for prompt positions
        return None if k < P else (k - P) // B

    T = L + V * B
    m = torch.zeros(T, T, dtype=torch.bool)
    for q in range(T):
        for k in range(T):
            q_clean, k_clean = q < L, k < L
            if q_clean and k_clean:
                m[q, k] = clean[q, k]
            elif q_clean and not k_clean:
                m[q, k] = False                         # clean never sees a view
            elif not q_clean and k_clean:
                vb = view_blocks[(q - L) // B]
                m[q, k] = block_of(k) is None or block_of(k) < vb   # the prompt and strictly earlier blocks
            else:
                m[q, k] = (q - L) // B == (k - L) // B  # only its own view, bidirectionally
    return m


@pytest.mark.parametrize("P,C,B", SHAPES)
def test_block_causal_mask_matches_definition(P, C, B):
    got = block_causal_mask(P, C, B)
    assert got.dtype == torch.bool and got.shape == (P + C, P + C)
    assert torch.equal(got, reference_block_causal(P, C, B))


@pytest.mark.parametrize("P,C", [(1, 1), (3, 5), (7, 8), (4, 0)])
def test_block_size_one_is_the_plain_causal_mask(P, C):
    L = P + C
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    assert torch.equal(block_causal_mask(P, C, 1), causal)


@pytest.mark.parametrize("P,C,B", [(3, 8, 4), (2, 6, 3)])
def test_block_causal_mask_is_not_causal_inside_a_block(P, C, B):
    # sharpness: the first completion position sees the last one of its block (a plain causal mask would not)
    m = block_causal_mask(P, C, B)
    assert bool(m[P, P + B - 1])
    assert not bool(m[P + B - 1, P + B])               # but not the next block
    assert not m[:P, P:].any()                         # and the prompt sees no completion


@pytest.mark.parametrize("P,C,B", [(3, 8, 4), (5, 6, 3), (2, 12, 2)])
def test_block_ids(P, C, B):
    ids = block_ids(P, C, B).tolist()
    assert ids[:P] == list(range(P))
    assert ids[P:] == [P + i // B for i in range(C)]


CASES_VIEW = [
    (3, 8, 4, [0, 1]),
    (3, 8, 4, [1, 0, 1, 0]),            # a complementary pair layout: every block twice
    (2, 6, 2, [2, 0, 1]),
    (4, 9, 3, [0, 0, 2]),
    (1, 4, 1, [0, 1, 2, 3]),
    (5, 12, 4, [2]),
]


@pytest.mark.parametrize("P,C,B,vb", CASES_VIEW)
def test_view_mask_matches_definition(P, C, B, vb):
    got = view_mask(P, C, B, torch.tensor(vb))
    T = P + C + len(vb) * B
    assert got.dtype == torch.bool and got.shape == (T, T)
    assert torch.equal(got, reference_view_mask(P, C, B, vb))


def test_view_mask_clean_part_is_block_causal_and_view_of_block_zero_sees_only_prompt():
    P, C, B = 3, 8, 4
    m = view_mask(P, C, B, torch.tensor([0, 1]))
    L = P + C
    assert torch.equal(m[:L, :L], block_causal_mask(P, C, B))
    # view of block 0: the prompt and nothing else of the clean stream
    assert m[L:L + B, :P].all() and not m[L:L + B, P:L].any()
    # view of block 1: prompt + clean block 0, not clean block 1 itself (that is the answer it must predict)
    assert m[L + B:L + 2 * B, :P + B].all() and not m[L + B:L + 2 * B, P + B:L].any()


@pytest.mark.parametrize("P,C,B,vb", CASES_VIEW)
def test_view_positions(P, C, B, vb):
    got = view_positions(P, C, B, torch.tensor(vb)).tolist()
    expected = list(range(P + C))
    for b in vb:
        expected += [P + b * B + j for j in range(B)]
    assert got == expected


def test_to_4d():
    m = block_causal_mask(2, 4, 2)
    m4 = to_4d(m, 3)
    assert m4.shape == (3, 1, 6, 6)
    for i in range(3):
        assert torch.equal(m4[i, 0], m)


def test_every_query_sees_itself():
    # a row with no visible key would make sdpa produce NaNs; every layout must let each query see itself
    for (P, C, B), vb in itertools.product([(3, 8, 4), (2, 6, 3)], [[0], [1, 0]]):
        m = view_mask(P, C, B, torch.tensor(vb))
        assert bool(torch.diagonal(m).all())
