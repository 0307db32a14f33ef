"""Block-causal attention masks (True = may attend), built as plain tensors you can print and plot.

Give every position a *block id*: each prompt token is its own block (the prompt stays causal, exactly as the AR
model saw it), and completion position i gets ``P + (i - P) // B``. Then::

    query q may attend key k   <=>   block_id(k) <= block_id(q)

Bidirectional inside a completion block, causal across blocks; with B = 1 every block is one token and the mask is
the ordinary causal mask, which is why block size 1 *is* AR decoding.

For training, each block must be denoised while seeing the *clean* earlier blocks, not their noisy versions. The
layout puts the clean sequence first and then one or more *views*: a view is the (noisy) canvas of one completion
block. A view's queries see the clean keys of earlier blocks and the keys of their own view, nothing else; clean
queries never see any view. One forward then scores every block (or, for trajectory replay, every decoding step).
"""
from __future__ import annotations

import torch


def block_ids(prompt_len: int, completion_len: int, block_size: int, device=None) -> torch.Tensor:
    pos = torch.arange(prompt_len + completion_len, device=device)
    comp = prompt_len + (pos - prompt_len) // block_size                   # (prompt positions: replaced below)
    return torch.where(pos < prompt_len, pos, comp)


def block_causal_mask(prompt_len: int, completion_len: int, block_size: int) -> torch.Tensor:
    """[L, L] bool mask of the single-stream (inference) layout."""
    ids = block_ids(prompt_len, completion_len, block_size)
    return ids[None, :] <= ids[:, None]


def view_mask(prompt_len: int, completion_len: int, block_size: int, view_blocks: torch.Tensor) -> torch.Tensor:
    """[L + V*B, L + V*B] bool mask of the clean sequence followed by V views (view v is a canvas of block view_blocks[v]).

    * clean -> clean: the block-causal mask;
    * view v -> clean key k: k's block is earlier than the view's block (the prompt and finished blocks);
    * view v -> view w: only w == v (bidirectional inside the view);
    * clean -> view: never.
    """
    L, B = prompt_len + completion_len, block_size
    view_blocks = torch.as_tensor(view_blocks)                              # built where view_blocks lives
    dev, V = view_blocks.device, len(view_blocks)
    ids = block_ids(prompt_len, completion_len, block_size, dev)
    view_block_id = prompt_len + view_blocks.long()                         # block id of each view's block
    q_view = view_block_id.repeat_interleave(B)                             # [V*B]
    view_of = torch.arange(V, device=dev).repeat_interleave(B)
    top = torch.cat([ids[None, :] <= ids[:, None], torch.zeros(L, V * B, dtype=torch.bool, device=dev)], 1)
    bottom = torch.cat([ids[None, :] < q_view[:, None], view_of[None, :] == view_of[:, None]], 1)
    return torch.cat([top, bottom], 0)


def view_positions(prompt_len: int, completion_len: int, block_size: int, view_blocks: torch.Tensor) -> torch.Tensor:
    """Absolute position ids of the clean sequence followed by the views (a view reuses its block's positions)."""
    view_blocks = torch.as_tensor(view_blocks)
    clean = torch.arange(prompt_len + completion_len, device=view_blocks.device)
    offs = torch.arange(block_size, device=view_blocks.device)
    views = (prompt_len + view_blocks.long()[:, None] * block_size + offs[None, :]).flatten()
    return torch.cat([clean, views])


def to_4d(mask: torch.Tensor, batch: int = 1) -> torch.Tensor:
    """[Lq, Lk] -> [batch, 1, Lq, Lk], the shape transformers accepts as a custom attention mask."""
    return mask[None, None].expand(batch, 1, *mask.shape)
