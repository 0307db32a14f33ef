"""The benchmark's arithmetic on stubs: fake decoders with known outputs and a fake clock they advance.

Every number below is worked out by hand from the stubs, so a change in what a column means shows up here.
"""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from diffgr2_lite import bench
from diffgr2_lite.bench import BenchConfig, benchmark, generated_length, speed_record, speedup_vs_length, time_decoder

# a toy vocabulary: 2 candidates with one-level SIDs
VOCAB = ["<pad>", "<eos>", "<mask>", "<answer>", "</answer>", "<a_0>", "<a_1>", "word"]
ID = {t: i for i, t in enumerate(VOCAB)}
EOS_ID, MASK_ID = ID["<eos>"], ID["<mask>"]


def ids(text: str, width: int = 8) -> list[int]:
    out = [ID[t] for t in text.split()]
    return out + [EOS_ID] * (width - len(out))


# the output of each prompt (prompt i carries i in its first position), its length up to <eos>, and its score
OUTPUTS = [
    ids("word word <answer> <a_0> <a_1> </answer> <eos>"),   # 7 tokens, valid, ranks 0 first: hit (target 0)
    ids("<answer> <a_1> <a_0> </answer> <eos>"),             # 5 tokens, valid, ranks 1 first: miss (target 0)
    ids("word <answer> <a_1> <a_1> </answer> <eos>"),        # 6 tokens, duplicate -> retriever order: miss (target 1)
    [ID["word"]] * 8,                                        # 8 tokens, no <eos>, malformed -> retriever order: hit
]
LENGTHS = [7, 5, 6, 8]
TARGETS = [0, 0, 1, 0]
STEPS = [[2, 1], [1, 0], [2, 0], [3, 3]]                     # diffusion steps per block (block size 4), per row
ROWS = [{"candidates": [0, 1], "target_pos": t} for t in TARGETS]


class Tok:
    eos_token_id, mask_token_id = EOS_ID, MASK_ID

    def convert_ids_to_tokens(self, ids):
        return [VOCAB[i] for i in ids]


class ExampleSet:
    tokenizer = Tok()

    def sid_words(self, item):
        return (f"<a_{item}>",)


class Clock:
    """A fake clock the fake decoders advance; ``start``/``stop`` is the timer interface of :func:`time_decoder`."""

    def __init__(self):
        self.now = 0.0

    def start(self):
        return self.now

    def stop(self, handle):
        return self.now - handle


CLOCK = Clock()
PATTERN = [3, 1, 2]            # cost multipliers of successive calls: the median of three calls is 2 x the base


class FakeAR:
    """Costs ``base`` ms per call (x PATTERN), 8 forwards per call (7 after the prefill)."""
    base = 0.0

    def __init__(self, model, batch, P, max_new, eos_id, graphs=True, check_every=8):
        self.batch, self.calls = batch, 0

    def cost(self, prompt):
        return self.base * (1 + int(prompt[0, 0])) if self.batch == 1 else self.base

    def decode(self, prompt, max_new=None, stop_at_eos=True):
        CLOCK.now += self.cost(prompt) * PATTERN[self.calls % 3]
        self.calls += 1
        toks = torch.tensor([OUTPUTS[int(i)] for i in prompt[:, 0]])
        if max_new is not None:
            toks = toks[:, :max_new]
        return {"tokens": toks, "forwards": 7}


class FakeDiffusion(FakeAR):
    """Cost ``base / tau`` style: cheaper at lower tau; 5 model calls per decode (4 after the prefill)."""

    made = []                  # (tau, sub_block) of every decoder built

    def __init__(self, model, batch, P, max_blocks, block_size, mask_id, eos_id, tau=1.0, graphs=True, sub_block=None):
        super().__init__(model, batch, P, max_blocks * block_size, eos_id)
        self.tau = tau
        FakeDiffusion.made.append((tau, sub_block))

    def cost(self, prompt):
        return 4.0 * self.tau

    def decode(self, prompt, max_blocks=None, stop_at_eos=True):
        out = super().decode(prompt)
        out["steps"] = torch.tensor([STEPS[int(i)] for i in prompt[:, 0]])
        out["forwards"] = 4
        return out


@pytest.fixture
def rows():
    FakeAR.base = 10.0
    CLOCK.now = 0.0
    cfg = BenchConfig(max_new=8, batches=(1, 4), taus=(1.0, 0.5), block_sizes=(4,), n_single=2, repeats=3, warmup=0)
    prompts = torch.arange(4)[:, None].repeat(1, 5)
    return benchmark(torch.nn.Linear(2, 2), prompts, ROWS, ExampleSet(), cfg, timer=CLOCK, ar_cls=FakeAR,
                     diffusion_cls=FakeDiffusion, log=None)


def test_generated_length_counts_up_to_first_eos():
    assert [generated_length(o, EOS_ID) for o in OUTPUTS] == LENGTHS


def test_time_decoder_median_and_warmup():
    clock, costs = Clock(), iter([100.0, 5.0, 9.0, 7.0])       # the first (warm-up) call is not timed
    calls = []

    def fn():
        clock.now += next(costs)
        calls.append(1)
        return len(calls)

    t = time_decoder(fn, repeats=3, warmup=1, timer=clock)
    assert t["all_ms"] == [5.0, 9.0, 7.0] and t["ms"] == 7.0 and t["result"] == 4 and len(calls) == 4


def test_rows_have_the_contract_keys(rows):
    keys = {"decoder", "batch", "block_size", "tau", "sub_block", "tokens_per_s", "ms_per_forward", "tokens_per_forward",
            "latency_ms_per_request", "recall@1", "strict_recall@1", "valid_rate", "scored", "graphs", "speedup_vs_ar"}
    assert all(set(r) == keys for r in rows)
    assert all(0.0 <= r["strict_recall@1"] <= r["recall@1"] for r in rows)     # an invalid answer is a miss
    assert [(r["decoder"], r["batch"], r["tau"]) for r in rows] == [
        ("ar", 1, None), ("diffusion", 1, 1.0), ("diffusion", 1, 0.5),
        ("ar", 4, None), ("diffusion", 4, 1.0), ("diffusion", 4, 0.5)]
    assert all(r["graphs"] is False for r in rows)                  # CPU: graphs are off whatever cfg says
    assert [r["block_size"] for r in rows if r["decoder"] == "ar"] == [1, 1]
    json.dumps(speed_record(rows, "test device", {"torch": "x"}))     # serialisable as speed.json


def test_sub_block_settings_get_their_own_rows():
    FakeAR.base, CLOCK.now, FakeDiffusion.made = 10.0, 0.0, []
    cfg = BenchConfig(max_new=8, batches=(4,), taus=(1.0, 0.5), block_sizes=(4,), sub_blocks=(0, 2, 4), n_single=2,
                      repeats=1, warmup=0)
    rows = benchmark(torch.nn.Linear(2, 2), torch.arange(4)[:, None].repeat(1, 5), ROWS, ExampleSet(), cfg,
                     timer=CLOCK, ar_cls=FakeAR, diffusion_cls=FakeDiffusion, log=None)
    # a chunk as long as the block is the whole block: sub-block 4 of B = 4 is not a setting of its own
    assert [(r["tau"], r["sub_block"]) for r in rows] == [(None, None), (1.0, None), (0.5, None), (1.0, 2),
                                                          (0.5, 2)]
    assert FakeDiffusion.made == [(1.0, None), (0.5, None), (1.0, 2), (0.5, 2)]   # the decoder gets its sub-block


def test_serving_batch_arithmetic(rows):
    ar, d1, d05 = rows[3:]
    tokens = sum(LENGTHS)                                           # 26 tokens in the one batch of 4
    assert ar["latency_ms_per_request"] == 20.0                     # median of 30, 10, 20
    assert ar["tokens_per_s"] == pytest.approx(tokens / 0.020)
    assert ar["ms_per_forward"] == pytest.approx(20.0 / 8)
    assert ar["tokens_per_forward"] == 1.0
    assert d1["latency_ms_per_request"] == 8.0                      # 4 x tau 1.0 x median(3, 1, 2)
    assert d1["tokens_per_s"] == pytest.approx(tokens / 0.008)
    assert d1["ms_per_forward"] == pytest.approx(8.0 / 5)
    # rows need 2+1, 1+0, 2+0 and 3+3 steps for their tokens (blocks up to their <eos>)
    assert d1["tokens_per_forward"] == pytest.approx(26 / 12)
    assert d1["speedup_vs_ar"] == pytest.approx(2.5)
    assert d05["speedup_vs_ar"] == pytest.approx(5.0)
    for r in (ar, d1, d05):                                         # hits on rows 0 and 3; rows 0 and 1 valid
        assert r["recall@1"] == 0.5 and r["valid_rate"] == 0.5 and r["scored"] == 4


def test_a_partial_last_batch_is_filled_up_timed_and_scored_once():
    FakeAR.base, CLOCK.now = 10.0, 0.0
    cfg = BenchConfig(max_new=8, batches=(3,), taus=(1.0,), block_sizes=(4,), n_single=2, repeats=1, warmup=0)
    ar = benchmark(torch.nn.Linear(2, 2), torch.arange(4)[:, None].repeat(1, 5), ROWS, ExampleSet(), cfg,
                   timer=CLOCK, ar_cls=FakeAR, diffusion_cls=FakeDiffusion, log=None)[0]
    # batches [0, 1, 2] and [3, 0, 1]: calls cost 10 x 3 and 10 x 1 ms; every decoded row's tokens count
    assert ar["tokens_per_s"] == pytest.approx((7 + 5 + 6 + 8 + 7 + 5) / 0.040)
    assert ar["latency_ms_per_request"] == 20.0
    assert ar["scored"] == 4 and ar["recall@1"] == 0.5 and ar["valid_rate"] == 0.5     # prompts 0 and 1 once


def test_batch_one_arithmetic(rows):
    ar, d1, _ = rows[:3]
    # prompt 0: 10 ms base -> median 20; prompt 1: 20 ms base -> median 40
    assert ar["latency_ms_per_request"] == 30.0                     # median of the per-request medians
    assert ar["tokens_per_s"] == pytest.approx((7 + 5) / 0.060)
    assert ar["ms_per_forward"] == pytest.approx(60.0 / 16)
    assert d1["tokens_per_s"] == pytest.approx((7 + 5) / 0.016)
    assert d1["tokens_per_forward"] == pytest.approx(12 / 4)
    assert d1["speedup_vs_ar"] == pytest.approx(60 / 16)
    assert ar["recall@1"] == 0.5 and ar["valid_rate"] == 1.0        # scored on prompts 0 and 1 only
    assert ar["scored"] == 2


def test_no_prompts_is_a_clear_error():
    cfg = BenchConfig(max_new=8, batches=(4,), taus=(1.0,), block_sizes=(4,), n_prompts=0, repeats=1, warmup=0)
    with pytest.raises(ValueError, match="no prompts to benchmark"):
        benchmark(torch.nn.Linear(2, 2), torch.arange(4)[:, None].repeat(1, 5), ROWS, ExampleSet(), cfg,
                  timer=CLOCK, ar_cls=FakeAR, diffusion_cls=FakeDiffusion, log=None)


def test_groups():
    assert bench.prompt_groups(10, 1, 3) == [[0], [1], [2]]
    assert bench.prompt_groups(10, 4, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]  # every prompt, the last filled up
    assert bench.prompt_groups(8, 4, 3) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert bench.prompt_groups(3, 4, 3) == [[0, 1, 2, 0]]                  # too few prompts: cycled into one batch


def test_speedup_vs_length():
    FakeAR.base, CLOCK.now = 12.0, 0.0
    res = speedup_vs_length(torch.nn.Linear(2, 2), torch.zeros(4, 5, dtype=torch.long), block_size=4,
                            mask_id=MASK_ID, eos_id=EOS_ID, tau=0.5, max_blocks=2, batch=1, repeats=3, warmup=0,
                            timer=CLOCK, ar_cls=FakeAR, diffusion_cls=FakeDiffusion)
    assert [r["blocks"] for r in res] == [1, 2] and [r["tokens"] for r in res] == [4, 8]
    for r in res:                                                   # AR median 24 ms, diffusion median 4 ms
        assert r["ar_ms"] == 24.0 and r["diffusion_ms"] == 4.0 and r["speedup"] == pytest.approx(6.0)
        assert r["ar_tokens_per_s"] == pytest.approx(r["tokens"] / 0.024)


def test_speed_record_shape():
    rec = speed_record([{"decoder": "ar"}], "NVIDIA H100 80GB HBM3", {"torch": "2.11", "transformers": "5.17"})
    assert rec == {"device": "NVIDIA H100 80GB HBM3", "versions": {"torch": "2.11", "transformers": "5.17"},
                   "rows": [{"decoder": "ar"}]}
    assert speed_record([], "cpu")["device"].startswith("cpu")      # a device is turned into its name


def test_wall_timer_measures_something():
    t = time_decoder(lambda: sum(range(1000)), repeats=2, warmup=1, device="cpu")
    assert t["ms"] >= 0 and len(t["all_ms"]) == 2 and t["result"] == 499500
    assert statistics.median(t["all_ms"]) == t["ms"]
