"""The masked block-diffusion objective: noising, the packed view layout against a per-view loop, the block-size-1
identity with the AR loss, and the <eos>-fill weights."""
from __future__ import annotations

import os

# One BLAS thread: on a small shared CPU box OpenBLAS's spinning threads make numpy's eigh (semantic IDs) 20x
# slower. Set before numpy is first imported (the first test module collected wins; it is a default only).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest
import torch
import torch.nn.functional as F

from diffgr2_lite.ar import sft_loss
from diffgr2_lite.batches import make_batch
from diffgr2_lite.diffusion.masks import block_causal_mask, to_4d
from diffgr2_lite.diffusion.objective import diffusion_weights, masked_diffusion_loss, noise_blocks, view_hidden
from diffgr2_lite.text import MASK, build_vocabulary, encode, make_tokenizer

torch.set_num_threads(1)

WORDS = "step1 history items brands last pick next+ brand+ ; . : x1 x2"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(build_vocabulary([WORDS], (3, 3, 2)))


def tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=0.3, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok.get_vocab()))


PROMPTS = [
    "<bos> <user> history : <a_0> <b_1> <c_0> brands ; candidates : <a_1> <b_2> <c_1> ; <assistant>",
    "<bos> <user> history : <a_2> <b_0> <c_1> last ; candidates : <a_0> <b_0> <c_0> ; <assistant>",
    "<bos> <user> history : <a_1> <b_1> <c_1> pick ; candidates : <a_2> <b_2> <c_0> ; <assistant>",
]
COMPLETIONS = [
    "<think> step1 history x1 ; last pick . </think> <answer> <a_1> <b_2> <c_1> <a_0> <b_0> <c_0> </answer> <eos>",
    "<think> brands x2 . </think> <answer> <a_0> <b_0> <c_0> <a_1> <b_2> <c_1> </answer> <eos>",
    "<answer> <a_2> <b_2> <c_0> <a_0> <b_1> <c_1> </answer> <eos>",
]


def batch_of(tok, block_size: int, lambda_r: float = 0.5, lambda_o: float = 1.0, min_len: int = 0):
    rows = [{"prompt_ids": p, "completion_ids": c}
            for p, c in zip(encode(tok, PROMPTS), encode(tok, COMPLETIONS))]
    return make_batch(rows, tok, lambda_r=lambda_r, lambda_o=lambda_o, multiple_of=block_size, min_len=min_len)


# ----------------------------------------------------------------------------------------------- noising
@pytest.mark.parametrize("B", [1, 3, 4, 8])
def test_noise_blocks_complementary_views_partition_each_block(B):
    g = torch.Generator().manual_seed(B)
    comp = torch.randint(10, 40, (5, 4 * B), generator=g)
    views, masked, vb = noise_blocks(comp, B, mask_id=4, generator=g)
    nb = comp.shape[1] // B
    assert views.shape == masked.shape == (5, 2 * nb, B)
    assert vb.tolist() == list(range(nb)) * 2
    first, second = masked[:, :nb], masked[:, nb:]
    assert torch.equal(first ^ second, torch.ones_like(first))        # each position masked in exactly one view
    clean = comp.view(5, nb, B).repeat(1, 2, 1)
    assert torch.equal(views, torch.where(masked, torch.full_like(clean, 4), clean))


def test_noise_blocks_not_complementary_and_t_min():
    g = torch.Generator().manual_seed(0)
    comp = torch.randint(10, 40, (4, 12), generator=g)
    views, masked, vb = noise_blocks(comp, 4, mask_id=4, generator=g, complementary=False)
    assert views.shape == (4, 3, 4) and vb.tolist() == [0, 1, 2]
    _, masked1, _ = noise_blocks(comp, 4, mask_id=4, generator=g, complementary=False, t_min=1.0)
    assert masked1.all()                                              # t = 1: every token masked


def test_noise_blocks_mask_ratio_is_uniform_per_block():
    # t ~ U(0, 1) per block: the masked share of a block averages 1/2 and varies from block to block
    g = torch.Generator().manual_seed(1)
    comp = torch.randint(10, 40, (400, 64), generator=g)
    _, masked, _ = noise_blocks(comp, 32, mask_id=4, generator=g, complementary=False)
    share = masked.float().mean(-1)
    assert abs(float(share.mean()) - 0.5) < 0.05
    assert float(share.std()) > 0.2                                   # U(0,1) has std 0.29; a fixed ratio has ~0.09
    assert float(share.min()) < 0.1 and float(share.max()) > 0.9


def test_noise_blocks_is_deterministic_by_generator():
    comp = torch.arange(24).view(2, 12) + 10
    a = noise_blocks(comp, 4, 4, torch.Generator().manual_seed(3))
    b = noise_blocks(comp, 4, 4, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_loss_never_noises_the_prompt_and_views_hold_clean_or_mask(tok, model):
    B = 4
    batch = batch_of(tok, B)
    mask_id = tok.convert_tokens_to_ids(MASK)
    seen = []
    h = model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    try:
        masked_diffusion_loss(model, batch, B, mask_id, generator=torch.Generator().manual_seed(0))
    finally:
        h.remove()
    (ids,) = seen
    n, P = batch.prompt.shape
    C = batch.completion.shape[1]
    assert torch.equal(ids[:, :P], batch.prompt)                     # the prompt, untouched
    assert torch.equal(ids[:, P:P + C], batch.completion)            # then the clean completion
    views, masked, vb = noise_blocks(batch.completion, B, mask_id, torch.Generator().manual_seed(0))
    assert torch.equal(ids[:, P + C:], views.flatten(1))             # then the views noise_blocks drew
    assert (ids[:, :P] != mask_id).all()


# ----------------------------------------------------------------------------------------------- the loss
def loop_reference(model, batch, B, views, masked, view_blocks, weights):
    """Per view, one plain forward of prompt + clean earlier blocks + the view, block-causal; CE on masked tokens."""
    n, P = batch.prompt.shape
    num, den = 0.0, 0.0
    for v, b in enumerate(view_blocks.tolist()):
        start = P + b * B
        x = torch.cat([batch.prompt, batch.completion[:, :b * B], views[:, v]], 1)
        mask = to_4d(block_causal_mask(P, (b + 1) * B, B), n)
        logits = model(input_ids=x, attention_mask=mask).logits[:, start - 1:start + B - 1].float()
        target = batch.completion[:, b * B:(b + 1) * B]
        w = weights[:, b * B:(b + 1) * B] * masked[:, v].float()
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(n, B)
        num = num + (ce * w).sum()
        den = den + w.sum()
    return num / den


@pytest.mark.parametrize("B", [2, 4, 8])
@pytest.mark.parametrize("complementary", [True, False])
def test_loss_matches_a_per_view_loop(tok, model, B, complementary):
    batch = batch_of(tok, B)
    mask_id = tok.convert_tokens_to_ids(MASK)
    with torch.no_grad():
        got = masked_diffusion_loss(model, batch, B, mask_id, torch.Generator().manual_seed(5), complementary)
        views, masked, vb = noise_blocks(batch.completion, B, mask_id, torch.Generator().manual_seed(5), complementary)
        ref = loop_reference(model, batch, B, views, masked, vb, diffusion_weights(batch, B))
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got, ref)


def test_loss_with_extra_mask_matches_a_per_view_loop(tok, model):
    B = 4
    batch = batch_of(tok, B)
    mask_id = tok.convert_tokens_to_ids(MASK)
    em = batch.is_answer.clone()                                       # force the whole answer into the first view
    with torch.no_grad():
        got = masked_diffusion_loss(model, batch, B, mask_id, torch.Generator().manual_seed(2), extra_mask=em)
        views, masked, vb = noise_blocks(batch.completion, B, mask_id, torch.Generator().manual_seed(2))
        n, C = batch.completion.shape
        nb = C // B
        emb = em.view(n, nb, B)
        masked[:, :nb] |= emb
        masked[:, nb:] &= ~emb
        clean = batch.completion.view(n, nb, B).repeat(1, 2, 1)
        views = torch.where(masked, torch.full_like(clean, mask_id), clean)
        ref = loop_reference(model, batch, B, views, masked, vb, diffusion_weights(batch, B))
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got, ref)


def test_loss_hand_case_with_known_logits(tok, model):
    """Swap the output layer for one with known logits (all zero): every scored token then costs log(V) whatever its
    weight, so the weighted mean is exactly log(V) (a normalisation by the count, not the weights, would not be)."""
    B = 4
    batch = batch_of(tok, B)
    V = len(tok.get_vocab())
    mask_id = tok.convert_tokens_to_ids(MASK)
    head = model.lm_head

    class Zero(torch.nn.Module):
        def forward(self, h):
            return torch.zeros(*h.shape[:-1], V)

    model.lm_head = Zero()
    try:
        loss = masked_diffusion_loss(model, batch, B, mask_id, torch.Generator().manual_seed(0))
    finally:
        model.lm_head = head
    assert abs(float(loss) - float(torch.log(torch.tensor(float(V))))) < 1e-5


def test_view_hidden_shapes_and_token_shift(tok, model):
    # the first token of a block is predicted by the clean position before it; the others by the view
    B = 4
    batch = batch_of(tok, B)
    n, P = batch.prompt.shape
    C = batch.completion.shape[1]
    mask_id = tok.convert_tokens_to_ids(MASK)
    vb = torch.tensor([1, 0])
    views = torch.full((n, 2, B), mask_id)
    with torch.no_grad():
        h = view_hidden(model, batch.prompt, batch.completion, views, vb, B)
        full = model.model(input_ids=torch.cat([batch.prompt, batch.completion], 1),
                           attention_mask=to_4d(block_causal_mask(P, C, B), n)).last_hidden_state
    assert h.shape == (n, 2, B, 32)
    assert torch.allclose(h[:, 0, 0], full[:, P + B - 1], atol=1e-5)     # block 1: last clean token of block 0
    assert torch.allclose(h[:, 1, 0], full[:, P - 1], atol=1e-5)         # block 0: last prompt token


# ----------------------------------------------------------------------------------------------- B = 1 is AR
@pytest.mark.parametrize("lambdas", [(1.0, 1.0), (0.5, 1.0), (0.2, 2.0)])
def test_block_size_one_all_masked_equals_ar_loss(tok, model, lambdas):
    lambda_r, lambda_o = lambdas
    batch = batch_of(tok, 1, lambda_r, lambda_o)
    mask_id = tok.convert_tokens_to_ids(MASK)
    with torch.no_grad():
        ar = sft_loss(model, batch)
        every = torch.ones_like(batch.completion, dtype=torch.bool)
        # one view per block, every token masked (t = 1): forced through extra_mask
        d1 = masked_diffusion_loss(model, batch, 1, mask_id, torch.Generator().manual_seed(0), complementary=False,
                                   extra_mask=every)
        # a complementary pair masks every token exactly once too
        d2 = masked_diffusion_loss(model, batch, 1, mask_id, torch.Generator().manual_seed(1))
        # and directly through view_hidden: all-mask views of every block
        n, C = batch.completion.shape
        h = view_hidden(model, batch.prompt, batch.completion, torch.full((n, C, 1), mask_id), torch.arange(C), 1)
        logits = model.lm_head(h[:, :, 0]).float()
        w = batch.weight
        ce = F.cross_entropy(logits.flatten(0, 1), batch.completion.flatten(), reduction="none").view_as(w)
        d3 = (ce * w).sum() / w.sum()
    assert torch.allclose(d1, ar, atol=1e-5, rtol=1e-5), (d1, ar)
    assert torch.allclose(d2, ar, atol=1e-5, rtol=1e-5), (d2, ar)
    assert torch.allclose(d3, ar, atol=1e-5, rtol=1e-5), (d3, ar)


def test_block_size_four_is_not_the_ar_loss(tok, model):
    # sharpness of the identity above: with larger blocks the views see less context and the losses differ
    batch = batch_of(tok, 4)
    mask_id = tok.convert_tokens_to_ids(MASK)
    with torch.no_grad():
        ar = sft_loss(model, batch)
        d = masked_diffusion_loss(model, batch, 4, mask_id, torch.Generator().manual_seed(0), complementary=False,
                                  extra_mask=torch.ones_like(batch.completion, dtype=torch.bool))
    assert abs(float(d) - float(ar)) > 1e-3


def test_loss_has_gradients(tok):
    model = tiny_model(len(tok.get_vocab()), seed=1).train()
    batch = batch_of(tok, 4)
    loss = masked_diffusion_loss(model, batch, 4, tok.convert_tokens_to_ids(MASK), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("B", [1, 4, 5, 8])
def test_diffusion_weights_fill_only_the_ending_block(tok, B):
    lambda_r, lambda_o = 0.5, 2.0
    batch = batch_of(tok, B, lambda_r, lambda_o, min_len=40)   # long enough for whole <eos> blocks after the end
    w = diffusion_weights(batch, B)
    n, C = w.shape
    assert C % B == 0
    eos = tok.eos_token_id
    for i in range(n):
        comp = batch.completion[i].tolist()
        length = comp.index(eos) + 1
        end_block = -(-length // B) * B
        for j in range(C):
            if j < length:
                expected = float(batch.weight[i, j])                 # the AR weights, unchanged
            elif j < end_block:
                expected = lambda_o                                  # the <eos> fill of the ending block
                assert comp[j] == eos
            else:
                expected = 0.0                                       # whole blocks after the end: nothing
            assert float(w[i, j]) == pytest.approx(expected), (i, j, B)
        assert float(w[i, length:end_block].sum()) == pytest.approx(lambda_o * (end_block - length))
    assert (w[:, :batch.length.min()] == batch.weight[:, :batch.length.min()]).all()
    # at least one row really has a fill (otherwise the test would be vacuous) unless B == 1
    if B > 1:
        assert any((-(-int(L) // B) * B) > int(L) for L in batch.length)
