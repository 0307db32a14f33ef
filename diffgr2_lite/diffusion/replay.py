"""Trajectory replay: the likelihood the block-diffusion decoder *really* had for every token it committed.

OPD and RL both need, for each committed token x_i, the policy's distribution at the moment it was chosen. The
decoder (:func:`~diffgr2_lite.diffusion.sampler.diffusion_decode`) commits a block over several steps; at step k of
block b it sees

* the prompt and the *final* tokens of blocks < b (from the KV cache, written block-causally), and
* the canvas of block b at step k: the tokens committed at steps < k, ``<mask>`` everywhere else,

and position i is predicted from hidden state i-1 (the AR token shift; the first position of a block from the last
position of the previous, clean block). Replay rebuilds exactly that: for every (block, step) it builds the canvas with
:func:`~diffgr2_lite.diffusion.sampler.rebuild_canvas` and scores it as one *view* of the training layout
(:func:`~diffgr2_lite.diffusion.objective.view_hidden`: clean sequence + views, same block-causal attention, same
positions, same token shift). A token committed at step k takes its logits from view (b, k). Many views share one
forward; views are processed in chunks (``max_views_per_chunk``) to bound memory.

**Why one fully-masked pass is not the policy's likelihood.** Scoring every block once with all of its positions
masked (the "masked" view, :func:`masked_hidden`) gives p(x_i | nothing of block b yet). That is the policy's
distribution only for tokens committed at step 0. A token committed at step 3 was chosen while it could see what
steps 0-2 had written into its block: its real distribution conditions on those tokens (this is how a parallel
decoder avoids writing the same SID twice). With tau = 1.0 and a 32-token block, almost every token is committed
after step 0, so the masked pass is the likelihood of a decoder that was never run: the policy-gradient ratio and
the OPD student distribution would be computed for the wrong policy. (TraceRL makes the same point.)

Caveat kept explicit: the decoder also *chooses which positions* to commit (threshold tau, plus the most confident
one). That choice depends on the sampled values and is not a differentiable part of the likelihood; like TraceRL we
treat each committed token's probability at its commit step as the policy's action probability.

Validity: a row's completion ends at its first ``<eos>``; the decoder finishes that block and never runs later blocks
for the row (their ``steps`` are 0). So the positions that carry a likelihood are exactly the blocks with
``steps > 0`` = the blocks up to and including the one holding the first ``<eos>`` (:func:`valid_positions`).
"""
from __future__ import annotations

import torch

from .masks import block_causal_mask, to_4d
from .objective import view_hidden
from .sampler import DecodeResult, rebuild_canvas


# ----------------------------------------------------------------------------------------------- bookkeeping
def valid_positions(steps: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, C] bool: positions inside blocks the decoder actually ran for the row (``steps > 0``).

    For a :class:`DecodeResult` this equals "blocks up to and including the block holding the first ``<eos>``"
    (see :func:`valid_from_tokens`, which the tests check it against).
    """
    return (steps > 0).repeat_interleave(block_size, dim=1)


def first_eos(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[N] index of each row's first ``<eos>`` (C when there is none)."""
    is_eos = tokens == eos_id
    c = tokens.shape[1]
    idx = torch.arange(c, device=tokens.device).expand_as(tokens)
    return torch.where(is_eos, idx, torch.full_like(idx, c)).min(1).values


def valid_from_tokens(tokens: torch.Tensor, block_size: int, eos_id: int) -> torch.Tensor:
    """[N, C] bool: blocks up to and including the block of the first ``<eos>`` (every block when there is none)."""
    end_block = first_eos(tokens, eos_id).clamp(max=tokens.shape[1] - 1) // block_size
    blk = torch.arange(tokens.shape[1], device=tokens.device) // block_size
    return blk[None, :] <= end_block[:, None]


def select_rows(result: DecodeResult, rows) -> DecodeResult:
    """The rollouts ``rows`` (slice, index tensor or list) of a :class:`DecodeResult` (for micro-batching)."""
    return DecodeResult(result.tokens[rows], result.commit_step[rows], result.steps[rows], result.forwards,
                        result.block_size)


def view_plan(steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The views replay needs: (view_block [V], view_step [V], first view of each block [nb]).

    Rows decode a block in lock step, so one view per (block, step) serves every row; block b gets
    K_b = max over rows of its step count (rows that finished the block earlier simply commit nothing there).
    """
    k = steps.max(0).values                                                 # [nb]
    nb = k.shape[0]
    view_block = torch.repeat_interleave(torch.arange(nb, device=steps.device), k)
    offset = torch.cumsum(k, 0) - k
    view_step = torch.arange(int(k.sum()), device=steps.device) - torch.repeat_interleave(offset, k)
    return view_block, view_step, offset


# ----------------------------------------------------------------------------------------------- replay
def default_views_per_chunk(device) -> int:
    """Views per forward when not given: 64 on a GPU, 16 on a CPU.

    A chunk of v views costs attention over (P + C + v*B) tokens, quadratic in v, while each view needs only its
    own block and the clean prefix; the clean sequence is recomputed once per chunk. Measured on the full profile's
    model size (H100, bf16, 16 rollouts a micro-batch): 64 views 1.4 s, 16 views 2.9 s per OPD step of 64 rollouts;
    on two CPU cores the smaller chunks win (less wasted attention, nothing to parallelise).
    """
    return 64 if torch.device(device).type == "cuda" else 16


def _chunks(view_block: torch.Tensor, max_views: int | None):
    """Consecutive view ranges of at most ``max_views`` views (views are sorted by block)."""
    max_views = max_views or default_views_per_chunk(view_block.device)
    v = view_block.shape[0]
    for s in range(0, v, max(1, max_views)):
        yield s, min(v, s + max(1, max_views))


def replay_hidden(model, prompt: torch.Tensor, tokens: torch.Tensor, commit_step: torch.Tensor, steps: torch.Tensor,
                  block_size: int, mask_id: int, max_views_per_chunk: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [N, C, H], valid [N, C]): the hidden state that predicted each committed token at its commit step.

    Invalid positions hold zeros. Differentiable when called with grad enabled (chunking then bounds the size of
    each forward, not the activations kept for backward: micro-batch rows for that).
    """
    n, c = tokens.shape
    B = block_size
    nb = c // B
    if nb * B != c or steps.shape != (n, nb):
        raise ValueError(f"tokens {tuple(tokens.shape)} and steps {tuple(steps.shape)} do not match block size {B}")
    valid = valid_positions(steps, B)
    view_block, view_step, offset = view_plan(steps)
    blk = torch.arange(c, device=tokens.device) // B
    view_of = offset[blk][None, :] + commit_step                            # [N, C] view that committed each token
    tok_blocks = tokens.view(n, nb, B)
    cs_blocks = commit_step.view(n, nb, B)
    rows, cols, vals = [], [], []
    for s, e in _chunks(view_block, max_views_per_chunk):
        vb, vs = view_block[s:e], view_step[s:e]
        views = rebuild_canvas(tok_blocks[:, vb], cs_blocks[:, vb], vs[None, :, None], mask_id)   # [N, v, B]
        upto = int(vb.max()) * B                                            # clean blocks the chunk can see
        h = view_hidden(model, prompt, tokens[:, :upto], views, vb, B)       # [N, v, B, H]
        sel = valid & (view_of >= s) & (view_of < e)
        r, cc = sel.nonzero(as_tuple=True)
        rows.append(r)
        cols.append(cc)
        vals.append(h[r, view_of[r, cc] - s, cc % B])
    if not vals:                                                            # nothing decoded at all
        hidden = torch.zeros(n, c, model.config.hidden_size, device=tokens.device)
        return hidden, valid
    vals = torch.cat(vals)
    hidden = vals.new_zeros(n, c, vals.shape[-1]).index_put((torch.cat(rows), torch.cat(cols)), vals)
    return hidden, valid


def masked_hidden(model, prompt: torch.Tensor, tokens: torch.Tensor, block_size: int, mask_id: int,
                  max_views_per_chunk: int | None = None) -> torch.Tensor:
    """[N, C, H]: every block scored once from a fully-masked canvas (clean earlier blocks as context).

    The contrast to replay: this is the policy's distribution only for tokens committed at step 0 (see the module
    docstring). It is what the CFT objective sees at mask ratio 1.
    """
    n, c = tokens.shape
    B = block_size
    nb = c // B
    blocks = torch.arange(nb, device=tokens.device)
    out = []
    for s, e in _chunks(blocks, max_views_per_chunk):
        vb = blocks[s:e]
        views = torch.full((n, e - s, B), mask_id, dtype=tokens.dtype, device=tokens.device)
        out.append(view_hidden(model, prompt, tokens[:, :int(vb.max()) * B], views, vb, B).flatten(1, 2))
    return torch.cat(out, 1)


def replay_logits(model, prompt: torch.Tensor, tokens: torch.Tensor, commit_step: torch.Tensor, steps: torch.Tensor,
                  block_size: int, mask_id: int, max_views_per_chunk: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C, V], valid [N, C]): the logits the decoder had for each committed token when it committed it.

    Full vocabulary at every position: fine for small models and tests; :func:`replay_logprobs` and
    :func:`replay_log_softmax` only send the positions they need through the output layer.
    """
    hidden, valid = replay_hidden(model, prompt, tokens, commit_step, steps, block_size, mask_id, max_views_per_chunk)
    return model.lm_head(hidden), valid


def _log_softmax(model, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = model.lm_head(hidden).float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, -1)


def replay_log_softmax(model, prompt: torch.Tensor, tokens: torch.Tensor, commit_step: torch.Tensor,
                       steps: torch.Tensor, block_size: int, mask_id: int, where: torch.Tensor | None = None,
                       max_views_per_chunk: int | None = None, temperature: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_probs [M, V] float32, where [N, C]): full log-softmax only at ``where & valid`` (row-major order).

    ``where`` defaults to every valid position. This is what OPD needs (a full-vocabulary KL at each committed
    position) without materialising [N, C, V] logits.
    """
    hidden, valid = replay_hidden(model, prompt, tokens, commit_step, steps, block_size, mask_id, max_views_per_chunk)
    where = valid if where is None else (where & valid)
    return _log_softmax(model, hidden[where], temperature), where


def replay_logprobs(model, prompt: torch.Tensor, tokens: torch.Tensor, commit_step: torch.Tensor, steps: torch.Tensor,
                    block_size: int, mask_id: int, max_views_per_chunk: int | None = None, temperature: float = 1.0,
                    position_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [N, C] float32, valid [N, C]): log-probability of each committed token under the decoding policy.

    ``temperature`` is the decoder's sampling temperature (a sampled decoder draws from softmax(logits / T)).
    Memory-lean: the output layer runs on ``position_chunk`` valid positions at a time and only the chosen
    token's log-probability is kept. Invalid positions hold 0.
    """
    hidden, valid = replay_hidden(model, prompt, tokens, commit_step, steps, block_size, mask_id, max_views_per_chunk)
    h = hidden[valid]
    tgt = tokens[valid]
    parts = [_log_softmax(model, h[i:i + position_chunk], temperature).gather(-1, tgt[i:i + position_chunk, None])[:, 0]
             for i in range(0, h.shape[0], position_chunk)]
    lp = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(tokens.shape, dtype=lp.dtype, device=tokens.device)
    return out.index_put(valid.nonzero(as_tuple=True), lp), valid


def replay_result_logprobs(model, prompt: torch.Tensor, result: DecodeResult, mask_id: int, **kw):
    """:func:`replay_logprobs` on a :class:`DecodeResult` (block size taken from it)."""
    return replay_logprobs(model, prompt, result.tokens, result.commit_step, result.steps, result.block_size,
                           mask_id, **kw)


# ----------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def stepwise_logits(model, prompt: torch.Tensor, tokens: torch.Tensor, commit_step: torch.Tensor, steps: torch.Tensor,
                    block_size: int, mask_id: int) -> torch.Tensor:
    """The slow, obviously-right reference: one single-stream forward per (block, step), as the decoder ran it.

    For block b at step k: input = prompt + final tokens of blocks < b + canvas(b, k), block-causal mask, absolute
    positions; position i's logits from position i-1. Returns [N, C, V] (zeros where invalid).
    """
    n, P = prompt.shape
    c = tokens.shape[1]
    B = block_size
    out = None
    valid = valid_positions(steps, B)
    for b in range(c // B):
        for k in range(int(steps[:, b].max())):
            blk = slice(b * B, (b + 1) * B)
            canvas = rebuild_canvas(tokens[:, blk], commit_step[:, blk], k, mask_id)
            ids = torch.cat([prompt, tokens[:, :b * B], canvas], 1)
            mask = to_4d(block_causal_mask(P, (b + 1) * B, B).to(prompt.device), n)
            pos = torch.arange(ids.shape[1], device=prompt.device)[None].expand(n, -1)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            pred = logits[:, P + b * B - 1:P + (b + 1) * B - 1]            # token shift
            if out is None:
                out = logits.new_zeros(n, c, logits.shape[-1])
            now = (commit_step[:, blk] == k) & valid[:, blk]
            out[:, blk] = torch.where(now[..., None], pred, out[:, blk])
    return out
