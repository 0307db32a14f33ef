"""A tiny SFT case for the training-loop tests, and (run as a script under torchrun) its multi-process version.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train_case.py OUT_DIR BATCH ACCUM STEPS

trains the tiny Llama of ``tiny.py`` with :func:`run` on every process and writes ``OUT_DIR/rank<r>.pt`` (the logged
losses and the final weights).
"""
from __future__ import annotations

import sys

import torch

from tiny import EOS, tiny_model

ANSWER_ID = 5


class StubTokenizer:
    """What :func:`~diffgr2_lite.batches.make_batch` asks of a tokenizer."""

    eos_token_id = EOS

    def convert_tokens_to_ids(self, token):
        return {"<answer>": ANSWER_ID}.get(token, -1)          # no "pick" in the toy rows


def toy_rows(n: int = 48, seed: int = 0) -> list[dict]:
    """Prompts of 6 tokens; completions "x x <answer> y y ... <eos>" of two length families (to exercise buckets).

    Learnable: the completion repeats prompt tokens, so a model trained on it lowers its loss quickly."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        p = [1] + torch.randint(6, 50, (5,), generator=g).tolist()
        extra = 2 if i % 3 else 9
        c = p[1:3] + [ANSWER_ID] + p[1:1 + extra % 5 + 1] + [p[-1]] * (extra // 3) + [EOS]
        rows.append({"prompt_ids": p, "completion_ids": c})
    return rows


def run(batch_size: int, grad_accum: int, steps: int, seed: int = 0, lr: float = 3e-3):
    """Train the tiny model with the one loop (SFT loss, 2 length buckets); return (losses, final state dict)."""
    from diffgr2_lite.ar import sft_terms
    from diffgr2_lite.batches import DeviceBatches
    from diffgr2_lite.train import Trainer, distributed

    state = distributed()
    model = tiny_model(seed=seed, init=0.05)
    data = DeviceBatches(toy_rows(), StubTokenizer(), batch_size=batch_size, grad_accum=grad_accum, buckets=2,
                         multiple_of=2, seed=seed, device="cpu", rank=state.process_index, world=state.num_processes)
    trainer = Trainer(model, lr=lr, total_steps=steps, grad_accum=grad_accum, log_every=1, device="cpu",
                      progress=False)
    hist = trainer.fit(data, sft_terms, keep_best=False)
    return hist["loss"], {k: v.detach().clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    from pathlib import Path

    from diffgr2_lite.train import distributed, end_distributed

    out, batch, accum, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    losses, weights = run(batch, accum, steps)
    state = distributed()
    torch.save({"losses": losses, "weights": weights, "world": state.num_processes},
               out / f"rank{state.process_index}.pt")
    print(f"rank {state.process_index}: trained and saved", file=sys.stderr, flush=True)   # where a crash happened
    end_distributed()
    print(f"rank {state.process_index}: process group closed", file=sys.stderr, flush=True)
