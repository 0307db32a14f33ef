"""The block-diffusion sampler on a tiny random Llama: equivalences (AR, cache, fusion), the commit rule, the mask,
trajectory replay, and agreement with the training-time view layout."""
from __future__ import annotations

import os

# One BLAS thread: on a small shared CPU box OpenBLAS's spinning threads make numpy's eigh (semantic IDs) 20x
# slower. Set before numpy is first imported (the first test module collected wins; it is a default only).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest
import torch

from diffgr2_lite.ar import ar_decode
from diffgr2_lite.diffusion.masks import block_causal_mask, to_4d
from diffgr2_lite.diffusion.objective import view_hidden
from diffgr2_lite.diffusion.sampler import commit_rule, diffusion_decode, rebuild_canvas

torch.set_num_threads(1)       # a 32-wide model is slower on several contending threads than on one

from tiny import BOS, EOS, MASK, PAD, VOCAB, tiny_model  # noqa: F401
from tiny import random_prompt as _random_prompt
P = 12


def random_prompt(n: int, seed: int) -> torch.Tensor:
    return _random_prompt(n, seed, P)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def prompt():
    return random_prompt(6, seed=1)


def decode(model, prompt, **kw):
    args = dict(max_blocks=6, block_size=4, mask_id=MASK, eos_id=EOS, tau=0.5)
    args.update(kw)
    return diffusion_decode(model, prompt, **args)


def finished_before(tokens: torch.Tensor, B: int) -> torch.Tensor:
    """[N, nb] bool: the row had written <eos> in an earlier block (so this block is pre-filled, not decoded)."""
    n, c = tokens.shape
    has_eos = (tokens.view(n, c // B, B) == EOS).any(-1)
    return torch.cat([torch.zeros(n, 1, dtype=torch.bool), has_eos.cumsum(1)[:, :-1] > 0], 1)


# ----------------------------------------------------------------------------------------------- (d) commit rule
# First in the file: a rule that can commit nothing makes every decode below loop forever (with -x this fails first).
def test_commit_rule_property():
    g = torch.Generator().manual_seed(0)
    for case in range(400):
        n = int(torch.randint(1, 6, (1,), generator=g))
        B = int(torch.randint(1, 9, (1,), generator=g))
        conf = torch.rand(n, B, generator=g)
        committed = torch.rand(n, B, generator=g) < float(torch.rand(1, generator=g))
        tau = float(torch.rand(1, generator=g)) * 1.2 - 0.1
        before = committed.clone()
        got = commit_rule(conf.clone(), committed, tau)
        assert torch.equal(committed, before), "commit_rule must not modify its inputs"
        assert got.dtype == torch.bool and got.shape == (n, B)
        for r in range(n):
            open_ = ~committed[r]
            assert not (got[r] & committed[r]).any(), "never recommit"
            if open_.any():
                assert got[r].sum() >= 1
                # reference: all open positions >= tau, plus the most confident open one
                expected = open_ & (conf[r] >= tau)
                masked = torch.where(open_, conf[r], torch.full_like(conf[r], -1.0))
                expected[int(masked.argmax())] = True
                assert torch.equal(got[r], expected), (case, r, conf[r], committed[r], tau, got[r])
            else:
                assert not got[r].any()


def test_commit_rule_hand_case():
    conf = torch.tensor([[0.1, 0.95, 0.3, 0.92],     # two above tau
                         [0.1, 0.20, 0.3, 0.05],     # none above tau: only the best (0.3)
                         [0.9, 0.99, 0.1, 0.20],     # best (0.99) already committed: next best open one (0.2)
                         [0.5, 0.50, 0.5, 0.50]])    # all committed
    committed = torch.tensor([[False, False, False, False],
                              [False, False, False, False],
                              [True, True, False, False],
                              [True, True, True, True]])
    got = commit_rule(conf, committed, 0.9)
    assert got.tolist() == [[False, True, False, True],
                            [False, False, True, False],
                            [False, False, False, True],
                            [False, False, False, False]]


def test_commit_rule_with_sub_blocks_matches_a_reference():
    """Sub-blocks: only the first chunk with an open position may commit; inside it, the usual rule."""
    g = torch.Generator().manual_seed(1)
    for case in range(300):
        n, S = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        B = S * int(torch.randint(1, 4, (1,), generator=g))
        conf = torch.rand(n, B, generator=g)
        committed = torch.rand(n, B, generator=g) < float(torch.rand(1, generator=g))
        tau = float(torch.rand(1, generator=g))
        got = commit_rule(conf, committed, tau, sub_block=S)
        for r in range(n):
            open_ = ~committed[r]
            if not open_.any():
                assert not got[r].any()
                continue
            chunk = int(torch.nonzero(open_)[0]) // S                      # the first chunk with an open position
            eligible = open_.clone()
            eligible[: chunk * S] = False
            eligible[(chunk + 1) * S:] = False
            expected = eligible & (conf[r] >= tau)
            expected[int(torch.where(eligible, conf[r], torch.full_like(conf[r], -1.0)).argmax())] = True
            assert torch.equal(got[r], expected), (case, r)


@pytest.mark.parametrize("B,S", [(8, 4), (8, 2), (6, 3)])
def test_sub_block_decoding_fills_chunks_left_to_right(model, prompt, B, S):
    res = decode(model, prompt, max_blocks=3, block_size=B, tau=0.3, sub_block=S)
    n, c = res.tokens.shape
    step = res.commit_step.view(n, c // B, B // S, S)
    decoded = ~finished_before(res.tokens, B)                              # blocks after a row's end are pre-filled
    # every position of chunk j is committed before any position of chunk j+1
    in_order = (step.amax(-1)[..., :-1] < step.amin(-1)[..., 1:]).all(-1)
    assert bool(in_order[decoded].all()) and decoded.sum() >= n
    # cached and uncached agree with sub-blocks too; a sub-block as large as the block changes nothing
    ref = decode(model, prompt, max_blocks=3, block_size=B, tau=0.3, sub_block=S, use_cache=False)
    assert torch.equal(res.tokens, ref.tokens) and torch.equal(res.commit_step, ref.commit_step)
    whole = decode(model, prompt, max_blocks=3, block_size=B, tau=0.3, sub_block=B)
    plain = decode(model, prompt, max_blocks=3, block_size=B, tau=0.3)
    assert torch.equal(whole.tokens, plain.tokens) and torch.equal(whole.commit_step, plain.commit_step)


# ----------------------------------------------------------------------------------------------- (a) B = 1 is AR
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_block_size_one_reproduces_ar_greedy(fused, seed):
    model = tiny_model(seed=seed)
    prompt = random_prompt(6, seed=10 + seed)
    ar = ar_decode(model, prompt, max_new=20, eos_id=EOS)["tokens"]
    dd = diffusion_decode(model, prompt, max_blocks=20, block_size=1, mask_id=MASK, eos_id=EOS, tau=0.9,
                          fused=fused)
    assert dd.tokens.shape == ar.shape
    assert torch.equal(dd.tokens, ar)


def test_block_size_one_reproduces_ar_when_rows_end(model):
    # make sure the comparison above is not vacuous: here some rows end (write <eos>) before others
    prompt = random_prompt(8, seed=3)
    ar = ar_decode(model, prompt, max_new=30, eos_id=EOS)["tokens"]
    ends = (ar == EOS).float().argmax(1)
    assert (ar == EOS).any(1).sum() >= 2 and len(set(ends.tolist())) >= 2, "fixture should have rows ending"
    dd = diffusion_decode(model, prompt, max_blocks=30, block_size=1, mask_id=MASK, eos_id=EOS, tau=1.0)
    assert torch.equal(dd.tokens, ar)


# ----------------------------------------------------------------------------------------------- (b) cache
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("B", [1, 2, 4, 5])
@pytest.mark.parametrize("tau", [1.0, 0.6, 0.2])
def test_cached_equals_uncached(model, prompt, fused, B, tau):
    kw = dict(max_blocks=16 // B, block_size=B, tau=tau, fused=fused)
    a = decode(model, prompt, use_cache=True, **kw)
    b = decode(model, prompt, use_cache=False, **kw)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.commit_step, b.commit_step)
    assert torch.equal(a.steps, b.steps)
    assert a.forwards == b.forwards


# ----------------------------------------------------------------------------------------------- (c) fusion
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("B,tau", [(2, 0.5), (4, 1.0), (4, 0.3), (3, 0.7), (6, 0.0)])
def test_fused_equals_unfused(model, prompt, use_cache, B, tau):
    kw = dict(max_blocks=16 // B, block_size=B, tau=tau, use_cache=use_cache)
    f = decode(model, prompt, fused=True, **kw)
    u = decode(model, prompt, fused=False, **kw)
    assert torch.equal(f.tokens, u.tokens)
    assert torch.equal(f.commit_step, u.commit_step)
    assert torch.equal(f.steps, u.steps)
    # a block decoded in k steps costs k forwards fused, k + 1 unfused (except the last block, never written)
    nb = f.steps.shape[1]
    loop_iters = int(f.steps.max(0).values.sum())
    assert f.forwards == loop_iters
    assert u.forwards == loop_iters + nb - 1


# ----------------------------------------------------------------------------------------------- (e) termination
@pytest.mark.parametrize("B,tau", [(1, 0.5), (2, 0.9), (4, 0.5), (4, 1.0), (5, 0.3), (8, 0.95)])
def test_steps_and_termination(model, B, tau):
    prompt = random_prompt(8, seed=3)
    max_blocks = 32 // B
    r = decode(model, prompt, max_blocks=max_blocks, block_size=B, tau=tau)
    n, c = r.tokens.shape
    nb = c // B
    assert c % B == 0 and nb <= max_blocks and r.steps.shape == (n, nb) and r.commit_step.shape == (n, c)
    fin = finished_before(r.tokens, B)
    active = ~fin
    assert ((r.steps >= 1) & (r.steps <= B))[active].all()
    assert (r.steps[fin] == 0).all()                           # an ended row's block is pre-filled, not decoded
    assert (r.tokens.view(n, nb, B)[fin] == EOS).all()
    cs = r.commit_step.view(n, nb, B)
    for i in range(n):
        for b in range(nb):
            if active[i, b]:
                # every step commits something: the steps used are exactly 0 .. steps-1
                assert sorted(set(cs[i, b].tolist())) == list(range(int(r.steps[i, b])))
    # stops right after the first block in which every row has ended, and not before
    ended = (r.tokens.view(n, nb, B) == EOS).any(-1).cumsum(1) > 0
    if nb < max_blocks:
        assert ended[:, -1].all()
    assert not ended[:, :-1].all(0).any()
    assert not (r.tokens == MASK).all(-1).any()


def test_tau_zero_one_step_per_block_and_tau_above_one_b_steps(model):
    prompt = random_prompt(8, seed=3)
    B = 4
    r0 = decode(model, prompt, max_blocks=8, block_size=B, tau=0.0)
    act = ~finished_before(r0.tokens, B)
    assert (r0.steps[act] == 1).all() and (r0.commit_step == 0).all()
    assert r0.forwards == r0.steps.shape[1]                    # fused: one forward per block
    r_neg = decode(model, prompt, max_blocks=8, block_size=B, tau=-1.0)
    assert torch.equal(r_neg.tokens, r0.tokens)
    r1 = decode(model, prompt, max_blocks=8, block_size=B, tau=1.01)   # nothing passes: one commit per step
    act1 = ~finished_before(r1.tokens, B)
    assert (r1.steps[act1] == B).all()


def test_temperature_sampling_is_reproducible_and_terminates(model, prompt):
    a = decode(model, prompt, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = decode(model, prompt, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.commit_step, b.commit_step)
    assert a.tokens.shape[1] <= 6 * 4


# ----------------------------------------------------------------------------------------------- (f) the mask
def test_custom_4d_mask_is_applied(model):
    B, nb = 4, 3
    C = B * nb
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, VOCAB, (2, P + C), generator=g)
    mask = to_4d(block_causal_mask(P, C, B), 2)

    def logits(x, m=mask):
        with torch.no_grad():
            return model(input_ids=x, attention_mask=m).logits

    base = logits(ids)
    # a token in the last block changes nothing before that block
    later = ids.clone()
    later[:, P + 2 * B + 1] = (later[:, P + 2 * B + 1] - 5 + 17) % (VOCAB - 5) + 5
    out = logits(later)
    assert torch.allclose(out[:, :P + 2 * B], base[:, :P + 2 * B], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, P + 2 * B:], base[:, P + 2 * B:], atol=1e-4)
    # a token inside block 1 (its last position) changes the other positions of block 1, before it too
    inside = ids.clone()
    j = P + B + B - 1
    inside[:, j] = (inside[:, j] - 5 + 17) % (VOCAB - 5) + 5
    out = logits(inside)
    assert torch.allclose(out[:, :P + B], base[:, :P + B], atol=1e-6, rtol=0)
    for pos in range(P + B, j):
        assert (out[:, pos] - base[:, pos]).abs().max() > 1e-4, pos
    # control: with the default (causal) mask the earlier positions of the block would not move
    causal = logits(inside, None)
    causal_base = logits(ids, None)
    assert torch.allclose(causal[:, :j], causal_base[:, :j], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- (g) replay
def _record_canvases(model, prompt, fused, **kw):
    """Decode while recording the input ids of every forward after the prefill."""
    seen = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(ids.clone())

    h = model.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        r = decode(model, prompt, fused=fused, **kw)
    finally:
        h.remove()
    return r, seen[1:]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("B,tau", [(4, 0.5), (5, 0.8), (3, 0.2)])
def test_rebuild_canvas_matches_the_canvases_the_sampler_used(model, prompt, fused, B, tau):
    r, calls = _record_canvases(model, prompt, fused, max_blocks=24 // B, block_size=B, tau=tau)
    n, c = r.tokens.shape
    nb = c // B
    fin = finished_before(r.tokens, B)
    it = iter(calls)
    for b in range(nb):
        sl = slice(b * B, (b + 1) * B)
        iters = int(r.steps[:, b].max())
        for k in range(iters):
            used = next(it)[:, -B:]                  # a fused call carries the previous block first
            rebuilt = rebuild_canvas(r.tokens[:, sl], r.commit_step[:, sl], k, MASK)
            act = ~fin[:, b]
            assert torch.equal(rebuilt[act], used[act]), (b, k)
            # and the tokens committed at step k are exactly those that change between steps k and k+1
            nxt = rebuild_canvas(r.tokens[:, sl], r.commit_step[:, sl], k + 1, MASK)
            assert torch.equal((nxt != rebuilt)[act] | ((r.commit_step[:, sl] == k) & (r.tokens[:, sl] == MASK))[act],
                               (r.commit_step[:, sl] == k)[act])
        if not fused and b < nb - 1:
            assert torch.equal(next(it), r.tokens[:, sl])   # the write of the finished block: its final tokens
    assert next(it, None) is None, "more forwards than the steps account for"


def test_rebuild_canvas_definition():
    tokens = torch.tensor([[10, 11, 12, 13]])
    step = torch.tensor([[2, 0, 1, 0]])
    assert rebuild_canvas(tokens, step, 0, MASK).tolist() == [[MASK, MASK, MASK, MASK]]
    assert rebuild_canvas(tokens, step, 1, MASK).tolist() == [[MASK, 11, MASK, 13]]
    assert rebuild_canvas(tokens, step, 2, MASK).tolist() == [[MASK, 11, 12, 13]]
    assert rebuild_canvas(tokens, step, 3, MASK).tolist() == [[10, 11, 12, 13]]


# ----------------------------------------------------------------------------------------------- (h) training view
@pytest.mark.parametrize("B,tau", [(4, 0.5), (3, 0.9)])
def test_view_hidden_first_step_matches_the_sampler(model, prompt, B, tau):
    r = decode(model, prompt, max_blocks=18 // B, block_size=B, tau=tau)
    n, c = r.tokens.shape
    nb = c // B
    fin = finished_before(r.tokens, B)
    checked = 0
    for b in range(nb):
        start = P + b * B
        # by hand: prompt + decoded earlier blocks + an all-mask block, in the single-stream block-causal layout
        x = torch.cat([prompt, r.tokens[:, :b * B], torch.full((n, B), MASK)], 1)
        m = to_4d(block_causal_mask(P, (b + 1) * B, B), n)
        with torch.no_grad():
            hand = model(input_ids=x, attention_mask=m).logits[:, start - 1:start + B - 1].float()
            views = torch.full((n, 1, B), MASK)
            h = view_hidden(model, prompt, r.tokens, views, torch.tensor([b]), B)
            via_view = model.lm_head(h).float()[:, 0]
        assert via_view.shape == hand.shape
        assert torch.allclose(via_view, hand, atol=1e-4, rtol=0), (b, (via_view - hand).abs().max())
        # the sampler committed, at its first step, exactly what the commit rule says on these predictions
        act = ~fin[:, b]
        probs = hand.softmax(-1)
        conf, tok = probs.max(-1)
        first = commit_rule(conf, torch.zeros(n, B, dtype=torch.bool), tau)
        sl = slice(b * B, (b + 1) * B)
        assert torch.equal(first[act], (r.commit_step[:, sl] == 0)[act])
        assert torch.equal(tok[act][first[act]], r.tokens[:, sl][act][first[act]])
        checked += int(act.sum())
    assert checked >= n
