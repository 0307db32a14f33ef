"""The external constrained decoder: Hungarian algorithm against brute force, and assign_answer's guarantees."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffgr2_lite.diffusion.assignment import answer_starts, assign_answer, hungarian
from diffgr2_lite.diffusion.sampler import diffusion_decode
from diffgr2_lite.text import SPECIAL_TOKENS, decode_tokens, make_tokenizer, parse_ranking

K, L, B = 10, 2, 8
LABELS = [f"[{k}]" for k in range(1, K + 1)]
VOCAB = (SPECIAL_TOKENS + [f"<a_{i}>" for i in range(K)] + [f"<b_{i}>" for i in range(K)] + LABELS
         + [f"w{i}" for i in range(10)])
ITEM = L + 1                                                    # an answer item: its label, then its SID


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(VOCAB)


def ids(tok, words):
    return tok.convert_tokens_to_ids(words)


def candidates(seed: int):
    """K distinct 2-level SIDs (as token strings)."""
    rng = np.random.default_rng(seed)
    b = rng.permutation(K)
    return [(f"<a_{i}>", f"<b_{int(b[i])}>") for i in rng.permutation(K)]


def cand_ids(tok, rows):
    return torch.tensor([[ids(tok, list(s)) for s in cands] for cands in rows])


# ----------------------------------------------------------------------------------------------- Hungarian
@pytest.mark.parametrize("n", range(1, 8))
def test_hungarian_matches_brute_force(n):
    rng = np.random.default_rng(n)
    for _ in range(15):
        cost = rng.normal(size=(n, n)) * rng.choice([1.0, 100.0])
        a = hungarian(cost)
        assert sorted(a.tolist()) == list(range(n))
        best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert cost[np.arange(n), a].sum() == pytest.approx(best, abs=1e-9)


def test_hungarian_rectangular_ties_and_infinite():
    rng = np.random.default_rng(0)
    cost = rng.normal(size=(3, 5))
    a = hungarian(cost)
    best = min(sum(cost[i, p[i]] for i in range(3)) for p in itertools.permutations(range(5), 3))
    assert len(set(a.tolist())) == 3 and cost[np.arange(3), a].sum() == pytest.approx(best)
    assert sorted(hungarian(np.zeros((4, 4))).tolist()) == [0, 1, 2, 3]
    assert hungarian(np.array([[np.inf, 1.0], [-np.inf, 2.0]])).tolist() == [1, 0]


# ----------------------------------------------------------------------------------------------- assign_answer
def tiny_model(vocab_size, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=128,
                      attn_implementation="sdpa", eos_token_id=SPECIAL_TOKENS.index("<eos>"))
    return LlamaForCausalLM(cfg).eval()


def test_assigned_answers_always_parse_on_a_random_model(tok):
    model = tiny_model(len(VOCAB))
    n, P = 6, 9
    prompt = torch.randint(11, len(VOCAB), (n, P), generator=torch.Generator().manual_seed(0))
    res = diffusion_decode(model, prompt, 4, B, tok.mask_token_id, tok.eos_token_id, tau=0.5, temperature=1.0,
                           generator=torch.Generator().manual_seed(1))
    rows = [candidates(i) for i in range(n)]
    before = [parse_ranking(decode_tokens(tok, r), c).valid for r, c in zip(res.tokens.tolist(), rows)]
    out = assign_answer(model, prompt, res.tokens, cand_ids(tok, rows), B, tok.mask_token_id,
                        tok.convert_tokens_to_ids("<answer>"), ids(tok, LABELS))
    assert out.shape[1] % B == 0 and out.shape[1] >= res.tokens.shape[1]
    assert not any(before)
    for r, c in zip(out.tolist(), rows):
        parsed = parse_ranking(decode_tokens(tok, r), c)
        assert parsed.valid, parsed.notes
        assert sorted(parsed.ranking) == list(range(K))


def test_answer_span_rules(tok):
    """<answer> present / only </think> / only an early <eos> / nothing: where the answer goes, and that it parses."""
    model = tiny_model(len(VOCAB))
    C = 40
    w = ["w1", "w2", "w3"]
    rows_words = [
        ["<think>", *w, "</think>", "<answer>", "<a_1>", "<b_1>", "<eos>"],   # answer at 5
        ["<think>", *w, "</think>", "w4", "w5", "<eos>"],                     # after </think>: 5
        [*w, "<eos>"],                                                        # at the end: 3
        ["w1"] * C,                                                           # nothing: last blocks, 40 - 40 = 0
        ["w1"] * 30 + ["<answer>"] + ["w2"] * 9,                              # late <answer> at 30: extend to 64
    ]
    tokens = torch.tensor([ids(tok, (r + ["<eos>"] * C)[:C]) for r in rows_words])
    eos = tok.eos_token_id
    starts = answer_starts(tokens, B, tok.convert_tokens_to_ids("<answer>"), tok.convert_tokens_to_ids("</think>"),
                           eos, 1 + K * ITEM + 2)
    assert starts.tolist() == [5, 5, 3, 0, 30]
    rows = [candidates(10 + i) for i in range(len(rows_words))]
    prompt = torch.randint(11, len(VOCAB), (len(rows_words), 5), generator=torch.Generator().manual_seed(0))
    out, info = assign_answer(model, prompt, tokens, cand_ids(tok, rows), B, tok.mask_token_id,
                              tok.convert_tokens_to_ids("<answer>"), ids(tok, LABELS), return_info=True)
    assert out.shape[1] == 64 and torch.equal(info["starts"], starts)
    for i, (r, c) in enumerate(zip(out.tolist(), rows)):
        words = decode_tokens(tok, r)
        a = int(starts[i])
        assert words[:a] == decode_tokens(tok, tokens[i, :a].tolist())        # the reasoning is untouched
        assert words[a] == "<answer>" and words[a + 1 + K * ITEM] == "</answer>" and words[a + 2 + K * ITEM] == "<eos>"
        assert set(words[a + 3 + K * ITEM:]) <= {"<eos>"}
        parsed = parse_ranking(words, c)
        assert parsed.valid and not parsed.notes                              # every label names its own SID


class PositionTableModel(torch.nn.Module):
    """A fake LM whose logits at full position t are ``table[t]``, whatever the input (hidden = one-hot position)."""

    def __init__(self, table: torch.Tensor, eos_id: int):
        super().__init__()
        T, V = table.shape
        self.lm_head = torch.nn.Linear(T, V, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(table.T)
        self.config = SimpleNamespace(eos_token_id=eos_id)
        self.T = T

    def model(self, input_ids, attention_mask=None, position_ids=None, **kw):
        n, t = input_ids.shape
        return SimpleNamespace(last_hidden_state=torch.eye(self.T)[:t][None].expand(n, t, self.T))


def test_recovers_a_preferred_permutation_that_greedy_slots_would_break(tok):
    """Logits prefer candidate perm[s] in slot s, but every slot s >= 1 prefers candidate perm[0] even more than its
    own: per-slot argmax duplicates perm[0]; the maximum-weight assignment recovers perm exactly."""
    P, C, a = 4, 40, 3
    rows = [candidates(7)]
    cid = cand_ids(tok, rows)[0]                                          # [K, L]
    perm = np.random.default_rng(3).permutation(K)
    table = torch.zeros(P + C, len(VOCAB))
    items = torch.cat([torch.tensor(ids(tok, LABELS))[:, None], cid], 1)  # [K, L+1]: label, then codes
    for s in range(K):
        for l in range(ITEM):
            t = P + a + s * ITEM + l                                      # predicts completion position a+1+s*ITEM+l
            table[t, items[perm[s], l]] = 4.0 if s == 0 else 2.5
            if s >= 1:
                table[t, items[perm[0], l]] = 3.0                         # the decoy every later slot likes
    model = PositionTableModel(table, tok.eos_token_id)
    tokens = torch.tensor([ids(tok, (["w1", "w2", "</think>", "<answer>"] + ["<a_0>"] * 40)[:C])])
    prompt = torch.zeros(1, P, dtype=torch.long)
    out, info = assign_answer(model, prompt, tokens, cid[None], B, tok.mask_token_id,
                              tok.convert_tokens_to_ids("<answer>"), ids(tok, LABELS), return_info=True)
    greedy = info["scores"][0].argmax(-1)
    assert len(set(greedy.tolist())) < K                                  # the naive per-slot choice is invalid
    assert info["assignment"][0].tolist() == perm.tolist()
    parsed = parse_ranking(decode_tokens(tok, out[0].tolist()), rows[0])
    assert parsed.valid and parsed.ranking == perm.tolist()


def test_scores_use_a_fully_masked_answer(tok):
    """Changing the decoded answer tokens cannot change the slot scores (the answer is masked before scoring)."""
    model = tiny_model(len(VOCAB), seed=1)
    rows = [candidates(1)]
    base = ["<think>", "w1", "</think>", "<answer>"]
    t1 = torch.tensor([ids(tok, (base + ["<a_1>", "<b_2>"] * 20)[:32])])
    t2 = torch.tensor([ids(tok, (base + ["<a_3>", "w5"] * 20)[:32])])
    prompt = torch.randint(11, len(VOCAB), (1, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(block_size=B, mask_id=tok.mask_token_id, answer_token_id=tok.convert_tokens_to_ids("<answer>"),
              label_ids=ids(tok, LABELS), return_info=True)
    _, i1 = assign_answer(model, prompt, t1, cand_ids(tok, rows), **kw)
    _, i2 = assign_answer(model, prompt, t2, cand_ids(tok, rows), **kw)
    torch.testing.assert_close(i1["scores"], i2["scores"])
