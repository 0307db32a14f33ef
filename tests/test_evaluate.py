"""The first-pick probe: it reads the model's choice at the teacher's first ``pick``, whatever the prefix length."""
from __future__ import annotations

import pytest
import torch

from diffgr2_lite.evaluate import first_pick_probe
from diffgr2_lite.text import build_vocabulary, make_tokenizer


class PositionModel(torch.nn.Module):
    """Logits that favour candidate number ``(position mod 4) + 1`` at every position: the pick reveals where the
    probe read the logits."""

    def __init__(self, tok):
        super().__init__()
        self.numbers = tok.convert_tokens_to_ids(["1", "2", "3", "4"])
        self.vocab = len(tok)

    def forward(self, x):
        B, T = x.shape
        logits = torch.zeros(B, T, self.vocab)
        for t in range(T):
            logits[:, t, self.numbers[t % 4]] = 3.0
        return type("Out", (), {"logits": logits})()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(build_vocabulary(["step3 check 1 2 3 4 pick x ; rest"], (4,)))


def row(tok, prompt_len, check_words, target):
    ids = lambda s: tok.convert_tokens_to_ids(s.split())
    completion = ids(f"step3 check {check_words} pick 2 x ; pick 1 x ; rest")
    return {"prompt_ids": ids("x " * prompt_len), "completion_ids": completion, "target_pos": target}


def test_probe_reads_the_first_pick_of_each_row(tok):
    from datasets import Dataset

    # the first "pick" sits at index prompt + 2 + len(check): rows of different lengths in one batch (right padding)
    rows = [row(tok, 3, "1 ;", 3),          # pick at 3 + 2 + 2 = 7 -> favoured number (7 % 4) + 1 = 4 -> position 3
            row(tok, 3, "1 2 ;", 0),        # 8 -> number 1 -> position 0
            row(tok, 4, "1 2 3 ;", 1)]      # 10 -> number 3 -> position 2 (a miss)
    out = first_pick_probe(PositionModel(tok), Dataset.from_list(rows), tok, "cpu", n_candidates=4, batch_size=2)
    assert out["picks"] == [3, 0, 2]        # the later "pick 1" of each completion is never read
    assert out["recall@1"] == pytest.approx(2 / 3)
    assert out["picks_retrievers_first"] == pytest.approx(1 / 3) and out["n"] == 3
    p_hit = torch.tensor([3.0, 0, 0, 0]).softmax(0)[0].item()
    assert out["mean_p_first"] == pytest.approx((p_hit + 2 * (1 - p_hit) / 3) / 3, rel=1e-4)


def test_probe_refuses_completions_without_a_trace(tok):
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt_ids": [5, 6], "completion_ids": [7, 8], "target_pos": 0}])
    with pytest.raises(ValueError, match="reasoning trace"):
        first_pick_probe(PositionModel(tok), ds, tok, "cpu", n_candidates=4)
