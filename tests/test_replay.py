"""Trajectory replay against the obvious reference: one forward per (block, step), exactly as the decoder ran it."""
from __future__ import annotations

import pytest
import torch

from diffgr2_lite.diffusion.replay import (
    masked_hidden, replay_log_softmax, replay_logits, replay_logprobs, stepwise_logits, valid_from_tokens,
    valid_positions, view_plan,
)
from diffgr2_lite.diffusion.sampler import diffusion_decode

V, MASK, EOS, P, B = 40, 4, 2, 7, 4


def tiny_model(seed: int = 0):
    """A random float32 Llama whose output layer is sharp enough to commit several tokens per step at tau < 1,
    and whose <eos> is likely enough that rows end in different blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=64, max_position_embeddings=128, attn_implementation="sdpa",
                      tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.normal_(0, 0.5)
        m.lm_head.weight[EOS] += 0.2
    return m


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(5, V, (6, P), generator=torch.Generator().manual_seed(0))


SETTINGS = [(0.0, 1.0), (0.0, 0.5), (1.0, 1.0), (1.0, 0.5)]      # (temperature, tau): greedy and sampled


def decode(model, prompt, temperature, tau, seed=1, block_size=B, max_blocks=5):
    return diffusion_decode(model, prompt, max_blocks, block_size, MASK, EOS, tau=tau, temperature=temperature,
                            generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature,tau", SETTINGS)
@pytest.mark.parametrize("chunk", [1, 64])
def test_replay_equals_stepwise_recomputation(model, prompt, temperature, tau, chunk):
    res = decode(model, prompt, temperature, tau)
    with torch.no_grad():
        logits, valid = replay_logits(model, prompt, res.tokens, res.commit_step, res.steps, B, MASK,
                                      max_views_per_chunk=chunk)
    ref = stepwise_logits(model, prompt, res.tokens, res.commit_step, res.steps, B, MASK)
    assert valid.any()
    torch.testing.assert_close(logits[valid], ref[valid], atol=2e-5, rtol=1e-5)
    assert (logits[~valid] == 0).all()


def test_the_fixture_exercises_the_interesting_cases(model, prompt):
    """Rows end in different blocks and blocks take different numbers of steps (else the test above proves little)."""
    res = decode(model, prompt, 1.0, 0.5)
    valid = valid_positions(res.steps, B)
    assert (~valid).any() and valid.any()
    assert len(set(res.steps[res.steps > 0].tolist())) >= 3
    assert (res.commit_step[valid] > 0).any()


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_greedy_replay_reproduces_the_decoders_choices(model, prompt, tau):
    res = decode(model, prompt, 0.0, tau)
    with torch.no_grad():
        logits, valid = replay_logits(model, prompt, res.tokens, res.commit_step, res.steps, B, MASK)
    assert torch.equal(logits.argmax(-1)[valid], res.tokens[valid])


@pytest.mark.parametrize("temperature,tau", SETTINGS)
def test_validity_and_commit_steps(model, prompt, temperature, tau):
    res = decode(model, prompt, temperature, tau)
    valid = valid_positions(res.steps, B)
    assert torch.equal(valid, valid_from_tokens(res.tokens, B, EOS))
    steps_of_pos = res.steps.repeat_interleave(B, 1)
    cs = res.commit_step
    assert ((cs >= 0) & (cs < steps_of_pos))[valid].all()
    n, nb = res.steps.shape
    for i in range(n):                                              # every step commits at least one token
        for b in range(nb):
            k = int(res.steps[i, b])
            assert set(cs[i, b * B:(b + 1) * B].tolist()) == set(range(k)) or k == 0


def test_view_plan():
    steps = torch.tensor([[3, 1, 0], [2, 2, 0]])
    vb, vs, off = view_plan(steps)
    assert vb.tolist() == [0, 0, 0, 1, 1]
    assert vs.tolist() == [0, 1, 2, 0, 1]
    assert off.tolist() == [0, 3, 5]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_log_softmax(model, prompt, temperature):
    res = decode(model, prompt, temperature, 0.5)
    ref = stepwise_logits(model, prompt, res.tokens, res.commit_step, res.steps, B, MASK) / temperature
    ref_lsm = torch.log_softmax(ref, -1)
    with torch.no_grad():
        lp, valid = replay_logprobs(model, prompt, res.tokens, res.commit_step, res.steps, B, MASK,
                                    temperature=temperature, position_chunk=7)
        where = valid & (torch.arange(res.tokens.shape[1]) % 2 == 0)
        lsm, used = replay_log_softmax(model, prompt, res.tokens, res.commit_step, res.steps, B, MASK, where=where,
                                       temperature=temperature)
    torch.testing.assert_close(lp[valid], ref_lsm.gather(-1, res.tokens[..., None])[..., 0][valid], atol=2e-5, rtol=0)
    assert (lp[~valid] == 0).all()
    assert torch.equal(used, where) and lsm.shape == (int(where.sum()), V)
    torch.testing.assert_close(lsm, ref_lsm[where], atol=2e-5, rtol=0)


def test_replay_is_differentiable(model, prompt):
    res = decode(model, prompt, 1.0, 0.5)
    model.zero_grad()
    lp, valid = replay_logprobs(model, prompt, res.tokens, res.commit_step, res.steps, B, MASK, max_views_per_chunk=2)
    lp.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    model.zero_grad()


def test_masked_view_is_replay_only_at_step_zero(model, prompt):
    """The fully-masked pass agrees with replay for tokens committed at step 0 and nowhere else (in general)."""
    res = decode(model, prompt, 1.0, 0.5)
    with torch.no_grad():
        logits, valid = replay_logits(model, prompt, res.tokens, res.commit_step, res.steps, B, MASK)
        masked = model.lm_head(masked_hidden(model, prompt, res.tokens, B, MASK, max_views_per_chunk=2))
    first = valid & (res.commit_step == 0)
    later = valid & (res.commit_step > 0)
    torch.testing.assert_close(masked[first], logits[first], atol=2e-5, rtol=1e-5)
    # the first position of a block is predicted from the clean previous block: identical in both; the others differ
    later &= (torch.arange(res.tokens.shape[1]) % B != 0)
    assert later.any()
    assert (masked[later] - logits[later]).abs().amax(-1).min() > 1e-4


def test_block_size_one_is_teacher_forcing(model, prompt):
    """With B = 1 every token is committed at step 0 of its own block from the clean prefix: AR teacher forcing."""
    from diffgr2_lite.ar import completion_logits

    res = decode(model, prompt, 1.0, 1.0, block_size=1, max_blocks=12)
    with torch.no_grad():
        logits, valid = replay_logits(model, prompt, res.tokens, res.commit_step, res.steps, 1, MASK)
        ar = completion_logits(model, prompt, res.tokens)
    torch.testing.assert_close(logits[valid], ar[valid], atol=2e-5, rtol=1e-5)
