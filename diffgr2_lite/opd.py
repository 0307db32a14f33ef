"""On-policy distillation (OPD): the block-diffusion student learns from the frozen AR teacher *on its own outputs*.

CFT trains on fixed teacher trajectories, but a parallel decoder at inference conditions on canvases it wrote itself
(the distributional gap). OPD closes it, one step at a time:

1. **Rollouts.** Sample ``prompts`` prompts and ``rollouts`` completions each with the student's *real* decoder
   (:func:`~diffgr2_lite.diffusion.sampler.diffusion_decode`: block by block, threshold tau, sampled at
   ``temperature``), in eval mode, without gradients. Each committed token records its commit step.
2. **Teacher.** The frozen AR model is run teacher-forced, once, over prompt + the student's final tokens
   (:func:`~diffgr2_lite.ar.completion_logits`): at completion position i it sees exactly the student's tokens < i
   and gives its next-token distribution p_T(. | x_<i).
3. **Student.** For every committed token, the student's distribution at the moment it committed it, by trajectory
   replay (:mod:`diffgr2_lite.diffusion.replay`), with gradients.
4. **Loss.** Forward KL(p_T || p_S) over the full vocabulary, averaged over every committed position of every valid
   block (reasoning and answer alike)::

       L = 1/|I| sum_{i in I} sum_v p_T(v | x_<i) (log p_T(v | x_<i) - log p_S(v | canvas_i))

Forward KL is mass-covering: the student is pushed to put probability wherever the teacher does, which is what keeps
its threshold commits (which need a confident top token) aligned with the teacher's argmax. ``divergence="reverse"``
(KL(p_S || p_T), mode-seeking) is offered for comparison. ``student_view="masked"`` scores the student on one
fully-masked view per block instead of the canvas it committed from: the cheaper, wrong likelihood (see the replay
module), kept as an ablation.

**After the end.** The teacher is an AR model: its distribution is defined up to and including the first ``<eos>``
(SFT gives no weight after it). The diffusion convention, which CFT trained, is that the rest of the ending block is
``<eos>`` too. So positions after the first ``<eos>`` in the ending block get the target "one-hot ``<eos>``"
(``fill="eos"``: a cross-entropy term, identical for both divergences) or are skipped (``fill="skip"``).

Training: the one loop's primitives (:class:`~diffgr2_lite.train.Trainer`): AdamW at a constant learning rate (the
paper's choice), gradient clipping at 1.0, bf16 autocast on CUDA (rollouts too: the policy being distilled is the bf16
model that generated them). The model stays in eval mode for the update: the replayed likelihood must be the
decoder's, and any dropout would break that (the Llama used here has none). Rollouts are split into micro-batches
whose summed losses the trainer divides by the position count of the whole step (of every process), so the gradient
is exactly that of the step average whatever the micro-batch size. With several processes each samples its own
``prompts`` prompts (seeded ``seed + rank``).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from .progress import tqdm

from .ar import autocast, completion_logits, default_max_blocks
from .diffusion.replay import first_eos, masked_hidden, replay_hidden, select_rows, valid_positions
from .diffusion.sampler import DecodeResult, diffusion_decode
from .text import decode_tokens, parse_ranking
from .train import BestState, Trainer, maybe_validate

DIVERGENCES = ("forward", "reverse")
STUDENT_VIEWS = ("replay", "masked")


# ----------------------------------------------------------------------------------------------- rollouts
def _rows(ds, idx) -> list[dict]:
    cols = [c for c in ("prompt_ids", "candidates", "target_pos") if c in getattr(ds, "column_names", ds[0])]
    if hasattr(ds, "select"):
        return ds.select([int(i) for i in idx]).select_columns(cols).to_list()
    return [ds[int(i)] for i in idx]


def sample_rollouts(model, rows: list[dict], repeats: int, *, block_size: int, max_blocks: int, mask_id: int,
                    eos_id: int, tau: float, temperature: float, device, generator=None, sub_block: int | None = None
                    ) -> tuple[torch.Tensor, DecodeResult]:
    """(prompt [R*repeats, P], result): ``repeats`` rollouts of each row with the real decoder (eval, no grad).

    Rollouts of one prompt are adjacent (row r's rollouts are r*repeats ... r*repeats + repeats - 1). ``sub_block``
    decodes them through left-to-right chunks (:func:`~diffgr2_lite.diffusion.sampler.commit_rule`); replay needs
    nothing else, since every token keeps the step it was committed at.
    """
    prompt = torch.tensor([r["prompt_ids"] for r in rows], dtype=torch.long, device=device)
    prompt = prompt.repeat_interleave(repeats, 0)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device):
        res = diffusion_decode(model, prompt, max_blocks, block_size, mask_id, eos_id, tau=tau,
                               temperature=temperature, generator=generator, sub_block=sub_block)
    model.train(was_training)
    return prompt, res


def parse_rollouts(tokens: torch.Tensor, rows: list[dict], repeats: int, example_set) -> list:
    """Parse every rollout against its row's candidates (rollouts of a row are adjacent)."""
    tok = example_set.tokenizer
    out = []
    for j, ids in enumerate(tokens.tolist()):
        r = rows[j // repeats]
        out.append(parse_ranking(decode_tokens(tok, ids), [example_set.sid_words(c) for c in r["candidates"]]))
    return out


def device_generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


# ----------------------------------------------------------------------------------------------- the loss
def loss_positions(result: DecodeResult, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher positions, fill positions) [N, C] bool: committed positions up to and including the first
    ``<eos>``, and the rest of the ending block."""
    valid = valid_positions(result.steps, result.block_size)
    pos = torch.arange(result.tokens.shape[1], device=valid.device)[None]
    upto = pos <= first_eos(result.tokens, eos_id)[:, None]
    return valid & upto, valid & ~upto


@torch.no_grad()
def teacher_log_probs(teacher, prompt: torch.Tensor, tokens: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """[M, V] float32: the teacher's next-token log-distribution at the completion positions ``where``, teacher-forced
    on the student's tokens (position i sees tokens < i; the AR token shift of :func:`ar.completion_logits`)."""
    logits = completion_logits(teacher, prompt, tokens)
    return torch.log_softmax(logits[where].float(), -1)


def divergence_per_position(t_logp: torch.Tensor, s_logp: torch.Tensor, divergence: str = "forward") -> torch.Tensor:
    """Full-vocabulary KL per row: forward KL(T || S) or reverse KL(S || T). Inputs are log-probabilities [M, V]."""
    if divergence == "forward":
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if divergence == "reverse":
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")


def opd_loss(student, teacher, prompt: torch.Tensor, decode_result: DecodeResult, block_size: int, mask_id: int,
             divergence: str = "forward", student_view: str = "replay", *, eos_id: int | None = None,
             fill: str = "eos", normalizer: float | None = None, max_views_per_chunk: int | None = None
             ) -> tuple[torch.Tensor, dict]:
    """The OPD loss of a batch of student rollouts, and statistics.

    ``loss`` = (sum of the per-position divergences + sum of the fill cross-entropies) / ``normalizer`` (default: the
    number of positions scored here; pass the step's total when micro-batching). ``stats``: ``kl`` (mean divergence at
    teacher positions), ``fill_ce``, ``n_kl``, ``n_fill`` and the sums ``kl_sum`` / ``fill_sum``.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    if student_view not in STUDENT_VIEWS:
        raise ValueError(f"unknown student_view {student_view!r}; valid: {', '.join(STUDENT_VIEWS)}")
    if fill not in ("eos", "skip"):
        raise ValueError(f"unknown fill {fill!r}; valid: eos, skip")
    if block_size != decode_result.block_size:
        raise ValueError(f"block size {block_size} differs from the rollouts' {decode_result.block_size}")
    eos_id = student.config.eos_token_id if eos_id is None else eos_id
    tokens = decode_result.tokens
    t_pos, f_pos = loss_positions(decode_result, eos_id)
    if fill == "skip":
        f_pos = torch.zeros_like(f_pos)
    t_logp = teacher_log_probs(teacher, prompt, tokens, t_pos)
    if student_view == "replay":
        hidden, _ = replay_hidden(student, prompt, tokens, decode_result.commit_step, decode_result.steps,
                                  block_size, mask_id, max_views_per_chunk)
    else:
        hidden = masked_hidden(student, prompt, tokens, block_size, mask_id, max_views_per_chunk)
    s_logp = torch.log_softmax(student.lm_head(hidden[t_pos]).float(), -1)
    kl = divergence_per_position(t_logp, s_logp, divergence)
    fill_ce = -torch.log_softmax(student.lm_head(hidden[f_pos]).float(), -1)[:, eos_id]
    n_kl, n_fill = int(t_pos.sum()), int(f_pos.sum())
    total = kl.sum() + fill_ce.sum()
    denom = normalizer if normalizer is not None else max(1, n_kl + n_fill)
    loss = total / denom
    stats = {"kl": float(kl.detach().mean()) if n_kl else 0.0,
             "fill_ce": float(fill_ce.detach().mean()) if n_fill else 0.0,
             "kl_sum": float(kl.detach().sum()), "fill_sum": float(fill_ce.detach().sum()),
             "n_kl": n_kl, "n_fill": n_fill}
    return loss, stats


# ----------------------------------------------------------------------------------------------- training
def train_opd(student, teacher, train_ds, example_set, *, steps: int, prompts: int, rollouts: int, lr: float,
              tau: float, block_size: int, device, seed: int = 0, temperature: float = 1.0,
              divergence: str = "forward", student_view: str = "replay", fill: str = "eos",
              max_blocks: int | None = None, micro_batch: int = 16, max_views_per_chunk: int | None = None,
              weight_decay: float = 0.0, validate=None, validate_every: int | None = None, keep_best: bool = False,
              sub_block: int | None = None, desc: str = "OPD") -> dict:
    """On-policy distillation of ``student`` (block diffusion, from CFT) towards the frozen AR ``teacher``.

    ``train_ds`` rows need ``prompt_ids`` and ``candidates`` (rollouts are parsed to report their valid rate).
    ``validate(student)`` returns a score (e.g. validation NDCG@3) every ``validate_every`` steps and at the end;
    with ``keep_best`` the best-scoring weights are restored at the end. ``sub_block``: rollouts through left-to-right
    chunks of that many positions (default: the whole block, the paper's sampler). Returns a history dict with lists
    ``step``, ``kl``, ``fill_ce``, ``loss``, ``valid`` (valid rate of the step's rollouts), ``tokens_per_forward``,
    ``val_step``, ``val`` and ``seconds``.
    """
    tok = example_set.tokenizer
    mask_id, eos_id = tok.mask_token_id, tok.eos_token_id
    trainer = Trainer(student, lr=lr, total_steps=steps, warmup=0, schedule="constant", weight_decay=weight_decay,
                      compile=False, device=device, desc=desc)
    device = trainer.device
    teacher.to(device).eval()
    max_blocks = max_blocks or default_max_blocks(train_ds, block_size)
    rng = np.random.default_rng(seed + trainer.rank)
    gen = device_generator(device, seed + trainer.rank)
    validate_every = validate_every or max(1, steps)
    validate = trainer.on_main(validate)
    history = {"step": [], "kl": [], "fill_ce": [], "loss": [], "valid": [], "tokens_per_forward": [],
               "val_step": [], "val": []}
    keeper, t0 = BestState(), time.time()
    n_rows = len(train_ds)
    bar = tqdm(range(1, steps + 1), desc=desc, mininterval=1, disable=not trainer.is_main)
    for step in bar:
        rows = _rows(train_ds, rng.choice(n_rows, size=min(prompts, n_rows), replace=False))
        prompt, res = sample_rollouts(student, rows, rollouts, block_size=block_size, max_blocks=max_blocks,
                                      mask_id=mask_id, eos_id=eos_id, tau=tau, temperature=temperature,
                                      device=device, generator=gen, sub_block=sub_block)
        parses = parse_rollouts(res.tokens, rows, rollouts, example_set)
        student.eval()                                  # see the module docstring: the replayed policy has no dropout
        kl_sum = fill_sum = 0.0
        n_kl = n_fill = 0
        n = prompt.shape[0]
        for s in range(0, n, micro_batch):
            sl = slice(s, min(n, s + micro_batch))
            with trainer.autocast():
                loss, st = opd_loss(student, teacher, prompt[sl], select_rows(res, sl), block_size, mask_id,
                                    divergence, student_view, eos_id=eos_id, fill=fill, normalizer=1.0,
                                    max_views_per_chunk=max_views_per_chunk)
            trainer.backward(loss, weight=st["n_kl"] + st["n_fill"])          # a sum over these positions
            kl_sum += st["kl_sum"]
            fill_sum += st["fill_sum"]
            n_kl += st["n_kl"]
            n_fill += st["n_fill"]
        loss = trainer.step()
        valid_rate = float(np.mean([p.valid for p in parses])) if parses else 0.0
        commits = int(valid_positions(res.steps, block_size).sum())
        history["step"].append(step)
        history["kl"].append(kl_sum / max(1, n_kl))
        history["fill_ce"].append(fill_sum / max(1, n_fill))
        history["loss"].append(float(loss))
        history["valid"].append(valid_rate)
        history["tokens_per_forward"].append(commits / max(1, int(res.steps.sum())))
        bar.set_postfix(kl=f"{history['kl'][-1]:.4f}", valid=f"{valid_rate:.2f}")
        maybe_validate(validate, student, step, steps, validate_every, history, keeper if keep_best else None)
    bar.close()
    keeper.restore(student)
    student.eval()
    history.update(seconds=time.time() - t0, steps=steps, best_val=max(history["val"]) if history["val"] else None,
                   processes=trainer.world)
    return history
