"""The speed-engineered decoders against the readable ones: the same tokens, token for token (CPU, float32).

The CUDA-graph path runs the very same step functions; on CPU ``graphs=True`` quietly means eager, and a GPU-only
test at the end checks that replayed graphs give the eager tokens.
"""
from __future__ import annotations

import pytest
import torch

from diffgr2_lite.ar import ar_decode
from diffgr2_lite.diffusion.sampler import diffusion_decode
from diffgr2_lite.fast import FastARDecoder, FastDiffusionDecoder, StaticKV, speed_model

torch.set_num_threads(1)       # a 32-wide model is slower on several contending threads than on one

from tiny import BOS, EOS, MASK, PAD, VOCAB, tiny_model  # noqa: F401
from tiny import random_prompt as _random_prompt
P, N = 7, 3


def random_prompt(n: int, seed: int) -> torch.Tensor:
    return _random_prompt(n, seed, P)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def prompts():
    return [random_prompt(N, seed) for seed in (1, 2, 3)]


# ----------------------------------------------------------------------------------------------- AR
@pytest.mark.parametrize("check_every", [1, 8])
def test_fast_ar_matches_ar_decode(model, prompts, check_every):
    dec = FastARDecoder(model, N, P, max_new=40, eos_id=EOS, graphs=False, check_every=check_every)
    for prompt in prompts:                             # one decoder, several requests: state and stale cache reset
        ref = ar_decode(model, prompt, 40, EOS)
        out = dec.decode(prompt)
        assert torch.equal(out["tokens"], ref["tokens"])
        if check_every == 1:                           # checking every step stops exactly where ar_decode does
            assert out["forwards"] == ref["forwards"]
        else:                                          # a few extra steps at most, never fewer
            assert ref["forwards"] <= out["forwards"] < ref["forwards"] + check_every


def test_fast_ar_rows_end_at_different_times(model, prompts):
    """The fixture really exercises ended rows (else the test above proves less than it claims)."""
    toks = ar_decode(model, torch.cat(prompts), 40, EOS)["tokens"]
    first_eos = [(r == EOS).nonzero()[0].item() if (r == EOS).any() else None for r in toks]
    assert len(set(first_eos)) > 2


def test_fast_ar_forced_length(model, prompts):
    dec = FastARDecoder(model, N, P, max_new=24, eos_id=EOS, graphs=True)   # graphs=True on CPU: eager, same code
    assert not dec.graphs
    out = dec.decode(prompts[0], max_new=17, stop_at_eos=False)
    assert out["tokens"].shape == (N, 17) and out["forwards"] == 16
    ref = ar_decode(model, prompts[0], 17, EOS)["tokens"]
    assert torch.equal(out["tokens"][:, :ref.shape[1]], ref)


def test_prompt_shape_is_checked(model, prompts):
    dec = FastARDecoder(model, N, P, max_new=4, eos_id=EOS, graphs=False)
    with pytest.raises(ValueError, match="static shapes"):
        dec.decode(prompts[0][:2])


# ----------------------------------------------------------------------------------------------- diffusion
@pytest.mark.parametrize("block_size,sub_block", [(4, None), (8, None), (8, 4)])
@pytest.mark.parametrize("tau", [1.0, 0.9, 0.5, 0.2, 0.0])
def test_fast_diffusion_matches_diffusion_decode(model, prompts, block_size, sub_block, tau):
    dec = FastDiffusionDecoder(model, N, P, max_blocks=6, block_size=block_size, mask_id=MASK, eos_id=EOS, tau=tau,
                               graphs=False, sub_block=sub_block)
    for prompt in prompts:
        ref = diffusion_decode(model, prompt, 6, block_size, MASK, EOS, tau=tau, fused=True, sub_block=sub_block)
        out = dec.decode(prompt)
        assert torch.equal(out["tokens"], ref.tokens)
        assert torch.equal(out["steps"], ref.steps)
        assert torch.equal(out["commit_step"], ref.commit_step)
        assert out["forwards"] == ref.forwards


def test_fast_diffusion_exercises_thresholds(model, prompts):
    """Low tau commits several tokens per step, tau 1 one per step: both regimes are really tested above."""
    hi = FastDiffusionDecoder(model, N, P, 6, 8, MASK, EOS, tau=1.0, graphs=False).decode(prompts[0])
    lo = FastDiffusionDecoder(model, N, P, 6, 8, MASK, EOS, tau=0.2, graphs=False).decode(prompts[0])
    assert hi["forwards"] > lo["forwards"]
    assert 1 in lo["steps"].tolist()[0] or 1 in lo["steps"].tolist()[1]


def test_fast_diffusion_block_size_1_is_fast_ar(model, prompts):
    ar = FastARDecoder(model, N, P, max_new=24, eos_id=EOS, graphs=False).decode(prompts[1])
    dif = FastDiffusionDecoder(model, N, P, 24, 1, MASK, EOS, tau=0.9, graphs=False).decode(prompts[1])
    assert torch.equal(dif["tokens"], ar["tokens"])


def test_fast_diffusion_forced_length(model, prompts):
    dec = FastDiffusionDecoder(model, N, P, 6, 4, MASK, EOS, tau=0.5, graphs=False)
    out = dec.decode(prompts[2], max_blocks=5, stop_at_eos=False)
    assert out["tokens"].shape == (N, 20) and out["steps"].shape == (N, 5)
    assert (out["steps"] >= 1).all()                   # no row is pre-filled with <eos>: every block is decoded
    assert out["forwards"] == int(out["steps"].max(0).values.sum())


# ----------------------------------------------------------------------------------------------- the static cache
def test_static_kv_seek_overwrites_instead_of_appending(model):
    """Write a wrong block, seek back, write the right one: the cache equals one written right the first time."""
    from transformers import DynamicCache

    from diffgr2_lite.model import cache_kwargs

    L, n = 32, 2
    ids = random_prompt(n, 5)
    wrong = torch.randint(5, VOCAB, (n, 3), generator=torch.Generator().manual_seed(9))
    right = torch.randint(5, VOCAB, (n, 3), generator=torch.Generator().manual_seed(10))
    key = torch.arange(L)

    def run(kv, q, start):
        pos = (start + torch.arange(q.shape[1]))[None].expand(n, -1)
        mask = (key[None] <= pos[0][:, None])[None, None].expand(n, 1, q.shape[1], L)
        return model(input_ids=q, position_ids=pos, attention_mask=mask, **cache_kwargs(model, kv.cache)).logits

    kv = StaticKV(model, n, L)
    assert kv.position() == 0
    with torch.no_grad():
        run(kv, ids, 0)
        assert kv.position() == P                      # StaticCache advances its own write position...
        run(kv, wrong, P)
        assert kv.position() == P + 3
        kv.seek(P)                                     # ...which seek rewinds (int) ...
        run(kv, right, P)
        kv.seek(torch.tensor(P + 3))                   # ... or sets from a tensor (what a graph does)
        assert kv.position() == P + 3
        nxt = torch.full((n, 1), 7)
        got = run(kv, nxt, P + 3)[:, -1]
        dyn = DynamicCache()
        full = torch.cat([ids, right, nxt], 1)
        want = model(input_ids=full, **cache_kwargs(model, dyn)).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for layer in kv.layers:                            # the wrong block's keys are gone: positions P..P+2 rewritten
        assert layer.keys.shape[2] == L


def test_speed_model_casts_weights_not_rotary_buffers(model):
    m = speed_model(model, "cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.model.rotary_emb.inv_freq.dtype == torch.float32
    assert next(model.parameters()).dtype == torch.float32          # the original is untouched


# ----------------------------------------------------------------------------------------------- GPU only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_give_the_eager_tokens(model, prompts):
    m = model.to("cuda")
    try:
        for prompt in prompts:
            p = prompt.cuda()
            ref_ar = ar_decode(m, p, 40, EOS)["tokens"]
            ar = FastARDecoder(m, N, P, 40, EOS, graphs=True)
            assert ar.graphs
            assert torch.equal(ar.decode(p)["tokens"], ref_ar)
            assert torch.equal(ar.decode(p)["tokens"], ref_ar)              # replayed twice
            for B, tau in [(4, 0.5), (8, 0.9), (8, 0.2)]:
                ref = diffusion_decode(m, p, 6, B, MASK, EOS, tau=tau)
                dec = FastDiffusionDecoder(m, N, P, 6, B, MASK, EOS, tau=tau, graphs=True)
                for _ in range(2):
                    out = dec.decode(p)
                    assert torch.equal(out["tokens"], ref.tokens)
                    assert torch.equal(out["steps"], ref.steps)
                    assert out["forwards"] == ref.forwards
    finally:
        model.to("cpu")


def test_step_graph_capture_holds_the_garbage_collector(monkeypatch):
    """Freeing an unreachable earlier CUDA graph during a capture aborts the capture (seen in a full run on an H200),
    so capture collects garbage first and keeps the collector off until the capture ends, even if it fails."""
    import contextlib
    import gc

    import torch

    from diffgr2_lite.fast import StepGraph

    seen = []

    class FakeStream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())

    def step():
        seen.append(gc.isenabled())

    assert gc.isenabled()
    g = StepGraph(step, enabled=True)
    g.capture(lambda: None, warmup=2)
    assert seen == [True, True, False]              # two warm-up runs with the collector on, the capture without
    assert gc.isenabled() and g.graph is not None

    def failing():
        if len(seen) > 3:
            raise RuntimeError("capture failed")
        seen.append(gc.isenabled())

    with pytest.raises(RuntimeError):
        StepGraph(failing, enabled=True).capture(lambda: None, warmup=1)
    assert gc.isenabled()


def test_a_decoder_is_freed_when_its_last_user_drops_it(model, prompts):
    """Its step graphs hold the decoder's methods weakly: no reference cycle keeps the static cache (and, on a GPU,
    the graphs' memory) alive until a garbage collection."""
    import gc
    import weakref

    gc.disable()
    try:
        for build in (lambda: FastARDecoder(model, N, P, max_new=8, eos_id=EOS),
                      lambda: FastDiffusionDecoder(model, N, P, max_blocks=2, block_size=4, mask_id=MASK, eos_id=EOS)):
            dec = build()
            dec.decode(prompts[0])
            ref = weakref.ref(dec)
            del dec
            assert ref() is None
    finally:
        gc.enable()
