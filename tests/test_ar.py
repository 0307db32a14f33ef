"""The AR re-ranker: constrained decoding, completion-only loss masking, GR2's decoupled weights in batches."""
from __future__ import annotations

import os

# One BLAS thread: on a small shared CPU box OpenBLAS's spinning threads make numpy's eigh (semantic IDs) 20x
# slower. Set before numpy is first imported (the first test module collected wins; it is a default only).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import math
import random

import pytest
import torch
import torch.nn.functional as F

from diffgr2_lite.ar import AnswerConstraint, ar_decode, completion_logits, pick, sft_loss, weighted_ce
from diffgr2_lite.batches import iterate_batches, make_batch
from diffgr2_lite.text import (
    ANSWER, END_ANSWER, EOS, build_completion, build_vocabulary, decode_tokens, encode, make_tokenizer,
    parse_ranking, sid_tokens,
)

torch.set_num_threads(1)

LEVELS = (4, 4, 3)
WORDS = "step1 history items brands last pick next+ brand+ ; . : x1 x2 Toners Serums"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(build_vocabulary([WORDS], LEVELS))


def tiny_model(vocab_size: int, seed: int = 0, init: float = 0.3):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=init, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok.get_vocab()))


def random_candidates(rng: random.Random, n_rows: int):
    rows = []
    for _ in range(n_rows):
        codes = set()
        while len(codes) < 10:
            codes.add(tuple(rng.randrange(k) for k in LEVELS))
        codes = list(codes)
        rng.shuffle(codes)
        rows.append([sid_tokens(c) for c in codes])
    return rows


def cand_ids(tok, cands) -> torch.Tensor:
    return torch.tensor([[tok.convert_tokens_to_ids(list(s)) for s in row] for row in cands])


def constrained_random_decode(tok, cands, budget, seed, scale=3.0, bias=None):
    """ar_decode's loop with random logits in place of a model (the constraint is the only structure)."""
    g = torch.Generator().manual_seed(seed)
    V, eos = len(tok.get_vocab()), tok.eos_token_id
    con = AnswerConstraint(cand_ids(tok, cands), tok, budget)
    n = len(cands)
    done = torch.zeros(n, dtype=torch.bool)
    out = []
    for _ in range(budget):
        logits = torch.randn(n, V, generator=g) * scale
        if bias is not None:
            logits[:, bias] += 20.0
        nxt = pick(con.mask(logits), 0.0)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        out.append(nxt)
        con.update(nxt)
        done |= nxt == eos
    return torch.stack(out, 1)


# ----------------------------------------------------------------------------------------------- constraint
def test_constraint_answers_are_permutations_once_started(tok):
    """Property: whenever a row has written <answer>, what follows is a valid permutation of its candidates."""
    rng = random.Random(0)
    started = 0
    for seed in range(25):
        cands = random_candidates(rng, 8)
        out = constrained_random_decode(tok, cands, budget=rng.randrange(44, 80), seed=seed)
        for row, c in zip(out, cands):
            toks = decode_tokens(tok, row)
            if EOS in toks:
                toks = toks[:toks.index(EOS) + 1]
            if ANSWER in toks:
                started += 1
                p = parse_ranking(toks, c)
                assert p.valid, " ".join(toks)
                assert toks.count(ANSWER) == 1 and END_ANSWER in toks[-2:]
    assert started >= 50


def test_constraint_with_ar_decode_on_a_model(tok, model):
    rng = random.Random(1)
    cands = random_candidates(rng, 6)
    prompt = torch.randint(11, len(tok.get_vocab()), (6, 10), generator=torch.Generator().manual_seed(0))
    con = AnswerConstraint(cand_ids(tok, cands), tok, 50)
    out = ar_decode(model, prompt, 50, tok.eos_token_id, constraint=con)["tokens"]
    n_ans = 0
    for row, c in zip(out, cands):
        toks = decode_tokens(tok, row)
        if ANSWER in toks[:toks.index(EOS) + 1 if EOS in toks else None]:
            n_ans += 1
            assert parse_ranking(toks, c).valid, " ".join(toks)
    assert n_ans >= 3


def test_constraint_output_is_always_a_valid_permutation(tok):
    """The module docstring: in constrained mode the answer is *forced* to be a permutation of the candidates."""
    rng = random.Random(2)
    for seed in range(10):
        cands = random_candidates(rng, 8)
        out = constrained_random_decode(tok, cands, budget=70, seed=seed)
        for row, c in zip(out, cands):
            p = parse_ranking(decode_tokens(tok, row), c)
            assert p.valid and sorted(p.ranking) == list(range(10))


def test_constraint_forces_the_answer_when_the_budget_runs_short(tok):
    rng = random.Random(3)
    cands = random_candidates(rng, 4)
    word = tok.convert_tokens_to_ids("history")
    budget = 50
    out = constrained_random_decode(tok, cands, budget=budget, seed=0, bias=word)   # a model that never answers
    for row, c in zip(out, cands):
        toks = decode_tokens(tok, row)
        assert ANSWER in toks, " ".join(toks)
        assert parse_ranking(toks, c).valid
        a = toks.index(ANSWER)
        assert all(t == "history" for t in toks[:a])
        assert a >= budget - 10 * 4 - 3                                   # the free part lasted as long as it could


def test_forced_answer_ends_with_eos_within_the_budget(tok):
    rng = random.Random(3)
    cands = random_candidates(rng, 4)
    out = constrained_random_decode(tok, cands, budget=50, seed=0, bias=tok.convert_tokens_to_ids("history"))
    for row in out:
        assert EOS in decode_tokens(tok, row)


def test_constraint_labels_then_exact_codes(tok):
    """At a label slot only unwritten labels are allowed; after a label, exactly its candidate's codes in order."""
    rng = random.Random(4)
    cands = random_candidates(rng, 2)
    con = AnswerConstraint(cand_ids(tok, cands), tok, 100)
    V = len(tok.get_vocab())

    def allowed(i):
        m = con.mask(torch.zeros(2, V))
        return {decode_tokens(tok, [j])[0] for j in torch.nonzero(torch.isfinite(m[i])).flatten().tolist()}

    con.update(torch.full((2,), tok.convert_tokens_to_ids(ANSWER)))
    assert allowed(0) == allowed(1) == {f"[{k}]" for k in range(1, 11)}
    con.update(torch.tensor(tok.convert_tokens_to_ids(["[3]", "[10]"])))
    for level in range(3):
        for i, k in ((0, 2), (1, 9)):
            assert allowed(i) == {cands[i][k][level]}
        con.update(torch.tensor([tok.convert_tokens_to_ids(cands[0][2][level]),
                                 tok.convert_tokens_to_ids(cands[1][9][level])]))
    assert allowed(0) == {f"[{k}]" for k in range(1, 11)} - {"[3]"}
    assert allowed(1) == {f"[{k}]" for k in range(1, 10)}


# ----------------------------------------------------------------------------------------------- SFT loss
PROMPTS = [
    "<bos> <user> history : <a_0> <b_1> <c_0> Toners ; candidates : <a_1> <b_2> <c_1> ; <assistant>",
    "<bos> <user> history : <a_2> <b_0> <c_1> Serums ; candidates : <a_0> <b_0> <c_0> ; <assistant>",
]
COMPLETIONS = [
    "<think> step1 history x1 ; last . </think> <answer> <a_1> <b_2> <c_1> <a_0> <b_0> <c_0> </answer> <eos>",
    "<think> brands x2 . </think> <answer> <a_0> <b_0> <c_0> </answer> <eos>",
]


def rows_of(tok, completions=COMPLETIONS, prompts=PROMPTS):
    return [{"prompt_ids": p, "completion_ids": c} for p, c in zip(encode(tok, prompts), encode(tok, completions))]


def test_sft_loss_equals_hf_loss_on_completion_labels(tok, model):
    """With lambda_r = lambda_o = 1, the loss is the mean next-token CE over completion tokens up to the first <eos>:
    exactly the Hugging Face causal-LM loss with the prompt and the padding labelled -100."""
    batch = make_batch(rows_of(tok), tok, 1.0, 1.0)
    ids = torch.cat([batch.prompt, batch.completion], 1)
    labels = ids.clone()
    labels[:, :batch.prompt.shape[1]] = -100
    labels[:, batch.prompt.shape[1]:][batch.weight == 0] = -100
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels).loss
        got = sft_loss(model, batch)
    assert torch.allclose(got, ref, atol=1e-5), (got, ref)


def test_sft_loss_weighted_reference(tok, model):
    batch = make_batch(rows_of(tok), tok, 0.3, 1.7)
    P = batch.prompt.shape[1]
    with torch.no_grad():
        logits = model(input_ids=torch.cat([batch.prompt, batch.completion], 1)).logits.float()
        num = den = 0.0
        for i in range(len(batch)):
            for j in range(batch.completion.shape[1]):
                w = float(batch.weight[i, j])
                ce = F.cross_entropy(logits[i, P + j - 1][None], batch.completion[i, j][None])
                num, den = num + w * float(ce), den + w
        assert float(sft_loss(model, batch)) == pytest.approx(num / den, rel=1e-5)


def test_sft_loss_ignores_what_follows_the_first_eos_but_not_the_answer(tok, model):
    base_rows = rows_of(tok)
    batch = make_batch(base_rows, tok, 0.5, 1.0)
    with torch.no_grad():
        base = sft_loss(model, batch)
        # tokens after the first <eos> (row 1 is padded with <eos>; write garbage there): no change
        noisy = batch.completion.clone()
        L1 = int(batch.length[1])
        noisy[1, L1:] = torch.randint(11, len(tok.get_vocab()), (noisy.shape[1] - L1,),
                                      generator=torch.Generator().manual_seed(0))
        assert noisy.shape[1] > L1
        b2 = type(batch)(batch.prompt, noisy, batch.weight, batch.is_answer, batch.length)
        assert torch.equal(sft_loss(model, b2), base)
        # an answer token changed: the loss changes
        changed = batch.completion.clone()
        j = int(torch.nonzero(batch.is_answer[0]).flatten()[3])
        changed[0, j] = tok.convert_tokens_to_ids("<a_3>") if changed[0, j] != tok.convert_tokens_to_ids("<a_3>") \
            else tok.convert_tokens_to_ids("<a_2>")
        b3 = type(batch)(batch.prompt, changed, batch.weight, batch.is_answer, batch.length)
        assert abs(float(sft_loss(model, b3)) - float(base)) > 1e-4
        # a reasoning token changed: the loss changes too
        changed = batch.completion.clone()
        changed[0, 2] = tok.convert_tokens_to_ids("Serums")
        b4 = type(batch)(batch.prompt, changed, batch.weight, batch.is_answer, batch.length)
        assert abs(float(sft_loss(model, b4)) - float(base)) > 1e-4


def test_completion_logits_apply_the_token_shift(tok, model):
    """Position P-1+j of the plain causal forward predicts completion token j; only those rows reach the head."""
    batch = make_batch(rows_of(tok), tok, 1.0, 1.0)
    P = batch.prompt.shape[1]
    ids = torch.cat([batch.prompt, batch.completion], 1)
    with torch.no_grad():
        logits = completion_logits(model, batch.prompt, batch.completion)
        full = model(input_ids=ids).logits
    assert logits.shape[1] == batch.completion.shape[1]
    assert torch.allclose(logits, full[:, P - 1:P - 1 + batch.completion.shape[1]], atol=1e-5)


def test_weighted_ce_hand_case():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)           # p(target 2) = 3/6
    targets = torch.tensor([[2, 1, 0]])
    weight = torch.tensor([[2.0, 1.0, 0.0]])
    ce0 = -math.log(3 / 6)
    ce1 = -math.log(1 / 4)                   # uniform over 4
    assert float(weighted_ce(logits, targets, weight)) == pytest.approx((2 * ce0 + ce1) / 3)


# ----------------------------------------------------------------------------------------------- batches
def test_make_batch_weights(tok):
    completions = [
        "<think> step1 x1 . </think> <answer> <a_1> <b_2> <c_1> </answer> <eos>",
        "<answer> <a_0> <b_0> <c_0> </answer> <eos> <eos>",
        "<think> step1 </think> <answer> <a_2> <b_0> <c_0> </answer> <eos> step1 x2",   # junk after the end
    ]
    rows = rows_of(tok, completions, PROMPTS + PROMPTS[:1])
    b = make_batch(rows, tok, lambda_r=0.25, lambda_o=2.0, multiple_of=4)
    eos = tok.eos_token_id
    assert b.completion.shape[1] == 12                    # the longest completion (11 tokens), rounded up to 4
    for i, text in enumerate(completions):
        words = text.split()
        end = words.index(EOS) + 1
        start = words.index(ANSWER)
        expected = [0.25] * start + [2.0] * (end - start) + [0.0] * (b.completion.shape[1] - end)
        assert b.weight[i].tolist() == pytest.approx(expected)
        assert b.is_answer[i].tolist() == [start <= j < end for j in range(b.completion.shape[1])]
        assert int(b.length[i]) == end
        assert b.completion[i, :len(words)].tolist() == encode(tok, [text])[0]
        assert (b.completion[i, len(words):] == eos).all()
    assert torch.equal(b.prompt, torch.tensor([r["prompt_ids"] for r in rows]))


def test_make_batch_without_answer_or_eos(tok):
    rows = rows_of(tok, ["<think> step1 x1 . </think>"], PROMPTS[:1])
    b = make_batch(rows, tok, lambda_r=0.5, lambda_o=1.0)
    assert b.weight[0].tolist() == [0.5] * 5 and not b.is_answer.any() and int(b.length[0]) == 5


def test_make_batch_needs_equal_prompt_lengths(tok):
    rows = rows_of(tok, COMPLETIONS, [PROMPTS[0], PROMPTS[1] + " ;"])
    with pytest.raises(ValueError):
        make_batch(rows, tok)


def test_decision_weight_scales_only_the_pick(tok):
    """A reading example's random pick carries no loss; everything else keeps its GR2 weight."""
    prompt = encode(tok, PROMPTS[:1])[0]
    c = encode(tok, ["<think> step1 x1 pick [2] . </think> <answer> [2] <a_1> <b_2> <c_1> </answer> <eos>"])[0]
    d = encode(tok, ["<answer> [2] <a_1> <b_2> <c_1> </answer> <eos>"])[0]
    rows = [{"prompt_ids": prompt, "completion_ids": c, "decision_weight": w} for w in (1.0, 0.0)]
    rows += [{"prompt_ids": prompt, "completion_ids": d, "decision_weight": 0.0}]
    b = make_batch(rows, tok, lambda_r=0.5, lambda_o=1.0)
    assert b.weight[0, :7].tolist() == [0.5] * 7 and b.weight[0, 7:].tolist() == [1.0] * 7
    assert b.weight[1, :7].tolist() == [0.5] * 4 + [0.0] + [0.5] * 2              # "[2]" after pick: no loss
    assert b.weight[2, :7].tolist() == [1.0, 0.0] + [1.0] * 5                      # the direct answer's first label


def test_make_batch_min_len(tok):
    b = make_batch(rows_of(tok), tok, multiple_of=8, min_len=30)
    assert b.completion.shape[1] == 32


def test_iterate_batches_covers_every_row_once(tok):
    rows = []
    for k in range(23):
        c = build_completion("step1 " + " ".join(["x1"] * (k % 5)), [sid_tokens((k % 4, 0, 0))], [0])
        rows.append({"prompt_ids": encode(tok, [PROMPTS[0]])[0], "completion_ids": encode(tok, [c])[0]})
    for shuffle in (False, True):
        seen = []
        for b in iterate_batches(rows, 5, shuffle=shuffle, seed=1, tokenizer=tok):
            assert len(b) <= 5
            for i in range(len(b)):
                seen.append(tuple(b.completion[i, :int(b.length[i])].tolist()))
        assert sorted(seen) == sorted(tuple(r["completion_ids"]) for r in rows)


def test_kv_cached_decoding_equals_full_recompute():
    """ar_decode (one forward per token over a KV cache) == greedy decoding that recomputes the whole sequence."""
    from tiny import EOS, random_prompt, tiny_model

    model = tiny_model(seed=3)
    prompt = random_prompt(3, seed=4, length=9)
    cached = ar_decode(model, prompt, max_new=16, eos_id=EOS)["tokens"]
    seq = prompt
    with torch.no_grad():
        for _ in range(cached.shape[1]):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    ref = seq[:, prompt.shape[1]:]
    ended = torch.cumsum(ref == EOS, 1) > 0                        # after a row's <eos> the decoder writes <eos>
    first_end = ended & (torch.cumsum(ended.long(), 1) == 1)
    keep = ~ended | first_end
    assert torch.equal(cached[keep], ref[keep])
    assert bool((cached[ended] == EOS).all())
