"""A tiny random Llama and random prompts shared by the decoder tests."""
from __future__ import annotations

import torch

VOCAB, PAD, BOS, EOS, MASK = 50, 0, 1, 2, 4


def tiny_model(seed: int = 0, init: float = 0.5, eos_scale: float = 1.5):
    """A random 2-layer Llama (hidden 32). A large init makes distributions peaked (so tau matters); a longer <eos>
    output row makes rows end at different times (so ended rows are exercised)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=init, attn_implementation="sdpa",
                      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        model.lm_head.weight[EOS] *= eos_scale
    return model


def random_prompt(n: int, seed: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(5, VOCAB, (n, length), generator=g)
    p[:, 0] = BOS
    return p
