"""Masked (absorbing-state) block diffusion: noising, view logits with the AR token shift, and the training loss.

Noising, per completion block: draw a mask ratio t ~ U(0, 1), replace each token by ``<mask>`` with probability t.
The *complementary* view masks exactly the other tokens (Fast-dLLM v2), so every token is a prediction target exactly
once per pair of views. That is why the loss below needs no 1/t weight: the usual ELBO weight 1/t compensates for a
token being masked with probability t, and a complementary pair masks each token with probability 1. The loss is

    L = sum_{masked i} w_i * CE(p_theta(x_i | canvas of its block, clean earlier blocks), x_i) / sum_{masked i} w_i

with w_i = lambda_r on reasoning tokens and lambda_o on answer tokens (GR2's weights). The prompt is never noised.

**Token shift.** As in the AR model, the logits of position i-1 predict token i. For the first token of a block the
predicting position is the last token of the previous (clean) block, so it comes from the clean stream; the others
come from the view. Forgetting this throws away the AR initialisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import to_4d, view_mask, view_positions


def view_hidden(model, prompt: torch.Tensor, completion: torch.Tensor, views: torch.Tensor, view_blocks: torch.Tensor,
                block_size: int) -> torch.Tensor:
    """Hidden states that predict every token of every view: [N, V, B, H] (token shift applied).

    ``views`` [N, V, B] are canvases (tokens or ``<mask>``) of the completion blocks ``view_blocks`` [V].
    """
    n, p = prompt.shape
    c, (V, B) = completion.shape[1], views.shape[1:]
    ids = torch.cat([prompt, completion, views.flatten(1)], 1)
    mask = to_4d(view_mask(p, c, B, view_blocks).to(prompt.device), n)
    pos = view_positions(p, c, B, view_blocks).to(prompt.device)[None].expand(n, -1)
    h = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    L = p + c
    first = h[:, p + view_blocks.to(prompt.device) * B - 1]                     # [N, V, H]: clean position before block
    rest = h[:, L:].view(n, V, B, -1)[:, :, :B - 1]                            # view offsets 0..B-2
    return torch.cat([first[:, :, None], rest], 2)


def noise_blocks(completion: torch.Tensor, block_size: int, mask_id: int, generator=None,
                 complementary: bool = True, t_min: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views for every block: (views [N, V, B], masked [N, V, B] bool, view_blocks [V]).

    One view per block with ratio t ~ U(t_min, 1); with ``complementary`` a second view per block masking the rest.
    """
    n, c = completion.shape
    nb = c // block_size
    blocks = completion.view(n, nb, block_size)
    t = t_min + (1 - t_min) * _rand((n, nb, 1), generator, completion.device)
    masked = _rand((n, nb, block_size), generator, completion.device) < t
    view_blocks = torch.arange(nb, device=completion.device)
    if complementary:
        masked = torch.cat([masked, ~masked], 1)
        blocks = torch.cat([blocks, blocks], 1)
        view_blocks = torch.cat([view_blocks, view_blocks])
    views = torch.where(masked, torch.full_like(blocks, mask_id), blocks)
    return views, masked, view_blocks


def _rand(shape, generator, device) -> torch.Tensor:
    """``torch.rand``; without a generator argument when there is none (torch.compile with dynamic shapes refuses
    an explicit ``generator=None``)."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=device)


def diffusion_weights(batch, block_size: int) -> torch.Tensor:
    """Per-token weights for diffusion: the AR weights, plus the ``<eos>`` fill of the block holding the first end.

    Whole blocks after the end carry no weight (they are never decoded: decoding stops after the ending block).
    The fill takes the answer weight (lambda_o; 1 when no row has an answer). Device ops only: no value is read back.
    """
    w = batch.weight.clone()
    c = w.shape[1]
    pos = torch.arange(c, device=w.device)[None]
    end_block = (batch.length[:, None] + block_size - 1) // block_size * block_size
    fill = (pos >= batch.length[:, None]) & (pos < end_block)
    lam_o = torch.where(batch.is_answer, batch.weight, torch.zeros_like(batch.weight)).amax()
    lam_o = torch.where(batch.is_answer.any(), lam_o, torch.ones_like(lam_o))
    return torch.where(fill, lam_o.to(w.dtype), w)


def masked_diffusion_terms(model, batch, block_size: int, mask_id: int, generator=None, complementary: bool = True,
                           extra_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The CFT objective as (sum of w_i * CE_i over masked tokens, sum of their w_i): the loss is their ratio.

    With complementary views every token is masked in exactly one view of its pair, so each token is scored once,
    from the view that masked it: the output layer runs on [N, C] positions, a fixed shape (no boolean selection, so
    no host sync and nothing for ``torch.compile`` to break on). Without, view v's unmasked tokens get weight 0.
    """
    comp = batch.completion
    n, c = comp.shape
    nb = c // block_size
    views, masked, view_blocks = noise_blocks(comp, block_size, mask_id, generator, complementary)
    if extra_mask is not None:
        em = extra_mask.view(n, nb, block_size)
        masked[:, :nb] |= em
        if complementary:
            masked[:, nb:] &= ~em
        views = torch.where(masked, torch.full_like(views, mask_id),
                            comp.view(n, nb, block_size).repeat(1, masked.shape[1] // nb, 1))
    h = view_hidden(model, batch.prompt, comp, views, view_blocks, block_size)       # [N, V, B, H]
    w = diffusion_weights(batch, block_size)
    if complementary:                           # views 0..nb-1: the blocks in order; nb..2nb-1: their complements
        h = torch.where(masked[:, :nb, :, None], h[:, :nb], h[:, nb:])
    else:
        w = w * masked.reshape(n, c)
    logits = model.lm_head(h.reshape(n, c, -1))
    ce = F.cross_entropy(logits.float().flatten(0, 1), comp.flatten(), reduction="none").view(n, c)
    return (ce * w).sum(), w.sum()


def masked_diffusion_loss(model, batch, block_size: int, mask_id: int, generator=None, complementary: bool = True,
                          extra_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The CFT objective on a :class:`~diffgr2_lite.batches.Batch` (completion length a multiple of the block size).

    ``extra_mask`` [N, C] (optional) forces positions to be masked in the first view (e.g. the whole answer).
    """
    total, w = masked_diffusion_terms(model, batch, block_size, mask_id, generator, complementary, extra_mask)
    return total / w.clamp(min=1e-8)
