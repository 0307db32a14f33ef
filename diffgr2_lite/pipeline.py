"""Stage artifacts: load what an earlier stage left under ``runs/<profile>/``, or build it now.

Every notebook starts with one of these calls, so it runs on its own: notebook 05 on a fresh clone trains the AR
model (stage 02) first, and on a machine that already ran 02 it just loads the checkpoint. Builders are
deterministic by the profile's seed. A stale artifact (built with other profile settings) is rebuilt, not trusted.

The builders are the stages' own modules (``ar`` through :func:`train_ar`, ``cft``, ``opd``, ``rl``; all train through
``train.py``); this module decides whether to call them. Started on several processes (``accelerate launch``), the
data is built by process 0 first, every process trains, and process 0 alone writes the checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from . import artifacts as art
from .ar import decode_budget, max_completion_len, sft_terms
from .batches import tokenize_split
# re-exported (notebooks call them as pl.*): train_cft, continue_cft (05, 06), ar_max_new (08), model_fingerprint
from .cft import continue_cft, train_cft  # noqa: F401
from .config import Profile
from .copy_warmup import train_warmup
from .decoders import (ar_decoder, ar_max_new, diffusion_decoder, diffusion_validate, effective_sub_block,
                       engine_for, validation_score)
from .evaluate import bootstrap_vs, cached_evaluation, evaluate, fixed_rankings, model_fingerprint  # noqa: F401
from .model import CheckpointError, build_model, load_checkpoint, n_parameters, save_checkpoint
from .rank_drill import augmentations
from .train import distributed, end_distributed, engine_settings, train_supervised

STAGES = ("data", *art.RESULT_STAGES, "speed")


# bump when the example builder changes what it writes: cached data built by older code is then rebuilt
DATA_VERSION = 12


def profile_hash(profile: Profile, *fields: str) -> str:
    d = profile.to_dict()
    d = {k: d[k] for k in fields} if fields else d
    d["data_version"] = DATA_VERSION
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


DATA_FIELDS = ("dataset", "seed", "synthetic_users", "synthetic_items", "max_users", "history_len", "n_candidates",
               "train_positions", "max_eval", "sid_levels", "title_words", "teacher_tries", "teacher_temperature",
               "reading_ratio", "trace_ranks", "align_decision", "block_size")


# ----------------------------------------------------------------------------------------------- data
def load_dataset(profile: Profile):
    """The raw dataset of the profile: the embedded synthetic generator or real Amazon Beauty."""
    if profile.dataset == "synthetic":
        from .data.synthetic import generate_synthetic

        return generate_synthetic(profile.synthetic_users, profile.synthetic_items, seed=profile.seed)
    from .data.amazon import load_amazon_beauty

    return load_amazon_beauty()


def get_examples(profile: Profile, rebuild: bool = False, progress: bool = True):
    """The ExampleSet of the profile (tokenised splits, tokenizer, SIDs, report), cached in ``runs/<p>/data``."""
    with distributed().main_process_first():                  # several processes: process 0 builds, the others load
        return _get_examples(profile, rebuild, progress)


def _get_examples(profile: Profile, rebuild: bool = False, progress: bool = True):
    from datasets import load_from_disk

    from .data.examples import ExampleSet, build_examples
    from .data.semantic_ids import SemanticIds
    from .text import PromptFormat, load_tokenizer

    d = art.stage_dir(profile, "data")                    # created by the first write: a missing dataset leaves none
    key = profile_hash(profile, *DATA_FIELDS)
    meta_path = d / "meta.json"
    if not rebuild and meta_path.exists():
        try:
            meta = art.read_json(meta_path)
            if meta.get("key") == key:
                splits = {s: load_from_disk(str(d / "splits" / s)) for s in ("train", "reading", "valid", "test")}
                codes = np.load(d / "sids.npy", allow_pickle=False)
                return ExampleSet(None, SemanticIds(codes, tuple(meta["codebook_sizes"])),
                                  PromptFormat(**meta["format"]), load_tokenizer(d / "tokenizer"), splits, None,
                                  meta["report"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"cached data in {d} is incomplete or unreadable ({exc}); rebuilding it")
    ex = build_examples(load_dataset(profile), profile, progress=progress)
    tok = ex.tokenizer
    for s in ex.splits:
        ex.splits[s] = tokenize_split(ex.splits[s], tok, "completion")          # also direct_ids
    with art.atomic_dir(d / "splits") as tmp:
        for s, ds in ex.splits.items():
            ds.save_to_disk(str(Path(tmp) / s))
    with art.atomic_dir(d / "tokenizer") as tmp:
        tok.save_pretrained(str(tmp))
    tmp_npy = d / ".sids.tmp.npy"
    np.save(tmp_npy, ex.sids.codes, allow_pickle=False)
    tmp_npy.replace(d / "sids.npy")
    fmt = ex.fmt
    art.atomic_write_json(meta_path, {
        "key": key, "codebook_sizes": list(ex.sids.codebook_sizes), "report": ex.report,
        "format": {"history_len": fmt.history_len, "n_candidates": fmt.n_candidates,
                   "title_words": fmt.title_words, "sid_len": fmt.sid_len}})
    ex.splits = {s: load_from_disk(str(d / "splits" / s)) for s in ex.splits}     # memory-mapped, like a reload
    return ex


def write_stage(profile, stage: str, record: dict) -> dict:
    art.atomic_write_json(art.stage_dir(profile, stage) / "metrics.json", record)
    return record


def record_fixed(profile: Profile, ex, stage: str, column: str | None, reference: dict | None = None) -> dict:
    """Retriever order (``column=None``) or the teacher's greedy ranking, scored on the test split."""
    t0 = time.time()
    scored = fixed_rankings(ex.splits["test"], ex, column)
    extra = {"ci95": bootstrap_vs(scored, reference, profile.seed)} if reference else {}
    rec = art.stage_record(stage, profile, scored, scored["n"], "cpu", time.time() - t0, extra)
    write_stage(profile, stage, rec)
    return {"record": rec, "scored": scored}


def _cached(profile: Profile, stage: str, model, settings: dict, run):
    """Evaluate once per (stage, settings, weights, data): later notebooks reuse the saved per-user results.
    ``settings`` name the decoding engine, so a graphed result is never served for a readable one or back."""
    return cached_evaluation(art.stage_dir(profile, stage) / "scored.json",
                             {**settings, "data": profile_hash(profile, *DATA_FIELDS)}, model, run)


# ----------------------------------------------------------------------------------------------- AR
def new_model(profile: Profile, ex):
    """A randomly initialised re-ranker sized by the profile (positions for the longest training completion)."""
    max_pos = ex.fmt.prompt_len + max_completion_len(ex.splits["train"]) + 64
    return build_model(profile.model, len(ex.tokenizer), max_pos, ex.tokenizer, seed=profile.seed).to(profile.device)


COPY_WARMUP_FIELDS = DATA_FIELDS + ("device", "model", "copy_steps", "copy_batch", "copy_lr", "copy_gate",
                                    "copy_check_every", "copy_relabel")


def gate_rows(ex, n: int = 256) -> list[dict]:
    """Held-out prompts for the warm-up's gate: the first ``n`` validation users, with the teacher's trace."""
    valid = ex.splits["valid"]
    return valid.select(range(min(n, len(valid)))).to_list()


def get_copy_warmup(profile: Profile, ex, rebuild: bool = False):
    """The copy-warmed model both AR variants start from (trained once, then loaded). Returns (model, history)."""
    def build():
        model = new_model(profile, ex)
        return model, train_warmup(model, ex.training_rows(), ex, gate_rows(ex), max_steps=profile.copy_steps,
                                   batch_size=profile.copy_batch, lr=profile.copy_lr, gate=profile.copy_gate,
                                   check_every=profile.copy_check_every, device=profile.device, seed=profile.seed,
                                   compile=profile.compile, relabel=profile.copy_relabel)

    return get_stage_model(profile, ex, "copy_warmup", build, rebuild, key_fields=COPY_WARMUP_FIELDS)


def train_ar(profile: Profile, ex, variant: str = "reasoning", **overrides):
    """SFT of the AR re-ranker: ``reasoning`` (trace + answer) or ``direct`` (the answer alone).

    Both variants start from the same copy warm-up (:func:`get_copy_warmup`) and train on the same prompts
    (:meth:`ExampleSet.training_rows`); a ``relabel_share`` of each batch has its SID codes relabelled, so copying is
    kept, and with reasoning a ``rank_drill_share`` has its check drawn at random and its ranks recounted
    (:mod:`rank_drill`).
    """
    import copy

    tok = ex.tokenizer
    train_ds = ex.training_rows(variant)
    warm = None
    if profile.copy_steps > 0:
        warm_model, warm = get_copy_warmup(profile, ex)
        model = copy.deepcopy(warm_model).to(profile.device)
    else:
        model = new_model(profile, ex)
    max_new = decode_budget(train_ds)
    cfg = dict(epochs=profile.ar_epochs, lr=profile.ar_lr, schedule=profile.ar_schedule, ema=profile.ar_ema,
               batch_size=profile.batch_size, lambda_r=profile.lambda_reasoning, lambda_o=profile.lambda_answer,
               transform=augmentations(profile, ex, profile.seed + 1, drill=variant == "reasoning"))
    cfg.update(engine_settings(profile))
    cfg.update(overrides)
    hist = train_supervised(model, train_ds, tok, loss_fn=sft_terms, device=profile.device, seed=profile.seed,
                            desc=f"AR SFT ({variant})", **cfg,
                            validate=lambda m: validation_score(ar_decoder(m, ex, max_new, False, profile.device,
                                                                           engine=profile.eval_engine),
                                                                ex, profile))
    hist["parameters"] = n_parameters(model)
    hist["max_new"] = max_new
    if warm is not None:
        hist["copy_warmup"] = warm
    return model, hist


def get_ar(profile: Profile, ex, variant: str = "reasoning", rebuild: bool = False):
    """Load the AR checkpoint of ``variant`` or train it. Returns (model, history)."""
    stage = "ar" if variant == "reasoning" else "ar_direct"
    return get_stage_model(profile, ex, stage, lambda: train_ar(profile, ex, variant), rebuild)


def evaluate_ar(profile: Profile, model, ex, stage: str, constrained: bool = False, reference: dict | None = None,
                split: str = "test", max_new: int | None = None) -> dict:
    max_new = max_new or ar_max_new(ex)
    engine = engine_for(profile.eval_engine, not constrained)

    def run():
        decode = ar_decoder(model, ex, max_new, constrained, profile.device, engine=engine)
        return evaluate(decode, ex.splits[split], ex, profile.eval_batch, profile.device, desc=f"decoding {stage}")

    if split == "test":
        scored, seconds = _cached(profile, stage, model, {"constrained": constrained, "max_new": max_new,
                                                          "engine": engine}, run)
    else:
        with art.Timer() as t:
            scored = run()
        seconds = t.s
    extra = {"ci95": bootstrap_vs(scored, reference, profile.seed)} if reference else {}
    extra["tokens_per_forward"] = scored["tokens_per_forward"]
    extra["engine"] = engine
    rec = art.stage_record(stage, profile, scored, scored["n"], profile.device, seconds, extra, split)
    if split == "test":
        write_stage(profile, stage, rec)
    return {"record": rec, "scored": scored}


# ----------------------------------------------------------------------------------------------- diffusion
def evaluate_diffusion(profile: Profile, model, ex, stage: str, tau: float = 1.0, block_size: int | None = None,
                       reference: dict | None = None, split: str = "test", assign: bool = False, write: bool = True,
                       n: int | None = None, sub_block: int | None = None) -> dict:
    """Decode ``split`` with the block sampler (``sub_block``: left-to-right chunks, None: the profile's, 0: the whole
    block; ``assign``: the external assignment decoder) and score it; the test split's full evaluation is cached and
    written as the stage's record."""
    B = block_size or profile.block_size
    sub_block = effective_sub_block(profile, B, sub_block)
    ds = ex.splits[split]
    if n is not None:
        ds = ds.select(range(min(n, len(ds))))
    engine = profile.eval_engine                 # greedy, so either engine decodes (assign rewrites its output)

    def run():
        decode = diffusion_decoder(model, ex, profile, tau, B, assign=assign, sub_block=sub_block or 0, engine=engine)
        return evaluate(decode, ds, ex, profile.eval_batch, profile.device, desc=f"decoding {stage} (B={B}, tau={tau})")

    if write and split == "test" and n is None:
        scored, seconds = _cached(profile, stage, model, {"tau": tau, "B": B, "assign": assign, "sub_block": sub_block,
                                                          "engine": engine}, run)
    else:
        with art.Timer() as t:
            scored = run()
        seconds = t.s
    extra = {"block_size": B, "tau": tau, "tokens_per_forward": scored["tokens_per_forward"],
             "engine": engine}
    if sub_block:
        extra["sub_block"] = sub_block
    if reference:
        extra["ci95"] = bootstrap_vs(scored, reference, profile.seed)   # on the first n users when n is given
    rec = art.stage_record(stage, profile, scored, scored["n"], profile.device, seconds, extra, split)
    if write and split == "test" and n is None:
        write_stage(profile, stage, rec)
    return {"record": rec, "scored": scored}


def get_stage_model(profile: Profile, ex, stage: str, build, rebuild: bool = False, key_fields: tuple[str, ...] = ()):
    """Generic load-or-build for a checkpointed stage: ``build()`` returns (model, history).

    The checkpoint is reused while the profile fields it depends on are unchanged (``key_fields``; all by default).
    """
    d = art.stage_dir(profile, stage)
    key = profile_hash(profile, *key_fields)
    if not rebuild and (d / "model" / "meta.json").exists():
        try:
            model, _, meta = load_checkpoint(d / "model", ex.tokenizer, profile.device)
            if meta.get("key") == key:
                return model, meta.get("history", {})
            print(f"{stage}: checkpoint built with other settings; rebuilding")
        except CheckpointError as exc:
            print(f"rebuilding {stage}: {exc}")
    model, hist = build()
    state = distributed()
    if state.is_main_process:                                   # several processes hold the same weights: one writes
        save_checkpoint(model, ex.tokenizer, d / "model", {"key": key, "history": hist, "stage": stage})
    state.wait_for_everyone()
    return model, hist


def get_cft(profile: Profile, ex, ar_model, rebuild: bool = False):
    return get_stage_model(profile, ex, "cft", lambda: train_cft(profile, ex, ar_model, "cft"), rebuild)


def reference_scored(profile: Profile, model, ex) -> dict:
    """The AR model's free decoding on the test split (the reference of every paired interval)."""
    return evaluate_ar(profile, model, ex, "ar")["scored"]


def train_opd_stage(profile: Profile, ex, student, teacher, steps: int | None = None, **kw):
    """On-policy distillation from a copy of ``student`` towards the frozen AR ``teacher``."""
    import copy

    from .opd import train_opd

    student = copy.deepcopy(student)
    cfg = dict(steps=steps or profile.opd_steps, prompts=profile.opd_prompts, rollouts=profile.opd_rollouts,
               lr=profile.opd_lr, tau=profile.opd_tau, block_size=profile.block_size, device=profile.device,
               sub_block=effective_sub_block(profile, profile.block_size),
               seed=profile.seed, validate=diffusion_validate(profile, ex), keep_best=True)
    cfg.update(kw)
    hist = train_opd(student, teacher, ex.splits["train"], ex, **cfg)
    return student, hist


def get_opd(profile: Profile, ex, cft_model, teacher, rebuild: bool = False):
    return get_stage_model(profile, ex, "opd", lambda: train_opd_stage(profile, ex, cft_model, teacher), rebuild)


def train_rl_stage(profile: Profile, ex, policy, steps: int | None = None, conditional: bool = True, **kw):
    """Group-relative policy optimisation of a copy of ``policy`` against the re-ranking reward."""
    import copy

    from .rl import train_rl

    policy = copy.deepcopy(policy)
    cfg = dict(steps=steps or profile.rl_steps, prompts=profile.rl_prompts, group=profile.rl_group, lr=profile.rl_lr,
               clip=profile.rl_clip, tau=profile.opd_tau, block_size=profile.block_size, device=profile.device,
               sub_block=effective_sub_block(profile, profile.block_size),
               seed=profile.seed, conditional=conditional, validate=diffusion_validate(profile, ex), keep_best=True)
    cfg.update(kw)
    hist = train_rl(policy, ex.splits["train"], ex, **cfg)
    return policy, hist


def get_rl(profile: Profile, ex, opd_model, rebuild: bool = False):
    return get_stage_model(profile, ex, "rl", lambda: train_rl_stage(profile, ex, opd_model), rebuild)


TRAIN_STAGES = ("copy_warmup", "ar", "ar_direct", "cft", "opd", "rl")


def train_stages(profile: Profile, stages=TRAIN_STAGES) -> None:
    """Load or build the checkpoints of ``stages`` (and of the stages they start from): ``python -m diffgr2_lite
    train``. Under ``accelerate launch --num_processes N`` every stage trains data-parallel on N processes."""
    unknown = sorted(set(stages) - set(TRAIN_STAGES))
    if unknown:
        raise ValueError(f"unknown training stage(s) {unknown}; valid: {', '.join(TRAIN_STAGES)}")
    ex = get_examples(profile)
    done = {}

    def once(name, build):
        if name not in done:
            t0 = time.time()
            done[name] = build()[0]
            distributed().print(f"{name}: ready ({time.time() - t0:.0f} s)")
        return done[name]

    builders = {
        "copy_warmup": lambda: once("copy_warmup", lambda: get_copy_warmup(profile, ex)),
        "ar": lambda: once("ar", lambda: get_ar(profile, ex, "reasoning")),
        "ar_direct": lambda: once("ar_direct", lambda: get_ar(profile, ex, "direct")),
        "cft": lambda: once("cft", lambda: get_cft(profile, ex, builders["ar"]())),
        "opd": lambda: once("opd", lambda: get_opd(profile, ex, builders["cft"](), builders["ar"]())),
        "rl": lambda: once("rl", lambda: get_rl(profile, ex, builders["opd"]())),
    }
    for stage in stages:
        builders[stage]()
    end_distributed()


def load_stage_records(profile: Profile) -> dict:
    """Every stage's saved metrics.json of this profile (for the final table)."""
    out = {}
    for stage in STAGES:
        f = art.stage_dir(profile, stage) / "metrics.json"
        if f.exists():
            out[stage] = art.read_json(f)
    return out
