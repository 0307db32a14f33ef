"""Build, save and load the re-ranker: a small Llama-style decoder from transformers, trained from scratch.

The same weights serve every stage: the AR re-ranker, and (after conversion, which changes no weight) the
block-diffusion one. A checkpoint folder holds the model, the tokenizer and a ``meta.json`` with the vocabulary
fingerprint, so a checkpoint can never be paired with another vocabulary by mistake.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .artifacts import atomic_dir, atomic_write_json, read_json
from .text import load_tokenizer, save_tokenizer, vocab_fingerprint


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or belongs to another vocabulary."""


def build_model(size, vocab_size: int, max_positions: int, tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=size.hidden, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.heads, intermediate_size=size.intermediate,
        max_position_embeddings=max_positions, rope_theta=10000.0, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",   # sdpa honours a 4D boolean mask as given (eager would add it: silently wrong)
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def cache_kwargs(model, cache) -> dict:
    """The keyword that passes a KV cache to forward: ``cache`` on newer transformers, ``past_key_values`` before.

    transformers 5.24 deprecates ``past_key_values`` (removal announced for 5.40); the GPU image has 5.17, which only
    knows ``past_key_values``. Every cached call in the package goes through here, so the switch is one line.
    """
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def n_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model, tokenizer, path: str | Path, meta: dict | None = None) -> None:
    """Write model + tokenizer + meta into ``path`` atomically (the old checkpoint stays until the new one is whole)."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        atomic_write_json(Path(tmp) / "meta.json", {**(meta or {}), "vocab_fingerprint": vocab_fingerprint(tokenizer)})


def load_checkpoint(path: str | Path, tokenizer=None, device="cpu"):
    """Load (model, tokenizer). With ``tokenizer`` given, refuse a checkpoint trained on another vocabulary.

    Anything unreadable (a truncated ``model.safetensors``, a malformed ``meta.json``) is a CheckpointError naming the
    file, so callers that rebuild on CheckpointError rebuild instead of crashing.
    """
    path = Path(path)
    if not (path / "meta.json").exists() or not (path / "config.json").exists():
        raise CheckpointError(f"no complete checkpoint at {path} (config.json and meta.json expected)")
    meta = _read_meta(path / "meta.json")
    if tokenizer is not None and meta.get("vocab_fingerprint") != vocab_fingerprint(tokenizer):
        raise CheckpointError(
            f"checkpoint {path} was trained on another vocabulary (fingerprint {meta.get('vocab_fingerprint')}, "
            f"current data {vocab_fingerprint(tokenizer)}); rebuild it from this data or point to the right run")
    try:
        tok = tokenizer or load_tokenizer(path)
    except Exception as exc:  # a missing or corrupt tokenizer.json
        raise CheckpointError(f"the tokenizer of checkpoint {path} is unreadable ({exc})") from exc
    model = _load_weights(path).to(device)
    model.eval()
    return model, tok, meta


def _read_meta(path: Path) -> dict:
    try:
        meta = read_json(path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a JSON object; delete it to rebuild the stage")
    return meta


def _load_weights(path: Path):
    """The model on the CPU; the safetensors headers are opened first so that a damaged one is named."""
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError derives from Exception only
            raise CheckpointError(f"checkpoint file {f} is unreadable ({exc})") from exc
    try:
        return LlamaForCausalLM.from_pretrained(str(path), attn_implementation="sdpa")
    except Exception as exc:  # missing weights, broken config.json, shapes that do not match
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {exc})") from exc
