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
COLLIDE_CODES = 3        # a colliding row's codes at every level but the last are squeezed onto this many codes


def _renamed(ids: torch.Tensor, ranges: list[tuple[int, int]], generator, collide: bool) -> torch.Tensor:
    """Every row's SID codes renamed through a fresh random map per level: a bijection, or (``collide``) a map of each
    level but the last onto :data:`COLLIDE_CODES` codes, so that many items share their SID prefix."""
    n, out = ids.shape[0], ids.clone()
    for level, (first, count) in enumerate(ranges):
        target = torch.rand(n, count, generator=generator, device=ids.device).argsort(1)       # a random order
        if collide and level < len(ranges) - 1:
            slot = torch.randint(0, min(COLLIDE_CODES, count), (n, count), generator=generator, device=ids.device)
            target = target.gather(1, slot)                     # each code -> one of the order's first few codes
        in_level = (ids >= first) & (ids < first + count)
        out = torch.where(in_level, target.gather(1, (ids - first).clamp(0, count - 1)) + first, out)
    return out


def relabel_sids(prompt: torch.Tensor, completion: torch.Tensor, ranges: list[tuple[int, int]],
                 generator: torch.Generator | None = None, share: float = 1.0, collide: float = 0.0,
                 candidate_positions: list[list[int]] | torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rename every SID code of a row through one random map per level, in the prompt and completion alike.

    ``ranges``: (first token id, count) of each SID level (:func:`text.sid_token_ranges`). A ``share`` of the rows is
    relabelled through bijections; the ranking, the labels and every word stay, only which codes name which item
    changes, so a row can no longer be answered from memory of its items: the model must copy.

    A further ``collide`` share of rows gets *colliding* maps (``candidate_positions``: the prompt positions of each
    candidate's SID, :attr:`text.PromptFormat.candidate_sid_positions`): every level but the last is squeezed onto a
    few codes, so the candidates and history items share SID prefixes far more often than real ones do. After
    ``[k] <a_1> <b_2>`` the next code can then only be found by following the label ``[k]`` back to its candidate,
    not by matching the prefix just written (a model that copies by prefix writes the code of another item that
    shares it: the failure real prompts show at the last level). A colliding row whose candidates would no longer be
    distinct falls back to a bijection. Rows not drawn are returned unchanged. Nothing is read back to the host, so a
    training step that relabels its batch never waits for the GPU.
    """
    n = prompt.shape[0]
    ids = torch.cat([prompt, completion], 1)
    u = torch.rand(n, generator=generator, device=ids.device)
    hard = u < collide
    plain = (u >= collide) & (u < collide + share)
    bijective = _renamed(ids, ranges, generator, collide=False)
    if collide > 0:
        if candidate_positions is None:
            raise ValueError("colliding relabelling needs the candidates' SID positions in the prompt")
        squeezed = _renamed(ids, ranges, generator, collide=True)
        sids = squeezed[:, torch.as_tensor(candidate_positions, device=ids.device)]              # [n, N, levels]
        clash = (sids[:, :, None] == sids[:, None]).all(-1).sum((1, 2)) > sids.shape[1]
        plain = plain | (hard & clash)
        hard = hard & ~clash
        ids = torch.where(hard[:, None], squeezed, ids)
    out = torch.where(plain[:, None], bijective, ids)
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
def relabel_transform(tokenizer, fmt, share: float, seed: int = 0, device="cpu", collide: float = 0.0):
    """A :class:`~diffgr2_lite.batches.DeviceBatches` transform relabelling a ``share`` of each batch's rows through
    bijections and a ``collide`` share through colliding maps (:func:`relabel_sids`); ``fmt``: the prompt format."""
    from .batches import Batch
    from .text import sid_token_ranges

    ranges = sid_token_ranges(tokenizer, fmt.sid_len)
    positions = torch.tensor(fmt.candidate_sid_positions, device=torch.device(device))     # moved to the device once
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)

    def transform(b: Batch) -> Batch:
        prompt, completion = relabel_sids(b.prompt, b.completion, ranges, gen, share, collide, positions)
        return Batch(prompt, completion, b.weight, b.is_answer, b.length)

    return transform if share > 0 or collide > 0 else None


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
                         transform=relabel_transform(tok, example_set.fmt, relabel, seed, dev))
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
