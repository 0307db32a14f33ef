"""Reinforcement learning against the re-ranking reward: group-relative PPO (DAPO-style) with trajectory replay.

**Reward** (GR2's, kept by Diffusion-GR2). With ``rank_pre`` the target's 0-based position in the retriever's list and
``rank_new`` its position in the model's ranking::

    R_rank = (rank_pre - rank_new) / N                      in [-1, 1]: positive when the target was promoted
    R      = R_rank + 0.2 * R_fmt                           for a valid permutation
    R      = -1                                             for an invalid output (it stays in its group)

**Reward hacking.** With R_fmt = 1 for every valid output, copying the retriever's order is a safe +0.2 (R_rank = 0)
while any real re-ranking risks a negative R_rank: the policy learns to copy the input. The *conditional* format
reward pays R_fmt only when R_rank > 0 or the target is first in the answer, so copying earns 0 unless the retriever
already had the target on top. :func:`copy_rate` measures the hack.

**Policy gradient.** Each step samples ``prompts`` prompts x ``group`` rollouts with the real block-diffusion decoder,
and computes group-relative advantages A = (r - mean_group) / (std_group + eps); groups whose rewards are all equal
carry no signal and are dropped (DAPO dynamic sampling, without the resampling). Each committed token is one action;
its log-probability comes from trajectory replay (:mod:`diffgr2_lite.diffusion.replay`): the canvas it was committed
from, under the inference attention mask, not a fully-masked pass. The PPO-clip objective with token-level
normalisation (DAPO)::

    L = - 1/|T| sum_{tokens t of kept groups} min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A),
    rho_t = exp(log pi_theta(t) - log pi_old(t))

where pi_old is replayed once, without gradients, with the weights that generated the rollouts (so rho = 1 at the
first inner epoch; ``inner_epochs`` > 1 reuses the rollouts). No KL penalty and no reference model (as DAPO).
Tokens are every committed position of the blocks the decoder ran, including the ``<eos>`` fill of the ending block:
they were committed by the policy and shaped the canvases of the others. Log-probabilities use the decoder's
sampling temperature.

The update uses the one training loop's primitives (:class:`~diffgr2_lite.train.Trainer`: AdamW at a constant rate,
clipping at 1.0, bf16 autocast on CUDA); the token sum of each micro-batch is divided by the token count of the whole
step (of every process). With several processes each samples its own ``prompts`` prompts (seeded ``seed + rank``).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from .progress import tqdm

from .ar import default_max_blocks
from .diffusion.replay import first_eos, replay_logprobs, select_rows, valid_positions
from .opd import _rows, device_generator, parse_rollouts, sample_rollouts
from .text import ParsedRanking
from .train import BestState, Trainer, maybe_validate


# ----------------------------------------------------------------------------------------------- reward
def reward(parsed: ParsedRanking, target_pos: int, n: int = 10, format_weight: float = 0.2,
           conditional: bool = True) -> float:
    """GR2's re-ranking reward of one parsed output (see the module docstring). Invalid -> -1."""
    if not parsed.valid:
        return -1.0
    rank_new = parsed.ranking.index(int(target_pos))
    r_rank = (int(target_pos) - rank_new) / n
    paid = (r_rank > 0 or rank_new == 0) if conditional else True
    return r_rank + format_weight * float(paid)


def copy_rate(parses: list[ParsedRanking]) -> float:
    """Fraction of the *valid* outputs whose ranking is the input order 0..N-1 (0 when none is valid)."""
    valid = [p for p in parses if p.valid]
    if not valid:
        return 0.0
    return float(np.mean([p.ranking == list(range(len(p.ranking))) for p in valid]))


def group_advantages(rewards, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [P, G], keep [P] bool): (r - group mean) / (group std + eps), zero-variance groups dropped.

    ``std`` is the sample standard deviation (as GRPO/DAPO implementations use). Dropped groups get advantage 0.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [prompts, group], got shape {tuple(r.shape)}")
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(mean)
    keep = (r.max(1).values - r.min(1).values) > eps
    adv = torch.where(keep[:, None], (r - mean) / (std + eps), torch.zeros_like(r))
    return adv, keep


def ppo_token_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip_low: float,
                   clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate (to minimise) and whether the clip was active."""
    ratio = torch.exp(logp_new - logp_old)
    s1 = ratio * adv
    s2 = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    return -torch.minimum(s1, s2), (s2 < s1)


def default_reward_fn(format_weight: float = 0.2, conditional: bool = True):
    """``reward_fn(parsed, row, token_ids)`` with :func:`reward` against the row's ``target_pos``."""

    def fn(parsed, row, token_ids):
        return reward(parsed, row["target_pos"], len(row["candidates"]), format_weight, conditional)

    return fn


# ----------------------------------------------------------------------------------------------- training
def train_rl(policy, train_ds, example_set, *, steps: int, prompts: int, group: int, lr: float, clip: float,
             tau: float, block_size: int, device, seed: int = 0, conditional: bool = True, temperature: float = 1.0,
             format_weight: float = 0.2, clip_high: float | None = None, inner_epochs: int = 1,
             reward_fn=None, max_blocks: int | None = None, micro_batch: int = 16,
             max_views_per_chunk: int | None = None, weight_decay: float = 0.0, validate=None,
             validate_every: int | None = None, keep_best: bool = False, sub_block: int | None = None,
             desc: str = "RL") -> dict:
    """Group-relative PPO of the block-diffusion ``policy`` against the re-ranking reward.

    ``reward_fn(parsed, row, token_ids) -> float`` overrides the reward (``token_ids``: the completion up to and
    including its first ``<eos>``); by default :func:`reward` with ``format_weight`` and ``conditional``.
    ``clip`` is eps_low, ``clip_high`` eps_high (DAPO's decoupled clip; default = ``clip``). ``sub_block``: rollouts
    through left-to-right chunks, as in :func:`~diffgr2_lite.opd.train_opd`. Returns a history dict
    with lists ``step``, ``reward`` (mean), ``valid`` (valid rate), ``copy`` (:func:`copy_rate`), ``kept`` (fraction
    of groups kept), ``loss``, ``clip_frac``, ``val_step``, ``val``, and ``seconds``.
    """
    tok = example_set.tokenizer
    mask_id, eos_id = tok.mask_token_id, tok.eos_token_id
    reward_fn = reward_fn or default_reward_fn(format_weight, conditional)
    clip_high = clip if clip_high is None else clip_high
    trainer = Trainer(policy, lr=lr, total_steps=steps * inner_epochs, warmup=0, schedule="constant",
                      weight_decay=weight_decay, compile=False, device=device, desc=desc)
    device = trainer.device
    max_blocks = max_blocks or default_max_blocks(train_ds, block_size)
    rng = np.random.default_rng(seed + trainer.rank)
    gen = device_generator(device, seed + trainer.rank)
    validate_every = validate_every or max(1, steps)
    validate = trainer.on_main(validate)
    history = {"step": [], "reward": [], "valid": [], "copy": [], "kept": [], "loss": [], "clip_frac": [],
               "val_step": [], "val": []}
    keeper, t0 = BestState(), time.time()
    n_rows = len(train_ds)
    bar = tqdm(range(1, steps + 1), desc=desc, mininterval=1, disable=not trainer.is_main)
    for step in bar:
        rows = _rows(train_ds, rng.choice(n_rows, size=min(prompts, n_rows), replace=False))
        prompt, res = sample_rollouts(policy, rows, group, block_size=block_size, max_blocks=max_blocks,
                                      mask_id=mask_id, eos_id=eos_id, tau=tau, temperature=temperature,
                                      device=device, generator=gen, sub_block=sub_block)
        parses = parse_rollouts(res.tokens, rows, group, example_set)
        ends = first_eos(res.tokens, eos_id).tolist()
        ids = res.tokens.tolist()
        rewards = [reward_fn(p, rows[j // group], ids[j][:ends[j] + 1]) for j, p in enumerate(parses)]
        adv, keep = group_advantages(torch.tensor(rewards).view(len(rows), group))
        adv_row = adv.flatten().to(device)
        keep_rows = keep.repeat_interleave(group).nonzero(as_tuple=True)[0].to(device)
        valid = valid_positions(res.steps, block_size)
        n_tok = int(valid[keep_rows].sum())
        loss_sum, clipped = 0.0, 0
        policy.eval()                                     # replay must be the decoder's likelihood (no dropout)
        if trainer.all_sum(n_tok) > 0:                    # every process takes the same decision
            chunks = [keep_rows[s:s + micro_batch] for s in range(0, len(keep_rows), micro_batch)]
            old = []
            with torch.no_grad(), trainer.autocast():     # pi_old: same weights, same precision as the update
                for idx in chunks:
                    r = select_rows(res, idx)
                    old.append(replay_logprobs(policy, prompt[idx], r.tokens, r.commit_step, r.steps, block_size,
                                               mask_id, max_views_per_chunk, temperature)[0])
            for _ in range(inner_epochs):
                clipped = 0
                for idx, lp_old in zip(chunks, old):
                    r = select_rows(res, idx)
                    with trainer.autocast():
                        lp, v = replay_logprobs(policy, prompt[idx], r.tokens, r.commit_step, r.steps, block_size,
                                                mask_id, max_views_per_chunk, temperature)
                    per_tok, was_clipped = ppo_token_loss(lp, lp_old, adv_row[idx, None], clip, clip_high)
                    trainer.backward((per_tok * v).sum(), weight=v.sum())   # / the step's tokens, all processes
                    clipped += int((was_clipped & v).sum())
                loss_sum = float(trainer.step())
        valid_rate = float(np.mean([p.valid for p in parses])) if parses else 0.0
        history["step"].append(step)
        history["reward"].append(float(np.mean(rewards)))
        history["valid"].append(valid_rate)
        history["copy"].append(copy_rate(parses))
        history["kept"].append(float(keep.float().mean()))
        history["loss"].append(loss_sum)
        history["clip_frac"].append(clipped / max(1, n_tok))
        bar.set_postfix(reward=f"{history['reward'][-1]:.3f}", valid=f"{valid_rate:.2f}",
                        kept=f"{history['kept'][-1]:.2f}")
        maybe_validate(validate, policy, step, steps, validate_every, history, keeper if keep_best else None)
    bar.close()
    keeper.restore(policy)
    policy.eval()
    history.update(seconds=time.time() - t0, steps=steps, best_val=max(history["val"]) if history["val"] else None,
                   processes=trainer.world)
    return history
