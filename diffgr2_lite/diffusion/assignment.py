"""An *external* constrained decoder for the answer: maximum-weight assignment of candidates to answer slots.

This is the "external machinery" Diffusion-GR2 considered and rejected, kept here as the contrast that CFT removes.
An AR decoder can keep its answer a permutation by masking used SIDs left to right (:class:`ar.AnswerConstraint`);
a parallel decoder writes the answer positions simultaneously, so left-to-right masking does not apply. What one can
do instead, *after* a normal diffusion decode:

1. find the answer span: the (last) ``<answer>`` token before the end; without one, right after ``</think>``;
   without that, at the first ``<eos>`` (everything before it is treated as reasoning); with neither, at the start
   of the last block(s) that can hold the answer;
2. mask the whole answer (every position after ``<answer>``) and run **one block-causal forward** of prompt + this
   canvas: each answer block is scored as one view, seeing the clean reasoning before it and the (masked) earlier
   answer blocks, under the inference attention mask and the AR token shift;
3. score candidate k in slot s as log p(label k at slot s) plus the sum over its code levels l of
   log p(code_{k,l} at slot s, level l) (independent per-position marginals: all the model can give in one parallel
   pass);
4. solve the maximum-weight assignment of the 10 candidates to the 10 slots (the Hungarian algorithm below) and
   write the assigned items (label and SID) back, followed by ``</answer> <eos>``.

The output always parses as a valid permutation, whatever the model. But the machinery lives outside the model:
it needs the candidate list at decode time, a second scoring pass, and an O(n^3) solver; the reasoning the model
wrote never gets to shape the answer it would have written. CFT instead teaches the model itself to emit valid
permutations, which is why the paper drops this.

If the chosen span does not fit in the decoded tokens, the returned tensor is longer (whole blocks of ``<eos>``
appended); otherwise it has the input's shape.
"""
from __future__ import annotations

import numpy as np
import torch

from ..text import ANSWER, END_ANSWER, END_THINK, SPECIAL_TOKENS
from .masks import block_causal_mask, to_4d


# ----------------------------------------------------------------------------------------------- Hungarian
def hungarian(cost) -> np.ndarray:
    """Minimum-cost assignment of rows to columns (``cost`` [n, m], n <= m): ``assignment[row] = column``.

    The O(n^2 m) shortest-augmenting-path form of the Hungarian algorithm with potentials (Kuhn-Munkres as
    presented by e-maxx): rows are added one at a time; ``u``/``v`` are dual potentials that keep every reduced cost
    ``cost[i, j] - u[i] - v[j]`` non-negative, ``p[j]`` is the row matched to column j (1-based, 0 = free) and
    ``way[j]`` the previous column on the augmenting path. Non-finite costs are treated as very large.
    """
    c = np.asarray(cost, dtype=np.float64)
    n, m = c.shape
    if n > m:
        raise ValueError(f"need rows <= columns, got {c.shape}")
    finite = np.isfinite(c)
    big = (np.abs(c[finite]).max() + 1.0) * (n + 1) if finite.any() else 1.0
    c = np.where(finite, c, np.where(np.isnan(c) | (c > 0), big, -big))
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    p, way = np.zeros(m + 1, dtype=np.int64), np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:                                            # grow the tree until a free column is reached
            used[j0] = True
            i0 = p[j0]
            free = ~used[1:]
            cur = c[i0 - 1] - u[i0] - v[1:]                    # reduced costs from row i0
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[p[used]] += delta                                # update potentials along the tree
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:                                              # augment along the path
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    out = np.empty(n, dtype=np.int64)
    cols = np.nonzero(p[1:])[0]
    out[p[1:][cols] - 1] = cols
    return out


# ----------------------------------------------------------------------------------------------- answer span
def answer_starts(tokens: torch.Tensor, block_size: int, answer_id: int, end_think_id: int, eos_id: int,
                  answer_len: int) -> torch.Tensor:
    """[N] position where ``<answer>`` is (or will be written), by the rule of the module docstring."""
    n, c = tokens.shape
    out = []
    for row in tokens.tolist():
        end = row.index(eos_id) if eos_id in row else c
        body = row[:end]
        if answer_id in body:
            a = len(body) - 1 - body[::-1].index(answer_id)
        elif end_think_id in body:
            a = len(body) - body[::-1].index(end_think_id)      # right after the last </think>
        elif end < c:
            a = end
        else:
            a = max(0, c - -(-answer_len // block_size) * block_size)
        out.append(a)
    return torch.tensor(out, dtype=torch.long, device=tokens.device)


@torch.no_grad()
def slot_scores(model, prompt: torch.Tensor, canvas: torch.Tensor, starts: torch.Tensor, cand_ids: torch.Tensor,
                block_size: int, label_ids: torch.Tensor) -> torch.Tensor:
    """[N, K slots, K candidates]: each candidate's log-probability in each slot (its label, then its code levels).

    ``canvas`` [N, C] already holds ``<answer>`` at ``starts`` and ``<mask>`` after it. One block-causal forward
    (inference attention, absolute positions); completion position i is predicted from position i-1.
    """
    n, P = prompt.shape
    c = canvas.shape[1]
    _, k, L = cand_ids.shape
    ids = torch.cat([prompt, canvas], 1)
    mask = to_4d(block_causal_mask(P, c, block_size).to(prompt.device), n)
    pos = torch.arange(P + c, device=prompt.device)[None].expand(n, -1)
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    # slot s, item token l (0 = label, 1.. = codes) sits at completion position a+1+s*(L+1)+l and is predicted by
    # full index P + a + s*(L+1) + l (the AR token shift)
    where = P + starts[:, None] + torch.arange(k * (L + 1), device=prompt.device)[None]    # [N, K*(L+1)]
    h = hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))
    logp = torch.log_softmax(model.lm_head(h).float(), -1).view(n, k, L + 1, -1)            # [N, slot, token, V]
    items = torch.cat([label_ids.to(cand_ids.device)[None, :, None].expand(n, k, 1), cand_ids], 2)   # [N, cand, L+1]
    idx = items.permute(0, 2, 1)[:, None].expand(n, k, L + 1, k)                           # [N, slot, token, cand]
    return logp.gather(-1, idx).sum(2)


@torch.no_grad()
def assign_answer(model, prompt: torch.Tensor, tokens: torch.Tensor, candidates_sid_ids: torch.Tensor,
                  block_size: int, mask_id: int, answer_token_id: int, label_ids, *, end_answer_id: int | None = None,
                  end_think_id: int | None = None, eos_id: int | None = None, return_info: bool = False):
    """Rewrite each row's answer as the maximum-likelihood *permutation* of its candidates (see the module docstring).

    ``candidates_sid_ids`` [N, K, L]: token ids of each row's K candidate SIDs (``ar.candidate_token_ids``);
    ``label_ids`` [K]: token ids of the labels ``[1]``..``[K]``.
    Token ids of ``</answer>`` and ``</think>`` default to their place in the project's vocabulary
    (:data:`text.SPECIAL_TOKENS`), ``eos_id`` to the model's. Returns the new tokens [N, C'] (C' >= C, a multiple of
    the block size), and with ``return_info`` also a dict with ``starts``, ``scores`` [N, K, K] and ``assignment``
    [N, K] (candidate index written in each slot).
    """
    if end_answer_id is None or end_think_id is None:
        if answer_token_id != SPECIAL_TOKENS.index(ANSWER):
            raise ValueError("pass end_answer_id and end_think_id: this vocabulary is not the project's")
        end_answer_id = SPECIAL_TOKENS.index(END_ANSWER) if end_answer_id is None else end_answer_id
        end_think_id = SPECIAL_TOKENS.index(END_THINK) if end_think_id is None else end_think_id
    eos_id = model.config.eos_token_id if eos_id is None else eos_id
    n, c = tokens.shape
    _, k, L = candidates_sid_ids.shape
    answer_len = 1 + k * (L + 1) + 2                                 # <answer> ([k] SID) x K </answer> <eos>
    starts = answer_starts(tokens, block_size, answer_token_id, end_think_id, eos_id, answer_len)
    need = int((starts + answer_len).max())
    new_c = max(c, -(-need // block_size) * block_size)
    out = torch.full((n, new_c), eos_id, dtype=tokens.dtype, device=tokens.device)
    out[:, :c] = tokens
    pos = torch.arange(new_c, device=tokens.device)[None]
    canvas = torch.where(pos > starts[:, None], torch.full_like(out, mask_id), out)
    canvas[torch.arange(n), starts] = answer_token_id
    cand = candidates_sid_ids.to(tokens.device)
    label_ids = torch.as_tensor(label_ids, dtype=torch.long, device=tokens.device)
    scores = slot_scores(model, prompt, canvas, starts, cand, block_size, label_ids)
    assignment = torch.tensor(np.stack([hungarian(-s) for s in scores.cpu().numpy()]), device=tokens.device)
    for i in range(n):
        a = int(starts[i])
        items = torch.cat([label_ids[assignment[i], None], cand[i, assignment[i]]], 1).flatten()  # slot order
        out[i, a] = answer_token_id
        out[i, a + 1:a + 1 + k * (L + 1)] = items
        out[i, a + 1 + k * (L + 1)] = end_answer_id
        out[i, a + 2 + k * (L + 1):] = eos_id
    if return_info:
        return out, {"starts": starts, "scores": scores, "assignment": assignment}
    return out
