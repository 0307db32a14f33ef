"""RL: the re-ranking reward on hand-made rankings, group advantages, the PPO surrogate, and a toy that must improve."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffgr2_lite.rl import copy_rate, group_advantages, ppo_token_loss, reward, train_rl
from diffgr2_lite.text import SPECIAL_TOKENS, ParsedRanking, build_answer, make_tokenizer, parse_ranking, sid_tokens

VOCAB = (SPECIAL_TOKENS + [f"<a_{i}>" for i in range(10)] + [f"<b_{i}>" for i in range(10)]
         + [f"w{i}" for i in range(10)])
CANDS = [sid_tokens((i, i)) for i in range(10)]


def parsed(order):
    return parse_ranking(build_answer([CANDS[p] for p in order]), CANDS)


def moved(target, new_rank):
    """The input order with ``target`` moved to position ``new_rank``."""
    order = [p for p in range(10) if p != target]
    order.insert(new_rank, target)
    return order


# ----------------------------------------------------------------------------------------------- reward
def test_reward_on_hand_made_rankings():
    # promoted: retriever had the target 4th (pos 3), the model puts it first
    assert reward(parsed(moved(3, 0)), 3) == pytest.approx(0.3 + 0.2)
    assert reward(parsed(moved(3, 0)), 3, conditional=False) == pytest.approx(0.5)
    # promoted a little, not to the top: still paid the format reward
    assert reward(parsed(moved(5, 2)), 5) == pytest.approx(0.3 + 0.2)
    # demoted: from first to third
    assert reward(parsed(moved(0, 2)), 0) == pytest.approx(-0.2)
    assert reward(parsed(moved(0, 2)), 0, conditional=False) == pytest.approx(-0.2 + 0.2)
    # kept first: R_rank = 0, the conditional reward still pays the format
    assert reward(parsed(list(range(10))), 0) == pytest.approx(0.2)
    # the hack: copy the input order while the target is not first
    assert reward(parsed(list(range(10))), 4) == pytest.approx(0.0)
    assert reward(parsed(list(range(10))), 4, conditional=False) == pytest.approx(0.2)
    # other weights and list sizes
    assert reward(parsed(moved(3, 0)), 3, n=10, format_weight=0.5) == pytest.approx(0.8)
    # invalid: duplicate, dropped, malformed
    dup = parse_ranking(build_answer([CANDS[0]] * 10), CANDS)
    assert not dup.valid and reward(dup, 0) == -1.0 and reward(dup, 0, conditional=False) == -1.0
    assert reward(parse_ranking("<think> x </think> <eos>", CANDS), 2) == -1.0
    assert reward(ParsedRanking(list(range(10)), [], valid=False, malformed=True), 0) == -1.0


def test_copy_rate():
    ps = [parsed(list(range(10))), parsed(moved(3, 0)), parse_ranking("<eos>", CANDS), parsed(list(range(10)))]
    assert copy_rate(ps) == pytest.approx(2 / 3)
    assert copy_rate([parse_ranking("<eos>", CANDS)]) == 0.0
    assert copy_rate([]) == 0.0


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, -1.0], [0.2, 0.2, 0.2, 0.2], [-1.0, -1.0, -1.0, 0.5]])
    adv, keep = group_advantages(r)
    assert keep.tolist() == [True, False, True]
    assert (adv[1] == 0).all()
    std0 = r[0].std()
    torch.testing.assert_close(adv[0], (r[0] - r[0].mean()) / (std0 + 1e-6))
    for g in (0, 2):
        assert float(adv[g].mean()) == pytest.approx(0.0, abs=1e-6)
        assert float(adv[g].std()) == pytest.approx(1.0, abs=1e-4)
    adv2, keep2 = group_advantages(np.array([[1.0, 1.0]]))
    assert keep2.tolist() == [False] and (adv2 == 0).all()


def test_ppo_token_loss_clips_in_the_right_direction():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = ppo_token_loss(new, old, adv, 0.2, 0.28)
    # A > 0 and ratio above 1 + eps_high: clipped at 1.28; A < 0 and ratio below 1 - eps_low: clipped at 0.8
    torch.testing.assert_close(loss, torch.tensor([-1.28, 1.5, -0.5, 0.8]))
    assert clipped.tolist() == [True, False, False, True]


# ----------------------------------------------------------------------------------------------- a toy that improves
@pytest.fixture(scope="module")
def toy():
    tok = make_tokenizer(VOCAB)
    ex = SimpleNamespace(tokenizer=tok, sid_words=lambda c: sid_tokens((c, c)))
    rng = np.random.default_rng(0)
    rows = [{"prompt_ids": tok.convert_tokens_to_ids([f"w{i}" for i in rng.integers(0, 10, 6)]),
             "candidates": list(range(10)), "target_pos": int(rng.integers(0, 10)), "completion_ids": [1] * 8}
            for _ in range(32)]
    return tok, ex, rows


def tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64,
                      attn_implementation="sdpa", eos_token_id=SPECIAL_TOKENS.index("<eos>"))
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("inner_epochs", [1, 2])
def test_rl_raises_the_reward_on_a_toy(toy, inner_epochs):
    """Reward = share of the 4 completion tokens that are 'w3' (a random model: about 1/41). It must climb."""
    tok, ex, rows = toy
    target = tok.convert_tokens_to_ids("w3")

    def toy_reward(parsed, row, token_ids):
        return sum(t == target for t in token_ids) / 4

    model = tiny_model()
    hist = train_rl(model, rows, ex, steps=12, prompts=8, group=8, lr=1e-2, clip=0.2, tau=1.0, block_size=4,
                    device="cpu", seed=0, reward_fn=toy_reward, max_blocks=1, inner_epochs=inner_epochs,
                    micro_batch=24)
    first, last = np.mean(hist["reward"][:3]), np.mean(hist["reward"][-3:])
    assert first < 0.25 and last > first + 0.3, hist["reward"]
    assert all(0 <= k <= 1 for k in hist["kept"]) and max(hist["kept"]) > 0
    for key in ("step", "reward", "valid", "copy", "kept", "loss", "clip_frac"):
        assert len(hist[key]) == 12
    if inner_epochs == 1:
        assert max(hist["clip_frac"]) == 0.0          # pi_old is the same weights: ratio 1, nothing clipped


def test_rl_with_the_real_reward_drops_uniform_groups(toy):
    """A random model never writes a valid permutation: every reward is -1, every group is dropped, nothing moves."""
    tok, ex, rows = toy
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    hist = train_rl(model, rows, ex, steps=2, prompts=4, group=4, lr=1e-2, clip=0.2, tau=1.0, block_size=4,
                    device="cpu", seed=0, max_blocks=2, validate=lambda m: calls.append(1) or 0.1)
    assert hist["reward"] == [-1.0, -1.0] and hist["kept"] == [0.0, 0.0] and hist["valid"] == [0.0, 0.0]
    assert hist["copy"] == [0.0, 0.0] and hist["val"] == [0.1] and len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
