"""On-policy distillation: the loss's fixed points, what the teacher sees, what rollouts record, and that it trains."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffgr2_lite.diffusion.replay import valid_positions
from diffgr2_lite.diffusion.sampler import DecodeResult, rebuild_canvas
from diffgr2_lite.opd import loss_positions, opd_loss, sample_rollouts, teacher_log_probs, train_opd
from diffgr2_lite.text import SPECIAL_TOKENS, make_tokenizer, sid_tokens

VOCAB = (SPECIAL_TOKENS + [f"<a_{i}>" for i in range(10)] + [f"<b_{i}>" for i in range(10)]
         + [f"w{i}" for i in range(10)])


@pytest.fixture(scope="module")
def toy():
    tok = make_tokenizer(VOCAB)
    ex = SimpleNamespace(tokenizer=tok, sid_words=lambda c: sid_tokens((c, c)))
    rng = np.random.default_rng(0)
    rows = [{"prompt_ids": tok.convert_tokens_to_ids([f"w{i}" for i in rng.integers(0, 10, 6)]),
             "candidates": list(range(10)), "target_pos": int(rng.integers(0, 10)), "completion_ids": [1] * 8}
            for _ in range(32)]
    return tok, ex, rows


def tiny_model(seed: int = 0):
    """Random float32 Llama with a sharp-ish output layer (several commits per step, rows ending early)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64,
                      attn_implementation="sdpa", tie_word_embeddings=False, eos_token_id=SPECIAL_TOKENS.index("<eos>"))
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.normal_(0, 0.5)
    return m


def rollouts(model, tok, rows, block_size, max_blocks=3, seed=5, tau=1.0, n=12, sub_block=None):
    return sample_rollouts(model, rows[:n], 2, block_size=block_size, max_blocks=max_blocks, mask_id=tok.mask_token_id,
                           eos_id=tok.eos_token_id, tau=tau, temperature=1.0, device="cpu",
                           generator=torch.Generator().manual_seed(seed), sub_block=sub_block)


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
@pytest.mark.parametrize("view", ["replay", "masked"])
def test_zero_when_student_equals_teacher_at_block_size_one(toy, divergence, view):
    """B = 1: replay (and the masked view) is AR teacher forcing, so a student with the teacher's weights has KL 0."""
    tok, _, rows = toy
    teacher = tiny_model()
    student = copy.deepcopy(teacher)
    prompt, res = rollouts(student, tok, rows, 1, max_blocks=10)
    loss, st = opd_loss(student, teacher, prompt, res, 1, tok.mask_token_id, divergence, view)
    assert st["n_kl"] > 0 and st["n_fill"] == 0
    assert abs(float(loss.detach())) < 1e-5


@pytest.mark.parametrize("view", ["replay", "masked"])
def test_positive_otherwise(toy, view):
    tok, _, rows = toy
    teacher = tiny_model()
    prompt, res = rollouts(teacher, tok, rows, 4)
    loss, st = opd_loss(teacher, teacher, prompt, res, 4, tok.mask_token_id, "forward", view)   # same weights, B = 4
    assert float(loss.detach()) > 1e-2 and st["kl"] > 1e-2
    other = tiny_model(seed=1)
    prompt, res = rollouts(other, tok, rows, 1, max_blocks=10)
    loss, _ = opd_loss(other, teacher, prompt, res, 1, tok.mask_token_id, "forward", view)      # other weights, B = 1
    assert float(loss.detach()) > 1e-2


def test_replay_and_masked_views_differ_when_tokens_commit_late(toy):
    tok, _, rows = toy
    teacher = tiny_model()
    student = tiny_model(seed=2)
    prompt, res = rollouts(student, tok, rows, 4, tau=0.3)
    assert (res.commit_step[valid_positions(res.steps, 4)] > 0).any()
    with torch.no_grad():
        a = opd_loss(student, teacher, prompt, res, 4, tok.mask_token_id, "forward", "replay")[0]
        b = opd_loss(student, teacher, prompt, res, 4, tok.mask_token_id, "forward", "masked")[0]
    assert abs(float(a) - float(b)) > 1e-4


def test_forward_kl_matches_a_hand_computation(toy):
    tok, _, rows = toy
    teacher, student = tiny_model(), tiny_model(seed=3)
    prompt, res = rollouts(student, tok, rows, 4, n=4)
    from diffgr2_lite.ar import completion_logits
    from diffgr2_lite.diffusion.replay import replay_logits

    with torch.no_grad():
        loss, st = opd_loss(student, teacher, prompt, res, 4, tok.mask_token_id, fill="skip")
        t = torch.log_softmax(completion_logits(teacher, prompt, res.tokens), -1)
        s = torch.log_softmax(replay_logits(student, prompt, res.tokens, res.commit_step, res.steps, 4,
                                            tok.mask_token_id)[0], -1)
    pos, _ = loss_positions(res, tok.eos_token_id)
    ref = (t.exp() * (t - s)).sum(-1)[pos].mean()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)


def test_teacher_sees_exactly_the_students_prefix(toy):
    """The teacher's distribution at completion position i depends on the rollout's tokens < i and nothing else."""
    tok, _, rows = toy
    teacher = tiny_model()
    prompt, res = rollouts(teacher, tok, rows, 4)
    tokens = res.tokens
    every = torch.ones_like(tokens, dtype=torch.bool)
    base = teacher_log_probs(teacher, prompt, tokens, every).view(*tokens.shape, -1)
    c = tokens.shape[1]
    for j in (0, 3, c // 2, c - 1):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1 - 11) % (len(VOCAB) - 11) + 11
        lp = teacher_log_probs(teacher, prompt, changed, every).view(*tokens.shape, -1)
        torch.testing.assert_close(lp[:, :j + 1], base[:, :j + 1], atol=1e-5, rtol=0)   # position j predicts token j
        if j + 1 < c:
            assert (lp[:, j + 1:] - base[:, j + 1:]).abs().amax() > 1e-4


def test_rollouts_record_canvas_and_step(toy):
    tok, _, rows = toy
    model = tiny_model()
    B = 4
    prompt, res = rollouts(model, tok, rows, B, tau=0.4)
    valid = valid_positions(res.steps, B)
    steps_of_pos = res.steps.repeat_interleave(B, 1)
    assert ((res.commit_step >= 0) & (res.commit_step < steps_of_pos))[valid].all()
    assert prompt.shape[0] == 24 and torch.equal(prompt[0], prompt[1])           # rollouts of a prompt are adjacent
    # the canvas of a token's commit step shows it masked and exactly the earlier commits of its block
    n, c = res.tokens.shape
    for i in range(n):
        for b in range(c // B):
            blk = slice(b * B, (b + 1) * B)
            for k in range(int(res.steps[i, b])):
                canvas = rebuild_canvas(res.tokens[i, blk], res.commit_step[i, blk], k, tok.mask_token_id)
                now = res.commit_step[i, blk] == k
                assert now.any()                                                 # every step commits something
                assert (canvas[now] == tok.mask_token_id).all()
                assert torch.equal(canvas[res.commit_step[i, blk] < k], res.tokens[i, blk][res.commit_step[i, blk] < k])


def test_sub_block_rollouts_fill_chunks_in_order_and_replay(toy):
    """With sub-blocks, every chunk of a block is committed before any position of the next one; the replay loss
    needs nothing more than the recorded commit steps."""
    tok, _, rows = toy
    model = tiny_model()
    B, S = 8, 4
    prompt, res = rollouts(model, tok, rows, B, tau=0.3, sub_block=S)
    n, c = res.tokens.shape
    chunks_checked = 0
    for i in range(n):
        for b in range(c // B):
            if int(res.steps[i, b]) == 0:                                       # a block after the row ended
                continue
            step = res.commit_step[i, b * B:(b + 1) * B].view(B // S, S)
            assert (step[:-1].amax(1) < step[1:].amin(1)).all()
            chunks_checked += 1
    assert chunks_checked > 0
    loss, stats = opd_loss(model, tiny_model(1), prompt, res, B, tok.mask_token_id)
    assert torch.isfinite(loss) and stats["kl"] > 0
    whole = rollouts(model, tok, rows, B, tau=0.3)[1]
    assert not torch.equal(whole.commit_step, res.commit_step)                  # the option reaches the sampler


def test_loss_positions_and_fill():
    """Teacher positions: committed positions up to the first <eos>; fill: the rest of the ending block."""
    E = 2
    tokens = torch.tensor([[5, 6, E, 7, 8, 9, 5, 6], [5, E, E, E, E, E, E, E], [5, 6, 7, 8, 9, 5, 6, 7]])
    steps = torch.tensor([[2, 0], [1, 0], [3, 2]])
    res = DecodeResult(tokens, torch.zeros_like(tokens), steps, 0, 4)
    t_pos, f_pos = loss_positions(res, E)
    assert t_pos.int().tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1] * 8]
    assert f_pos.int().tolist() == [[0, 0, 0, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0], [0] * 8]


def test_train_opd_reduces_kl(toy):
    tok, ex, rows = toy
    teacher = tiny_model()
    student = copy.deepcopy(teacher)

    def measure():
        prompt, res = rollouts(student, tok, rows, 4, n=16, seed=11)
        with torch.no_grad():
            return opd_loss(student, teacher, prompt, res, 4, tok.mask_token_id)[1]["kl"]

    before = measure()
    calls = []
    hist = train_opd(student, teacher, rows, ex, steps=12, prompts=8, rollouts=2, lr=3e-3, tau=1.0, block_size=4,
                     device="cpu", seed=0, max_blocks=3, micro_batch=5,
                     validate=lambda m: calls.append(1) or 0.5, validate_every=5)
    after = measure()
    assert after < 0.6 * before
    assert len(hist["step"]) == 12 and len(hist["kl"]) == 12 and all(np.isfinite(hist["kl"]))
    assert all(0.0 <= v <= 1.0 for v in hist["valid"])
    assert hist["val_step"] == [5, 10, 12] and len(calls) == 3
    for p in teacher.parameters():
        assert p.grad is None                                                    # the teacher stays frozen


def test_micro_batching_gives_the_same_gradient(toy):
    """Normalising by the step's token count makes micro-batch gradients sum to the full-batch gradient."""
    tok, _, rows = toy
    teacher, student = tiny_model(), tiny_model(seed=4)
    prompt, res = rollouts(student, tok, rows, 4, n=6)
    from diffgr2_lite.diffusion.replay import select_rows

    t_pos, f_pos = loss_positions(res, tok.eos_token_id)
    total = int(t_pos.sum() + f_pos.sum())
    student.zero_grad()
    opd_loss(student, teacher, prompt, res, 4, tok.mask_token_id)[0].backward()
    full = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    for s in range(0, prompt.shape[0], 5):
        sl = slice(s, s + 5)
        loss, _ = opd_loss(student, teacher, prompt[sl], select_rows(res, sl), 4, tok.mask_token_id, normalizer=total)
        loss.backward()
    for g, p in zip(full, student.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)
