"""Copy warm-up: teach a from-scratch model to write valid answers before it learns to rank.

GR2 mid-trains its 8B backbone on semantic IDs before SFT. Our ~14M-parameter model starts from random weights, and
the first skill a valid answer needs is *copying*: every answer item is a label ``[k]`` followed by candidate k's
SID, copied code by code from the prompt, and the items must follow the order the trace's check and pick determine
(the pick first, then the others by points, ties in retriever order). One wrong code, one item written twice or
left out, and the whole ranking is invalid.

**What the warm-up trains.** The format's own answers: every training prompt (rejection-sampled and reading rows
alike), with the teacher's trace in the context and the loss on the answer alone (lambda_r = 0, lambda_o = 1).

**Rows that cannot be memorised.** Trained on the same prompts for thousands of steps, a small model learns each
training prompt's candidate set instead of how to copy: an earlier warm-up reached 99.6% valid answers on training
prompts and 74.6% on held-out ones. So every warm-up row has its SID codes *relabelled*: one random bijection per
SID level, drawn afresh for each row every time it is used, applied to the prompt and the answer alike
(:func:`relabel_sids`). The words, labels and ranking stay; only which codes name which item change, so nothing
can be recalled and everything must be copied. (In that earlier run relabelling took the held-out validity from
74.6% to 96%.)

**The gate.** Every ``check_every`` steps the warm-up decodes the answer greedily, with no constraint, after the
teacher's trace on held-out validation prompts (:func:`answer_validity`), and stops as soon as the share of valid
permutations reaches ``gate`` (or at ``max_steps``). SFT then starts from a model that can already write the
answer; the same relabelling stays on for a share of the SFT and CFT rows so the skill is kept.
"""
from __future__ import annotations

import torch

from .text import ANSWER


# ----------------------------------------------------------------------------------------------- relabelling
def relabel_sids(prompt: torch.Tensor, completion: torch.Tensor, ranges: list[tuple[int, int]],
                 generator: torch.Generator | None = None, share: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rename every SID code of a row through one random bijection per level, in the prompt and completion alike.

    ``ranges``: (first token id, count) of each SID level (:func:`text.sid_token_ranges`). A ``share`` of the rows is
    relabelled (the others are returned unchanged). The ranking, the labels and every word stay the same; only which
    codes name which item changes, so a row can no longer be answered from memory of its items: the model must copy.
    """
    n = prompt.shape[0]
    ids = torch.cat([prompt, completion], 1)
    out = ids.clone()
    rows = torch.rand(n, generator=generator, device=ids.device) < share
    for first, count in ranges:
        perm = torch.rand(n, count, generator=generator, device=ids.device).argsort(1) + first
        in_level = (ids >= first) & (ids < first + count) & rows[:, None]
        out = torch.where(in_level, perm.gather(1, (ids - first).clamp(0, count - 1)), out)
    return out[:, :prompt.shape[1]], out[:, prompt.shape[1]:]


# ----------------------------------------------------------------------------------------------- the gate
@torch.no_grad()
def answer_validity(model, rows: list[dict], example_set, device, batch_size: int = 256) -> dict:
    """Free-running validity of the answer alone: given the prompt and the teacher's trace up to ``<answer>``, decode
    the rest greedily (no constraint) and parse it.

    Returns ``valid`` (share of valid permutations) and ``follows`` (share whose ranking is exactly the one the
    trace's check and pick determine). This isolates writing the answer from reasoning: the copy skill the warm-up
    must reach before SFT starts.
    """
    from .ar import ar_decode, autocast
    from .text import decode_tokens, parse_ranking

    tok = example_set.tokenizer
    answer_id = tok.convert_tokens_to_ids(ANSWER)
    prefixes = [r["prompt_ids"] + r["completion_ids"][: r["completion_ids"].index(answer_id) + 1] for r in rows]
    answer_len = example_set.fmt.answer_len
    valid = follows = 0
    for length in sorted({len(p) for p in prefixes}):                 # fixed-width traces: one group in practice
        group = [i for i, p in enumerate(prefixes) if len(p) == length]
        for s in range(0, len(group), batch_size):
            idx = group[s:s + batch_size]
            x = torch.tensor([prefixes[i] for i in idx], dtype=torch.long, device=device)
            with autocast(device):
                out = ar_decode(model, x, answer_len - 1, tok.eos_token_id)["tokens"]
            for i, ids in zip(idx, out.tolist()):
                parsed = parse_ranking([ANSWER, *decode_tokens(tok, ids)], example_set.candidate_sids(rows[i]))
                valid += parsed.valid
                follows += parsed.valid and parsed.ranking == list(rows[i]["teacher_ranking"])
    n = max(1, len(rows))
    return {"valid": valid / n, "follows": follows / n, "n": len(rows)}


# ----------------------------------------------------------------------------------------------- the warm-up
def relabel_transform(tokenizer, levels: int, share: float, seed: int = 0, device="cpu"):
    """A :class:`~diffgr2_lite.batches.DeviceBatches` transform relabelling a ``share`` of each batch's rows."""
    from .batches import Batch
    from .text import sid_token_ranges

    ranges = sid_token_ranges(tokenizer, levels)
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)

    def transform(b: Batch) -> Batch:
        prompt, completion = relabel_sids(b.prompt, b.completion, ranges, gen, share)
        return Batch(prompt, completion, b.weight, b.is_answer, b.length)

    return transform if share > 0 else None


def train_warmup(model, rows, example_set, held_out: list[dict], *, max_steps: int, batch_size: int, lr: float,
                 gate: float, check_every: int, device, seed: int = 0, compile="auto", relabel: float = 1.0,
                 desc: str = "copy warm-up") -> dict:
    """Train on the answers of ``rows`` (answer-only loss; a ``relabel`` share of rows relabelled, all by default)
    until the held-out answer validity reaches ``gate`` or ``max_steps`` pass, through the one training loop.

    Returns the history: ``step``/``loss``, ``val_step``/``val`` (held-out answer validity at each check), ``steps``
    (used), ``passed`` (the gate was reached) and ``final`` (held-out and training-prompt validity at the end: a
    large gap between them would mean memorisation).
    """
    from .ar import sft_terms
    from .batches import DeviceBatches
    from .train import Trainer, process_device

    tok = example_set.tokenizer
    dev = process_device(device)
    data = DeviceBatches(rows, tok, batch_size=batch_size, lambda_r=0.0, lambda_o=1.0, seed=seed, device=dev,
                         transform=relabel_transform(tok, example_set.fmt.sid_len, relabel, seed, dev))
    trainer = Trainer(model, lr=lr, total_steps=max_steps, weight_decay=0.01, log_every=50, device=device,
                      compile=compile, desc=desc)
    last = {}                        # the latest gate check: fit always checks at its last step (or stops at one)

    def gate_score(m) -> float:
        last.update(answer_validity(m, held_out, example_set, dev))
        return last["valid"]

    hist = trainer.fit(data, sft_terms, keep_best=False, stop_at=gate, validate_every=check_every, validate=gate_score)
    hist["passed"] = bool(hist["val"]) and hist["val"][-1] >= gate
    hist["gate"] = gate
    train_rows = rows.select(range(min(len(held_out), len(rows)))).to_list() if hasattr(rows, "select") else \
        rows[:len(held_out)]
    hist["final"] = {"held_out": dict(last), "train_prompts": answer_validity(model, train_rows, example_set, dev)}
    return hist
