"""Conversion fine-tuning (CFT): the AR re-ranker's weights, trained with the masked block-diffusion loss.

Same model, same teacher trajectories as SFT (rejection-sampled and reading rows, a share relabelled); only the
objective changes (:mod:`diffgr2_lite.diffusion.objective`):
each completion block is noised (a mask ratio t ~ U(0, 1) per block, plus the complementary view), and every masked
token is predicted from its block's canvas and the clean earlier blocks, with GR2's weights (lambda_r on the reasoning,
lambda_o on the answer and on the ``<eos>`` fill of the ending block). Completions are padded to a multiple of the
block size. Training goes through the one loop (:func:`diffgr2_lite.train.train_supervised`), and the checkpoint is
chosen by strict validation NDCG@3 of the plain block-diffusion sampler at tau = 1.0 (no constrained decoder).

Variants (notebook 05 compares them): ``cft`` (complementary views, the GR2 weights), ``plain`` (one view per block,
every token weighted like the answer) and ``answer_aware`` (30% of rows have their whole answer masked in one view:
the parallel decoder writes the answer from a fully masked block at inference).
"""
from __future__ import annotations

import copy

import torch

from .config import Profile
from .decoders import diffusion_validate
from .diffusion.objective import masked_diffusion_terms
from .rank_drill import augmentations
from .train import engine_settings, train_supervised

VARIANTS = {
    "cft": dict(answer_mask_prob=0.0, complementary=True, answer_weighted_reasoning=False),
    "plain": dict(answer_mask_prob=0.0, complementary=False, answer_weighted_reasoning=True),
    "answer_aware": dict(answer_mask_prob=0.3, complementary=True, answer_weighted_reasoning=False),
}


def cft_loss_fn(profile: Profile, ex, answer_mask_prob: float = 0.0, complementary: bool = True):
    """The CFT objective as a ``loss_fn(model, batch) -> (sum, weight)`` for the training loop (optionally
    answer-aware: that share of rows gets its whole answer masked in the first view)."""
    mask_id = ex.tokenizer.mask_token_id

    def loss_fn(model, batch):
        extra = None
        if answer_mask_prob > 0:
            rows = torch.rand(batch.completion.shape[0], device=batch.completion.device) < answer_mask_prob
            extra = batch.is_answer & rows[:, None]
        return masked_diffusion_terms(model, batch, profile.block_size, mask_id, complementary=complementary,
                                      extra_mask=extra)

    return loss_fn


def _fit_cft(profile: Profile, ex, model, rows, *, loss_fn, lambda_r: float, epochs: float, lr: float, seed: int,
             desc: str, validate=None, schedule: str = "cosine", keep_best: bool = True) -> dict:
    """The CFT training loop on the teacher trajectories (``rows``: ``ex.training_rows()``, the same rows as SFT),
    with the same relabelled and colliding share, and the learning-rate ``schedule`` (a name in
    ``train.SCHEDULES``); ``keep_best``: the best validated state, else the last.

    No rank drill (:mod:`rank_drill`), which SFT can have. In a side check (one H200, every test user,
    ``results/checks/2026-12-01-h200-rank-drill.json``) a 24-epoch CFT that drilled a quarter of its rows, from a
    99.20%-valid parent, was 98.74% valid with sub-blocks of 8 (as undrilled runs) but 97.53% over the whole block
    (undrilled: 99.3% and 99.25%). A likely reason, untested: a drilled row's check is random, so when a diffusion
    view masks part of it the ranks that follow cannot be inferred from anything, and the model learns to guess.
    """
    return train_supervised(model, rows, ex.tokenizer, loss_fn=loss_fn,
                            transform=augmentations(profile, ex, profile.seed + 2, drill=False),
                            epochs=epochs, lr=lr, schedule=schedule, batch_size=profile.batch_size,
                            **engine_settings(profile), lambda_r=lambda_r, lambda_o=profile.lambda_answer,
                            device=profile.device, seed=seed, multiple_of=profile.block_size, desc=desc,
                            validate=validate, keep_best=keep_best)


def train_cft(profile: Profile, ex, ar_model, variant: str = "cft", epochs: float | None = None,
              lr: float | None = None, val_users: int = 128):
    """Conversion fine-tuning from a copy of the AR weights. ``variant``: cft | plain | answer_aware.

    ``epochs`` and ``lr`` default to the profile's; ``val_users`` validation users choose the kept epoch, or, with
    the profile's ``cft_keep = "last"``, only record the curve while the schedule's last state is kept. 128 users
    are a noisy judge of a 16-epoch run: in a full run it kept epoch 9, 98.85% valid on the test users
    (``results/checks/2026-12-02-h200-series-cft16-graphed.json``), while in a side run test validity went on
    climbing, 98.97% at epoch 9 to 99.54% at epoch 13 (``results/checks/2026-12-02-h200-cft16-epoch-curve.json``).
    Returns (model, history)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown CFT variant {variant!r}; valid: {', '.join(VARIANTS)}")
    s = VARIANTS[variant]
    model = copy.deepcopy(ar_model).to(profile.device)
    lambda_r = profile.lambda_answer if s["answer_weighted_reasoning"] else profile.lambda_reasoning
    hist = _fit_cft(profile, ex, model, ex.training_rows(),
                    loss_fn=cft_loss_fn(profile, ex, s["answer_mask_prob"], s["complementary"]),
                    lambda_r=lambda_r, epochs=epochs or profile.cft_epochs, lr=lr or profile.cft_lr,
                    seed=profile.seed, desc=f"CFT ({variant})", validate=diffusion_validate(profile, ex, n=val_users),
                    schedule=profile.cft_schedule, keep_best=profile.cft_keep == "best")
    return model, hist


def continue_cft(profile: Profile, ex, model, steps: int, desc: str = "CFT (continued, off-policy control)"):
    """More CFT steps on the fixed teacher trajectories (with CFT's relabelled rows): the off-policy control OPD is
    compared with."""
    model = copy.deepcopy(model)
    rows = ex.training_rows()
    epochs = steps * profile.batch_size * profile.grad_accum / len(rows)
    hist = _fit_cft(profile, ex, model, rows, loss_fn=cft_loss_fn(profile, ex), lambda_r=profile.lambda_reasoning,
                    epochs=epochs, lr=profile.opd_lr, seed=profile.seed + 7, desc=desc)
    return model, hist
