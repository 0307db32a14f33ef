"""The SID copy warm-up: random answers are permutations, the floor and accuracy are right, and training copies."""
import math

import torch

from diffgr2_lite.copy_warmup import CopyTask, copy_accuracy, copy_floor, copy_positions, random_answers, train_copy
from tiny import EOS, tiny_model

OPEN, CLOSE = 5, 6


class StubTokenizer:
    eos_token_id = EOS

    def convert_tokens_to_ids(self, token):
        return {"<answer>": OPEN, "</answer>": CLOSE}[token]


def toy_task(n_rows=64, n=3, L=2, seed=0):
    """Prompts that list ``n`` candidates of ``L`` codes each (distinct codes per row), and those codes."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randperm(40, generator=g)[: n * L] + 10 for _ in range(n_rows)]).view(n_rows, n, L)
    prompts = torch.cat([torch.ones(n_rows, 1, dtype=torch.long), codes.flatten(1)], 1)
    return prompts, codes


def test_random_answers_are_fresh_permutations_of_the_candidates():
    _, codes = toy_task(n_rows=1, n=4, L=3)
    batch = codes.expand(50, 4, 3)
    ans, fully_random = random_answers(batch, StubTokenizer(), torch.Generator().manual_seed(0))
    assert fully_random.all()
    assert ans.shape == (50, 4 * 3 + 3)
    assert (ans[:, 0] == OPEN).all() and (ans[:, -2] == CLOSE).all() and (ans[:, -1] == EOS).all()
    cands = {tuple(c.tolist()) for c in codes[0]}
    orders = set()
    for row in ans:
        sids = [tuple(s.tolist()) for s in row[1:-2].view(4, 3)]
        assert set(sids) == cands and len(sids) == 4            # each candidate exactly once
        orders.add(tuple(sids))
    assert len(orders) > 10                                      # fresh orders, not one order repeated


def test_structured_answers_are_random_picks_then_the_rest_in_prompt_order():
    _, codes = toy_task(n_rows=1, n=6, L=2)
    ans, fully_random = random_answers(codes.expand(200, 6, 2), StubTokenizer(), torch.Generator().manual_seed(1),
                                       structured=1.0)
    assert not fully_random.any()
    index = {tuple(c.tolist()): i for i, c in enumerate(codes[0])}
    picks_seen = set()
    for row in ans:
        order = [index[tuple(s.tolist())] for s in row[1:-2].view(6, 2)]
        assert sorted(order) == list(range(6))                  # still a permutation
        # some prefix is the picks; everything after it is increasing (prompt order)
        k = next(k for k in range(7) if order[k:] == sorted(order[k:]))
        picks_seen.add(k)
    assert len(picks_seen) >= 4                                  # k varies across rows


def test_copy_floor_and_positions():
    assert math.isclose(copy_floor(3, 9), math.log(6) / 9)
    assert math.isclose(copy_floor(10, 33), math.log(math.factorial(10)) / 33)
    # <answer> | a b c | a b c | </answer> <eos>: the copies are every code after a SID's first
    assert copy_positions(2, 3).tolist() == [False, False, True, True, False, True, True, False, False]


def test_copy_accuracy_counts_only_copy_positions():
    answers = torch.tensor([[OPEN, 10, 11, 12, 13, CLOSE, EOS], [OPEN, 12, 13, 10, 11, CLOSE, EOS]])
    logits = torch.full((2, 7, 50), -1.0)
    logits.scatter_(2, answers[:, :, None], 1.0)                 # argmax = the answer everywhere...
    logits[0, 1] = 0
    logits[0, 1, 40] = 5.0                                       # ...except a wrong *choice* (not a copy) in row 0
    logits[1, 4] = 0
    logits[1, 4, 40] = 5.0                                       # and a wrong copy in row 1
    acc, whole = copy_accuracy(logits, answers, sid_len=2)
    assert math.isclose(acc, 3 / 4) and math.isclose(whole, 1 / 2)


def test_training_on_the_copy_task_lowers_the_loss_towards_copying():
    prompts, codes = toy_task()
    model = tiny_model(init=0.02)
    task = CopyTask(prompts, codes, StubTokenizer(), "cpu", seed=0)
    hist = train_copy(model, task, steps=300, batch_size=32, lr=3e-3, log_every=20)
    assert hist["loss"][-1] < 0.6 * hist["loss"][0]
    assert hist["copy_acc"][-1] > hist["copy_acc"][0] + 0.2
    assert hist["loss"][-1] > hist["floor"] - 0.05              # nothing beats the floor by much (the order is random)
