"""The copy warm-up's pieces: SID relabelling (a per-row bijection) and the answer-validity gate."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffgr2_lite.copy_warmup import answer_validity, relabel_sids
from diffgr2_lite.text import (PromptFormat, build_answer, build_vocabulary, encode, make_tokenizer, sid_token_ranges,
                               sid_tokens)

LEVELS = (6, 7, 3)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(build_vocabulary(["history candidates pick check ; . : <think> </think>"], LEVELS,
                                           n_labels=4))


def test_relabelling_is_a_bijection_per_row_and_level(tok):
    ranges = sid_token_ranges(tok, 3)
    g = torch.Generator().manual_seed(0)
    words = "history : <a_1> <b_2> <c_0> ; candidates : [1] <a_1> <b_3> <c_0> [2] <a_4> <b_2> <c_2> pick [2] ."
    completion = "<answer> [2] <a_4> <b_2> <c_2> [1] <a_1> <b_3> <c_0> </answer> <eos>"
    p, c = (torch.tensor(encode(tok, [s] * 64)) for s in (words, completion))
    rp, rc = relabel_sids(p, c, ranges, g, share=1.0)
    changed = 0
    for row in range(64):
        before = p[row].tolist() + c[row].tolist()
        after = rp[row].tolist() + rc[row].tolist()
        mapping = {}
        for b, a in zip(before, after):
            level = next((k for k, (f, n) in enumerate(ranges) if f <= b < f + n), None)
            if level is None:
                assert a == b                                   # labels, words, specials: untouched
                continue
            first, n = ranges[level]
            assert first <= a < first + n                       # a code stays at its level
            assert mapping.setdefault(b, a) == a                # the same code is renamed the same way everywhere
        assert len(set(mapping.values())) == len(mapping)       # distinct codes stay distinct
        changed += any(k != v for k, v in mapping.items())
    assert changed >= 60                                        # and it really renames
    # share 0: nothing changes
    same_p, same_c = relabel_sids(p, c, ranges, g, share=0.0)
    assert torch.equal(same_p, p) and torch.equal(same_c, c)


def _level_maps(ranges, before, after):
    """Per SID level, the code renaming one row went through ({old: new}); fails if a code was renamed two ways."""
    maps = [{} for _ in ranges]
    for b, a in zip(before, after):
        level = next((k for k, (f, n) in enumerate(ranges) if f <= b < f + n), None)
        if level is None:
            assert a == b
            continue
        assert ranges[level][0] <= a < sum(ranges[level])
        assert maps[level].setdefault(b, a) == a
    return maps


def test_colliding_relabelling_squeezes_prefixes_but_keeps_candidates_distinct():
    levels = (40, 40, 5)
    tok = make_tokenizer(build_vocabulary(["history candidates pick ; :"], levels, n_labels=4))
    ranges = sid_token_ranges(tok, 3)
    fmt = PromptFormat(history_len=1, n_candidates=4, title_words=0, sid_len=3)
    # four candidates with distinct prefixes; candidates 1 and 3 share their last code, so squeezing their prefixes
    # can make them identical: such rows must fall back to a bijection
    cands = [(1, 2, 0), (5, 6, 1), (9, 10, 0), (13, 14, 3)]
    sid = lambda c: " ".join(sid_tokens(c))
    prompt = " ".join(["<bos> <user> history :", sid((20, 21, 4)), "no_brand x ;", "candidates :"]
                      + [f"[{k + 1}] {sid(c)} no_brand x ;" for k, c in enumerate(cands)] + ["<assistant>"])
    words = prompt.split()
    assert len(words) == fmt.prompt_len
    for k, positions in enumerate(fmt.candidate_sid_positions):     # the positions name each candidate's codes
        assert [words[i] for i in positions] == list(sid_tokens(cands[k]))
    completion = "<answer> [2] " + sid(cands[1]) + " [1] " + sid(cands[0]) + " </answer> <eos>"
    p, c = (torch.tensor(encode(tok, [s] * 400)) for s in (prompt, completion))
    g = torch.Generator().manual_seed(0)
    rp, rc = relabel_sids(p, c, ranges, g, share=0.0, collide=1.0, candidate_positions=fmt.candidate_sid_positions)
    shared_prefix = fallback = 0
    for row in range(400):
        maps = _level_maps(ranges, p[row].tolist() + c[row].tolist(), rp[row].tolist() + rc[row].tolist())
        new = [tuple(rp[row, i].item() for i in pos) for pos in fmt.candidate_sid_positions]
        assert len(set(new)) == len(new)                          # the answer is still a permutation of 4 items
        prefixes = {n[:2] for n in new}
        shared_prefix += len(prefixes) < len(new)
        squeezed = all(len(set(m.values())) <= 3 for m in maps[:2])
        fallback += not squeezed
        if not squeezed:                                           # the fallback is a bijection at every level
            assert all(len(set(m.values())) == len(m) for m in maps)
        assert len(set(maps[2].values())) == len(maps[2])         # the last level always stays a bijection
    # 4 candidates on 3 x 3 squeezed prefixes: some two share one in 1 - (9*8*7*6)/9**4 = 54% of rows; the 1 in 9
    # where candidates 1 and 3 share theirs fall back, leaving 43% (with 10 candidates a shared prefix is certain)
    assert 0 < fallback < 80
    assert shared_prefix > 0.35 * 400
    with pytest.raises(ValueError, match="positions"):
        relabel_sids(p, c, ranges, g, collide=1.0)


class OracleLM(torch.nn.Module):
    """A stand-in LM that always predicts the next token of one of the given sequences (matched by prefix), so the
    gate's decoding, slicing and parsing can be checked against known answers. It keeps its own history of the rows
    and ignores the KV cache it is handed."""

    def __init__(self, sequences: list[list[int]], vocab: int, flip: set[int] = frozenset()):
        super().__init__()
        self.seqs, self.vocab, self.flip = sequences, vocab, flip
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, use_cache=None, logits_to_keep=None, **kw):
        ids = input_ids.tolist()
        if input_ids.shape[1] > 1:                              # the prefill: which sequence is each row?
            self.which = [next(s for s in self.seqs if s[:len(h)] == h) for h in ids]
            self.length = input_ids.shape[1]
        else:
            self.length += 1
        logits = torch.zeros(len(ids), 1, self.vocab)
        for r, seq in enumerate(self.which):
            t = min(self.length, len(seq) - 1)
            nxt = seq[t - 4] if (seq[0] in self.flip and t == len(seq) - 5) else seq[t]   # one wrong code
            logits[r, 0, nxt] = 1.0
        return SimpleNamespace(logits=logits)


def test_answer_validity_decodes_after_the_trace_and_parses(tok):
    fmt = PromptFormat(history_len=1, n_candidates=4, title_words=0, sid_len=3)
    cands = {k: sid_tokens((k % 6, k % 7, k % 3)) for k in range(8)}
    rows = []
    for r in range(4):
        items = list(range(r, r + 4))
        order = [2, 0, 1, 3]
        prompt = [tok.convert_tokens_to_ids("history") + r] + encode(tok, ["candidates : ;"])[0]
        completion = encode(tok, ["<think> check pick [3] . </think> " + build_answer([cands[i] for i in items], order)])[0]
        rows.append({"prompt_ids": prompt, "completion_ids": completion, "candidates": items,
                     "teacher_ranking": order if r != 3 else [0, 1, 2, 3]})
    ex = SimpleNamespace(tokenizer=tok, fmt=fmt, candidate_sids=lambda row: [cands[i] for i in row["candidates"]])
    seqs = [r["prompt_ids"] + r["completion_ids"] for r in rows]
    out = answer_validity(OracleLM(seqs, len(tok.get_vocab())), rows, ex, "cpu", batch_size=3)
    # every row is decoded to its answer; row 3's reference ranking differs from what its trace implies
    assert out == {"valid": 1.0, "follows": 0.75, "n": 4}
    broken = OracleLM(seqs, len(tok.get_vocab()), flip={seqs[0][0]})
    assert answer_validity(broken, rows, ex, "cpu")["valid"] == 0.75


def test_warmup_gate_on_a_tiny_model():
    """On the smoke data with a tiny model: a gate of 0 is met at the first check (the warm-up stops there); a gate
    above 1 is never met (it runs every step and says it did not pass). The answers it trains on are relabelled."""
    from diffgr2_lite import pipeline as pl
    from diffgr2_lite.config import get_profile
    from diffgr2_lite.copy_warmup import train_warmup
    from diffgr2_lite.data.examples import build_examples
    from diffgr2_lite.data.synthetic import generate_synthetic

    P = get_profile("smoke", synthetic_users=200)
    ex = build_examples(generate_synthetic(P.synthetic_users, P.synthetic_items, seed=0), P, progress=False)
    for s in ex.splits:
        from diffgr2_lite.batches import tokenize_split

        ex.splits[s] = tokenize_split(ex.splits[s], ex.tokenizer)
    rows, held = ex.training_rows(), ex.splits["valid"].select(range(8)).to_list()
    kw = dict(batch_size=8, lr=1e-3, check_every=3, device="cpu", compile=False)
    h = train_warmup(pl.new_model(P, ex), rows, ex, held, max_steps=9, gate=0.0, **kw)
    assert h["steps"] == 3 and h["passed"] and h["val_step"] == [3]
    h = train_warmup(pl.new_model(P, ex), rows, ex, held, max_steps=7, gate=1.01, **kw)
    assert h["steps"] == 7 and not h["passed"] and h["val_step"] == [3, 6, 7]
    assert set(h["final"]) == {"held_out", "train_prompts"} and h["final"]["held_out"]["n"] == 8
