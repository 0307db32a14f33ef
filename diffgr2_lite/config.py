"""Profiles: one set of code, several sizes.

A profile holds every size and step count of the series. Notebooks take the profile name as a papermill parameter
whose default comes from the ``DIFFGR2_PROFILE`` environment variable (``smoke`` when unset and no GPU is present,
``full`` when a GPU is). ``smoke`` exists so CI can execute every notebook on two CPU cores in about a minute each:
its numbers mean nothing. ``full`` is the profile whose outputs are committed.
"""
from __future__ import annotations

import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace

DATASETS = ("synthetic", "amazon_beauty")
SCHEDULE_NAMES = ("cosine", "stable_decay", "constant")   # train.SCHEDULES, named here so config stays free of torch
EVAL_ENGINES = ("readable", "graphed")                 # decoders.py: the notebooks' decoders, or fast.py's graphed ones
CFT_KEEP = ("best", "last")                            # which CFT state is kept: the best validated, or the last
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")   # torch.compile's


class ConfigError(ValueError):
    """An unknown profile, dataset or stage name, or a profile value out of its valid range."""


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int


@dataclass(frozen=True)
class Profile:
    name: str
    dataset: str                      # default dataset of the profile
    device: str                       # "cpu" or "cuda"
    seed: int = 0
    # data
    synthetic_users: int = 3000
    synthetic_items: int = 400
    max_users: int | None = None      # subsample users (after loading) to keep a profile fast
    history_len: int = 10             # items of history shown in the prompt
    n_candidates: int = 10
    train_positions: int = 3          # training examples per user (the last k positions of its training part)
    max_eval: int = 2000              # evaluation users per split (subsampled deterministically when more)
    sid_levels: tuple[int, ...] = (16, 16)   # codebook sizes of the k-means levels; one more unique level is added
    title_words: int = 2
    teacher_tries: int = 8            # rejection sampling: draws per training example
    teacher_temperature: float = 0.25  # of the teacher's Plackett-Luce draws (low: traces mostly follow its points)
    trace_ranks: bool = True          # the trace ends with every candidate's rank (teacher.Teacher.trace)
    align_decision: bool = True       # the trace's decision ends a diffusion block (teacher.Teacher.decision_fill)
    reading_ratio: float = 1.0        # reading examples (answer-free trace openings) per rejection-sampled example
    # model
    model: ModelSize = field(default_factory=lambda: ModelSize(64, 2, 4, 128))
    # AR SFT, after a copy warm-up (the format's answers on relabelled rows until the answer-validity gate; copy_warmup)
    copy_steps: int = 100             # the most warm-up steps
    copy_batch: int = 32
    copy_lr: float = 1e-3
    copy_gate: float = 0.99           # stop the warm-up once held-out answers are this often valid
    copy_check_every: int = 50        # warm-up steps between two gate checks
    copy_relabel: float = 1.0         # warm-up rows whose SID codes are relabelled (1: all; 0 only to measure why)
    relabel_share: float = 0.25       # SFT and CFT rows whose SID codes are relabelled (kept copying, not recalling)
    collide_share: float = 0.25       # further rows relabelled so that SID prefixes collide (copy by label, not prefix)
    rank_drill_share: float = 0.25    # SFT rows whose check is drawn at random and ranks recounted (rank_drill)
    ar_epochs: float = 1.0
    ar_lr: float = 1e-3
    ar_schedule: str = "cosine"       # of the SFT learning rate: one of SCHEDULE_NAMES
    ar_ema: float = 0.0               # decay of the SFT weight average that is validated and kept (0: none)
    batch_size: int = 32
    lambda_reasoning: float = 0.5     # GR2's decoupled weights: lambda_r < lambda_o
    lambda_answer: float = 1.0
    eval_batch: int = 64
    eval_engine: str = "readable"     # decoders of evaluation and validation: one of EVAL_ENGINES (decoders.py;
    #                                   "graphed": fast.py's, CUDA graphs and bf16 on a GPU)
    # the training engine (train.py): batch_size and copy_batch are one process's micro-batch; a step's global batch
    # is batch_size x grad_accum x processes rows
    grad_accum: int = 1
    length_buckets: int = 2           # completion-length groups of the device batcher (less padding, a few shapes)
    compile: bool | None = None       # torch.compile the training losses (None: runs of >= 1000 steps on CUDA)
    compile_mode: str | None = None   # its mode when on (SFT, CFT): in COMPILE_MODES; "reduce-overhead": CUDA graphs
    # block diffusion
    block_size: int = 32
    # the decoder goes through each block in left-to-right chunks of this many positions, in confidence order inside
    # a chunk (Fast-dLLM v2's sub-blocks; sampler.commit_rule); 0 (or >= block_size): the whole block at once
    sub_block: int = 8
    cft_epochs: float = 1.0
    cft_lr: float = 5e-4
    cft_schedule: str = "cosine"      # of the CFT learning rate: one of SCHEDULE_NAMES
    cft_keep: str = "best"            # the CFT state kept: "best" by validation (strict NDCG@3 of 128 users, once an
    #                                   epoch) or "last", the end of the schedule (validation then only records)
    cft_ablation_epochs: float = 0.5  # CFT variants compared in notebook 05 (shorter than the main run)
    sweep_n: int = 48                 # test users per point of the tau / block-size sweeps (notebook 04)
    # OPD
    opd_tau: float = 0.9              # the threshold rollouts are decoded with (OPD and RL)
    opd_ablation_steps: int = 2
    opd_steps: int = 10
    opd_prompts: int = 8
    opd_rollouts: int = 2
    opd_lr: float = 1e-4
    # RL
    rl_steps: int = 10
    rl_prompts: int = 4
    rl_group: int = 4
    rl_lr: float = 5e-5
    rl_clip: float = 0.2
    rl_hack_steps: int = 2            # the short unconditional-format run that shows order copying
    # speed benchmark
    bench_prompts: int | None = 8     # test prompts the benchmark decodes (None: every test user)
    bench_batches: tuple[int, ...] = (1, 8)
    bench_taus: tuple[float, ...] = (1.0, 0.9, 0.6, 0.4)
    bench_block_sizes: tuple[int, ...] = (32,)
    bench_sub_blocks: tuple[int, ...] = (0, 8)   # 0: commit across the whole block; 8: left-to-right chunks of 8
    bench_repeats: int = 2
    sweep_taus: tuple[float, ...] = (1.0, 0.7, 0.4)
    sweep_block_sizes: tuple[int, ...] = (4, 32)

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke", dataset="synthetic", device="cpu",
        synthetic_users=600, synthetic_items=240, max_eval=48, train_positions=2,
        model=ModelSize(hidden=64, layers=2, heads=4, intermediate=128),
        ar_epochs=1.0, cft_epochs=1.0, batch_size=32, eval_batch=48,
        opd_steps=2, opd_prompts=4, opd_rollouts=2, rl_steps=2, rl_prompts=4, rl_group=4, opd_ablation_steps=1,
        rl_hack_steps=1, cft_ablation_epochs=0.3, copy_steps=0,
        bench_prompts=4, bench_batches=(1, 4), bench_taus=(1.0, 0.6), bench_repeats=1,
        sweep_taus=(1.0, 0.5), sweep_block_sizes=(32,),
    ),
    "full": Profile(
        name="full", dataset="amazon_beauty", device="cuda",
        synthetic_users=20000, synthetic_items=1200, max_eval=2000, train_positions=50,
        sid_levels=(256, 64), title_words=2,
        model=ModelSize(hidden=384, layers=6, heads=6, intermediate=1024),
        reading_ratio=3.0, copy_steps=0, copy_batch=256, copy_check_every=250, ar_epochs=16.0, ar_lr=1e-3,
        ar_schedule="stable_decay",
        cft_epochs=12.0, cft_lr=6e-4, cft_keep="last", compile=None,   # see notebook 05, "How long to convert"
        batch_size=128, eval_batch=512, eval_engine="graphed",
        cft_ablation_epochs=0.5, sweep_n=256,
        opd_steps=10, opd_prompts=24, opd_rollouts=2, opd_lr=2e-5, opd_ablation_steps=2,
        rl_steps=10, rl_prompts=12, rl_group=4, rl_lr=1e-5, rl_hack_steps=4,
        bench_prompts=None, bench_batches=(1, 64), bench_repeats=1,
        bench_block_sizes=(32,), sweep_taus=(1.0, 0.7, 0.4), sweep_block_sizes=(8, 32),
    ),
}


def default_profile_name() -> str:
    """``$DIFFGR2_PROFILE`` if set, else ``full`` on a GPU machine and ``smoke`` elsewhere."""
    env = os.environ.get("DIFFGR2_PROFILE")
    if env:
        return env
    try:
        import torch

        return "full" if torch.cuda.is_available() else "smoke"
    except ImportError:  # pragma: no cover
        return "smoke"


def get_profile(name: str | None = None, dataset: str | None = None, **overrides) -> Profile:
    """Look a profile up by name (None = the default), optionally with another dataset or overridden fields."""
    name = name or default_profile_name()
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}")
    prof = PROFILES[name]
    if dataset is not None:
        if dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
        prof = replace(prof, dataset=dataset)
    if overrides:
        unknown = sorted(set(overrides) - set(prof.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown profile field(s) {unknown}")
        if isinstance(overrides.get("model"), dict):
            overrides["model"] = _model_size(overrides["model"])
        for k, v in overrides.items():
            if isinstance(v, list):
                overrides[k] = tuple(v)
        prof = replace(prof, **overrides)
    validate_profile(prof)
    if prof.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            prof = replace(prof, device="cpu")
    return prof


# ----------------------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class Range:
    """Valid values of a numeric field: ``low`` (excluded when ``open_low``) to ``high`` (excluded when
    ``open_high``); None = unbounded."""

    low: float
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, v) -> bool:
        return ((v > self.low if self.open_low else v >= self.low)
                and (self.high is None or (v < self.high if self.open_high else v <= self.high)))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"


AT_LEAST_0, AT_LEAST_1 = Range(0), Range(1)
POSITIVE, FRACTION, THRESHOLD = Range(0, open_low=True), Range(0, 1), Range(0, 1, open_low=True)
# Valid range of each numeric field (of every element of a tuple field). A field not listed (a new one included)
# only has to be a finite number >= 0 of its declared type: list it here when 0 would break something.
FIELD_RANGES = {
    "synthetic_users": AT_LEAST_1, "synthetic_items": AT_LEAST_1, "max_users": AT_LEAST_1, "history_len": AT_LEAST_1,
    "n_candidates": AT_LEAST_1, "train_positions": AT_LEAST_1, "max_eval": AT_LEAST_1, "sid_levels": AT_LEAST_1,
    "teacher_tries": AT_LEAST_1, "teacher_temperature": POSITIVE,
    "model.hidden": AT_LEAST_1, "model.layers": AT_LEAST_1, "model.heads": AT_LEAST_1, "model.intermediate": AT_LEAST_1,
    "copy_batch": AT_LEAST_1, "copy_lr": POSITIVE, "copy_gate": FRACTION, "copy_check_every": AT_LEAST_1,
    "relabel_share": FRACTION, "collide_share": FRACTION, "rank_drill_share": FRACTION, "copy_relabel": FRACTION,
    "grad_accum": AT_LEAST_1,
    "length_buckets": AT_LEAST_1,
    "ar_epochs": POSITIVE, "ar_lr": POSITIVE, "ar_ema": Range(0, 1, open_high=True), "batch_size": AT_LEAST_1,
    "eval_batch": AT_LEAST_1,
    "block_size": AT_LEAST_1, "cft_epochs": POSITIVE, "cft_lr": POSITIVE, "cft_ablation_epochs": POSITIVE,
    "sweep_n": AT_LEAST_1, "opd_tau": THRESHOLD, "opd_prompts": AT_LEAST_1, "opd_rollouts": AT_LEAST_1,
    "opd_lr": POSITIVE, "rl_prompts": AT_LEAST_1, "rl_group": Range(2), "rl_lr": POSITIVE, "rl_clip": POSITIVE,
    "bench_prompts": AT_LEAST_1, "bench_batches": AT_LEAST_1, "bench_taus": THRESHOLD,
    "bench_block_sizes": AT_LEAST_1, "bench_repeats": AT_LEAST_1, "sweep_taus": THRESHOLD,
    "sweep_block_sizes": AT_LEAST_1,
}


def validate_profile(profile: Profile) -> Profile:
    """Refuse a profile value that would fail later, far from its cause (``block_size=0``, a negative rate).

    Every field is checked against its declared type and :data:`FIELD_RANGES`; the message names the field and the
    valid range.
    """
    _check_fields(profile)
    if profile.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {profile.dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if profile.model.hidden % profile.model.heads:
        raise ConfigError(f"profile field model.hidden={profile.model.hidden} must be a multiple of "
                          f"model.heads={profile.model.heads}")
    if profile.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"profile field compile_mode={profile.compile_mode!r} is invalid: must be one of "
                          f"{', '.join(map(repr, COMPILE_MODES))}")
    if profile.eval_engine not in EVAL_ENGINES:
        raise ConfigError(f"profile field eval_engine={profile.eval_engine!r} is invalid: must be one of "
                          f"{', '.join(EVAL_ENGINES)}")
    if profile.cft_keep not in CFT_KEEP:
        raise ConfigError(f"profile field cft_keep={profile.cft_keep!r} is invalid: must be one of {', '.join(CFT_KEEP)}")
    for name in ("ar_schedule", "cft_schedule"):
        if getattr(profile, name) not in SCHEDULE_NAMES:
            raise ConfigError(f"profile field {name}={getattr(profile, name)!r} is invalid: must be one of "
                              f"{', '.join(SCHEDULE_NAMES)}")
    if profile.relabel_share + profile.collide_share > 1:
        raise ConfigError(f"profile fields relabel_share={profile.relabel_share} and collide_share="
                          f"{profile.collide_share} are shares of the same rows: their sum must be at most 1")
    if profile.rank_drill_share > 0 and not profile.trace_ranks:
        raise ConfigError(f"profile field rank_drill_share={profile.rank_drill_share} drills the trace's ranks, "
                          "but trace_ranks is off: set trace_ranks=True or rank_drill_share=0")
    return profile


def _check_fields(obj, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        _check_value(prefix + f.name, getattr(obj, f.name), hints[f.name])


def _check_value(name: str, value, hint) -> None:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:          # "int | None"
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:                                  # "tuple[int, ...]"
        if not isinstance(value, tuple) or not value:
            raise ConfigError(f"profile field {name}={value!r} must be a non-empty tuple")
        for i, v in enumerate(value):
            _check_value(f"{name}[{i}]", v, typing.get_args(hint)[0])
    elif is_dataclass(hint):
        if not isinstance(value, hint):
            raise ConfigError(f"profile field {name}={value!r} must be a {hint.__name__}")
        _check_fields(value, name + ".")
    elif hint in (int, float):
        rng = FIELD_RANGES.get(name.split("[")[0], AT_LEAST_0)
        what = "an integer" if hint is int else "a number"
        number = isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and value in rng):
            raise ConfigError(f"profile field {name}={value!r} is invalid: must be {what} {rng}")
    elif hint is bool and not isinstance(value, bool):
        raise ConfigError(f"profile field {name}={value!r} must be true or false")
    elif hint is str and not isinstance(value, str):
        raise ConfigError(f"profile field {name}={value!r} must be a string")


def _model_size(d: dict) -> ModelSize:
    """A ``model`` override given as a dict: every size named, nothing else."""
    names = [f.name for f in fields(ModelSize)]
    missing, unknown = [n for n in names if n not in d], sorted(set(d) - set(names))
    if missing or unknown:
        wrong = ", ".join([*(f"missing {n}" for n in missing), *(f"unknown {n}" for n in unknown)])
        raise ConfigError(f"profile field model needs {', '.join(names)} ({wrong})")
    return ModelSize(**d)
