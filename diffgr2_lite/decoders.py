"""Decoders as the evaluator takes them (``decode(rows, prompt) -> dict``), and the validation score built on them.

:func:`ar_decoder` is AR decoding with a KV cache, free or constrained (:mod:`diffgr2_lite.ar`);
:func:`diffusion_decoder` the block-diffusion sampler (:mod:`diffgr2_lite.diffusion.sampler`), optionally followed by
the external assignment decoder. :func:`validation_score` is what every training stage selects its checkpoint by.

Two engines run the same decoding rule (a profile's ``eval_engine``): ``readable``, the decoders the notebooks teach,
and ``graphed``, the static-cache decoders of :mod:`diffgr2_lite.fast` that notebook 08 times (CUDA graphs and bf16
weights on a GPU; eager and float32 on a CPU, where the tests find the readable decoders' tokens: the static cache
takes another attention path, so logits agree to float rounding, not bit for bit). Greedy decoding only: constrained
and sampled decoding exist in the readable engine alone (:func:`engine_for`); the external assignment decoder
rewrites the answer of either engine's output, scored by the model itself.
"""
from __future__ import annotations

from .ar import AnswerConstraint, ar_decode, candidate_token_ids, decode_budget, default_max_blocks
from .config import EVAL_ENGINES as ENGINES
from .evaluate import evaluate


def ar_max_new(ex) -> int:
    """The decoding budget: the longest training completion plus 8 tokens."""
    return decode_budget(ex.splits["train"])


def graphed(model, build):
    """``decode(rows, prompt)`` over :mod:`fast` decoders: a copy of the weights (bf16 on a GPU), taken now on the
    model's own device, and one static-shape decoder per batch shape, built by ``build(model, batch_size,
    prompt_len)`` on first use (the last, smaller batch of an evaluation gets its own)."""
    from .fast import speed_model

    fast_model, built = speed_model(model), {}

    def decode(rows, prompt):
        shape = tuple(prompt.shape)
        if shape not in built:
            built[shape] = build(fast_model, *shape)
        return built[shape].decode(prompt)

    return decode


def engine_for(engine: str, greedy_only: bool) -> str:
    """The engine that decodes: ``engine``, unless the decoding needs the readable one (``greedy_only`` False:
    constrained or sampled)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown decoding engine {engine!r}; valid: {', '.join(ENGINES)}")
    return engine if greedy_only else "readable"


def ar_decoder(model, ex, max_new: int, constrained: bool, device, temperature: float = 0.0,
               engine: str = "readable"):
    """Greedy (or sampled) AR decoding; ``engine="graphed"`` runs free greedy decoding on :class:`fast.FastARDecoder`
    (constrained or sampled decoding stays readable). The graphed decoder checks "every row ended?" every 8 steps, so
    its ``forwards`` can exceed the readable count by a few per batch; the tokens do not change."""
    tok = ex.tokenizer
    if engine_for(engine, not constrained and temperature == 0.0) == "graphed":
        from .fast import FastARDecoder

        return graphed(model, lambda m, n, P: FastARDecoder(m, n, P, max_new, tok.eos_token_id))

    def decode(rows, prompt):
        cons = AnswerConstraint(candidate_token_ids(rows, ex, tok, device), tok, max_new) if constrained else None
        return ar_decode(model, prompt, max_new, tok.eos_token_id, cons, temperature)

    return decode


def effective_sub_block(profile, block_size: int, sub_block: int | None = None) -> int | None:
    """The chunk the decoder commits in: ``sub_block`` (None: the profile's), or None for the whole block (0, or a
    chunk at least as long as the block)."""
    s = profile.sub_block if sub_block is None else sub_block
    return s if s and s < block_size else None


def diffusion_decoder(model, ex, profile, tau: float = 1.0, block_size: int | None = None, temperature: float = 0.0,
                      assign: bool = False, sub_block: int | None = None, max_blocks: int | None = None,
                      engine: str | None = None):
    """Block-diffusion decoding; ``assign`` rewrites each answer with the external assignment decoder (after either
    engine's sampler; the assignment itself is scored with ``model``).

    ``sub_block``: left-to-right chunks inside a block (None: the profile's ``sub_block``; 0: the whole block).
    ``max_blocks``: default, enough for the longest training completion. ``engine``: None, the profile's
    ``eval_engine`` (greedy decoding only; see :func:`engine_for`)."""
    from .diffusion.sampler import diffusion_decode
    from .text import label_token_ids

    tok = ex.tokenizer
    B = block_size or profile.block_size
    max_blocks = max_blocks or default_max_blocks(ex.splits["train"], B)
    sub_block = effective_sub_block(profile, B, sub_block)
    if engine_for(engine or profile.eval_engine, temperature == 0.0) == "graphed":
        from .fast import FastDiffusionDecoder

        sample = graphed(model, lambda m, n, P: FastDiffusionDecoder(
            m, n, P, max_blocks, B, tok.mask_token_id, tok.eos_token_id, tau=tau, sub_block=sub_block))
    else:
        def sample(rows, prompt):
            return diffusion_decode(model, prompt, max_blocks, B, tok.mask_token_id, tok.eos_token_id, tau=tau,
                                    temperature=temperature, sub_block=sub_block).as_dict()
    if not assign:
        return sample

    def sample_and_assign(rows, prompt):
        from .diffusion.assignment import assign_answer

        out = sample(rows, prompt)
        labels = label_token_ids(tok, len(rows[0]["candidates"]))
        out["tokens"] = assign_answer(model, prompt, out["tokens"], candidate_token_ids(rows, ex, tok, prompt.device),
                                      B, tok.mask_token_id, tok.convert_tokens_to_ids("<answer>"), labels)
        return out

    return sample_and_assign


def validation_score(decode, ex, profile, n: int = 256, metric: str = "ndcg@3") -> float:
    """Strict validation NDCG@3 (an invalid output counts as a miss).

    Model selection uses the strict score: under the paper's fallback every all-invalid checkpoint scores exactly the
    retriever floor, so early checkpoints that cannot yet write a ranking would tie with good ones.
    """
    valid = ex.splits["valid"].select(range(min(n, len(ex.splits["valid"]))))
    return evaluate(decode, valid, ex, profile.eval_batch, profile.device, desc="validating")["metrics_strict"][metric]


def diffusion_validate(profile, ex, n: int = 128, tau: float = 1.0):
    """Strict validation NDCG@3 of a block-diffusion model decoded with the series' sampler (the profile's
    sub-blocks and ``eval_engine``)."""
    blocks = default_max_blocks(ex.splits["train"], profile.block_size)       # once, not at every validation
    return lambda m: validation_score(diffusion_decoder(m, ex, profile, tau, max_blocks=blocks), ex, profile, n=n)
