"""The first-pick probe: it reads the model's choice at the teacher's first ``pick``, whatever the prefix length."""
from __future__ import annotations

import pytest
import torch

from diffgr2_lite.evaluate import first_pick_probe
from diffgr2_lite.text import build_vocabulary, make_tokenizer


class PositionModel(torch.nn.Module):
    """A decoder whose head favours candidate label ``[(position mod 4) + 1]`` at every position: the pick reveals
    where the probe read it. Shaped like a transformers causal LM (``.model`` gives hidden states, ``.lm_head``)."""

    def __init__(self, tok):
        super().__init__()
        numbers = tok.convert_tokens_to_ids(["[1]", "[2]", "[3]", "[4]"])
        self.lm_head = torch.nn.Linear(4, len(tok), bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            for k, n in enumerate(numbers):
                self.lm_head.weight[n, k] = 3.0
        self.model = self._hidden

    @staticmethod
    def _hidden(input_ids):
        B, T = input_ids.shape
        onehot = torch.nn.functional.one_hot(torch.arange(T) % 4, 4).float().expand(B, T, 4)
        return type("Out", (), {"last_hidden_state": onehot})()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(build_vocabulary(["step3 check = 1 2 pick x ; ."], (4,), n_labels=4))


def row(tok, prompt_len, check_words, target):
    ids = lambda s: tok.convert_tokens_to_ids(s.split())
    completion = ids(f"step3 check {check_words} pick [2] . x pick [1] .")
    return {"prompt_ids": ids("x " * prompt_len), "completion_ids": completion, "target_pos": target}


def test_probe_reads_the_first_pick_of_each_row(tok):
    from datasets import Dataset

    # the first "pick" sits at index prompt + 2 + len(check): rows of different lengths in one batch (right padding)
    rows = [row(tok, 3, "[1] ;", 3),          # pick at 3 + 2 + 2 = 7 -> favoured label [(7 % 4) + 1] = [4] -> 3
            row(tok, 3, "[1] = 2 ;", 0),      # 9 -> [2] -> position 1 (a miss)
            row(tok, 4, "[1] = ;", 1)]        # 9 -> [2] -> position 1
    out = first_pick_probe(PositionModel(tok), Dataset.from_list(rows), tok, "cpu", n_candidates=4, batch_size=2)
    assert out["picks"] == [3, 1, 1]        # the later "pick [1]" of each completion is never read
    assert out["recall@1"] == pytest.approx(2 / 3)
    assert out["picks_retrievers_first"] == 0.0 and out["n"] == 3
    p_hit = torch.tensor([3.0, 0, 0, 0]).softmax(0)[0].item()
    assert out["mean_p_first"] == pytest.approx((1 - p_hit) / 3, rel=1e-4)


def test_probe_refuses_completions_without_a_trace(tok):
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt_ids": [5, 6], "completion_ids": [7, 8], "target_pos": 0}])
    with pytest.raises(ValueError, match="reasoning trace"):
        first_pick_probe(PositionModel(tok), ds, tok, "cpu", n_candidates=4)


def test_probe_matches_the_full_forward_of_a_real_model(tok):
    """On a real (tiny, random) Llama the probe's picks are the argmax of the full forward's logits at the pick."""
    from datasets import Dataset

    from tiny import tiny_model

    model = tiny_model()
    rows = [row(tok, 3, "[1] ;", 0), row(tok, 5, "[1] = 2 ;", 2), row(tok, 2, "[2] ;", 1)]
    out = first_pick_probe(model, Dataset.from_list(rows), tok, "cpu", n_candidates=4, batch_size=2)
    numbers = tok.convert_tokens_to_ids(["[1]", "[2]", "[3]", "[4]"])
    expected = []
    for r in rows:
        seq = r["prompt_ids"] + r["completion_ids"][: r["completion_ids"].index(tok.convert_tokens_to_ids("pick")) + 1]
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, -1, numbers]
        expected.append(int(logits.argmax()))
    assert out["picks"] == expected


def test_the_weights_fingerprint_sees_any_change_and_only_a_change(tmp_path):
    """The evaluation cache is keyed by it: a changed attention weight or embedding row must change it (a hash of the
    last few parameters' sums once missed both), a copy or a save-and-load must not."""
    import copy

    from diffgr2_lite.evaluate import cached_evaluation, model_fingerprint
    from tiny import tiny_model

    model = tiny_model()
    base = model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model)) == base
    model.save_pretrained(tmp_path / "m")
    assert model_fingerprint(type(model).from_pretrained(tmp_path / "m")) == base
    for change in (lambda m: m.model.layers[0].self_attn.q_proj.weight.neg_(),
                   lambda m: m.model.embed_tokens.weight[5:15].mul_(1.5)):
        other = copy.deepcopy(model)
        with torch.no_grad():
            change(other)
        assert model_fingerprint(other) != base
    # and the cache reruns for other weights, not for the same ones
    runs = []
    run = lambda: runs.append(1) or {"_per": {}, "parses": [], "n": len(runs)}
    cached_evaluation(tmp_path / "s.json", {"a": 1}, model, run)
    cached_evaluation(tmp_path / "s.json", {"a": 1}, copy.deepcopy(model), run)
    assert len(runs) == 1
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight[0, 0] += 1
    assert cached_evaluation(tmp_path / "s.json", {"a": 1}, other, run)[0]["n"] == 2
