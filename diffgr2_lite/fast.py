"""The AR and block-diffusion decoders again, engineered for speed -- and engineered *the same way* for both.

:func:`diffgr2_lite.ar.ar_decode` and :func:`diffgr2_lite.diffusion.sampler.diffusion_decode` are written to be read:
a growing ``DynamicCache``, fresh tensors every step, one Python-level model call per step. On a GPU a model this
small is *launch-bound*: an eager forward of a ~40M-parameter Llama costs about 10 ms on an H100, almost all of it
spent launching a few hundred tiny kernels, while the arithmetic takes well under 1 ms. Timing the readable decoders
would measure Python, not the method. (``model.generate`` is no better: about 60x slower per token here.)

So both decoders get the same four pieces of engineering, and nothing else:

1. **A preallocated static KV cache** (:class:`StaticKV`): one ``[batch, heads, L, head_dim]`` buffer per layer for
   the longest sequence, written in place at a position *we* choose (the prompt at 0, a token or block at its
   absolute position). Nothing grows, so every step has the same shapes and the same memory addresses.
2. **Static shapes.** Every step attends over the whole buffer with an explicit 4D boolean mask
   (``key position < limit``): positions not written yet are masked, not sliced away. AR has one step shape (1 query
   token); diffusion has two (``B`` query tokens, and ``2B`` for the fused "write the finished block + first step of
   the next one").
3. **bf16 weights on GPU** (:func:`speed_model`), float32 on CPU.
4. **CUDA graphs** (:class:`StepGraph`): each step shape -- the forward *and* the token choice (greedy pick for AR,
   the tau commit rule for diffusion) -- is captured once and replayed, so a step is one launch. With
   ``graphs=False`` (or on CPU) the very same Python step function runs eagerly; the tests compare that path token
   for token against the readable decoders.

The host loop stays on the CPU and decides only when to stop. AR looks at "has every row ended?" every
``check_every`` steps (each look is a device sync); diffusion must look after every step ("is the block full?" -- the
number of steps per block *is* the method), one small bool read per step.
"""
from __future__ import annotations

import copy
import gc
import inspect
import weakref

import torch

from .ar import pick
from .diffusion.sampler import _choose, commit_rule
from .model import cache_kwargs


# ----------------------------------------------------------------------------------------------- model + cache
def speed_model(model, device=None, dtype=None):
    """A copy of ``model`` for timing: eval mode, on ``device``, weights in bf16 on CUDA (float32 elsewhere).

    Only parameters are cast; float buffers (the rotary ``inv_freq``) stay float32, as they were in training under
    autocast -- a bf16 ``inv_freq`` would shift every position's rotation by up to a radian at position ~300.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m = copy.deepcopy(model).to(device).eval()
    for p in m.parameters():
        p.data = p.data.to(dtype)
    return m


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


class StaticKV:
    """A ``transformers.StaticCache``, preallocated, plus the one thing it lacks: writing where we say.

    A ``StaticCache`` layer keeps its write position in a tensor ``cumulative_length`` and writes each update at
    ``cumulative_length + arange(new)``, then advances it; it ignores any position you pass (DESIGN.md section 11).
    Repeating a block step would therefore *append* the block again. :meth:`seek` sets every layer's write position
    in place (the tensor keeps its address, so a CUDA graph that captured the cache still sees it) before each
    forward: the prompt is written at 0, an AR token at its position, a diffusion block at its first position --
    so recomputing a block simply overwrites it. ``seek`` accepts an int or a 0-d device tensor (inside a graph).

    Checked on transformers 5.17 and 5.24: ``StaticCache(config=..., max_cache_len=...)``, ``early_initialization(
    batch_size, num_heads, head_dim, dtype, device)`` and the ``cumulative_length`` tensor are the same in both.
    """

    def __init__(self, model, batch_size: int, max_len: int, dtype=None, device=None):
        from transformers import StaticCache

        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        p = next(model.parameters())
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_len = max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.cache.early_initialization(batch_size, heads, head_dim, dtype or p.dtype, device or p.device)
        self._pos = []
        for layer in self.cache.layers:
            pos = getattr(layer, "cumulative_length", None)
            if not isinstance(pos, torch.Tensor):
                raise RuntimeError("this transformers version's StaticCache layers keep no tensor `cumulative_length`;"
                                   " StaticKV.seek needs one (checked on transformers 5.17 and 5.24)")
            self._pos.append(pos)

    def seek(self, position) -> None:
        """Make the next forward write its keys and values starting at ``position`` (int or 0-d tensor)."""
        for pos in self._pos:
            if isinstance(position, torch.Tensor):
                pos.copy_(position)
            else:
                pos.fill_(int(position))

    def position(self) -> int:
        """The current write position (a host sync: for tests and debugging only)."""
        return int(self._pos[0])

    @property
    def layers(self):
        return self.cache.layers


class StepGraph:
    """One decode step: a Python function that reads and writes only preallocated tensors.

    With ``enabled`` it is captured once as a CUDA graph (after warm-up on a side stream, as PyTorch requires) and
    every call replays the graph: a single launch for the whole forward + token choice. Without it the function simply
    runs. ``reset`` puts the decoder state back to something valid before each warm-up run (warm-up really executes).

    A decoder's own method is held weakly: the decoder owns its step graphs, and a strong reference back would keep
    the decoder (its static cache, its graphs' memory) alive after its last use, until a garbage collection.
    """

    def __init__(self, step, enabled: bool):
        self._step = weakref.WeakMethod(step) if inspect.ismethod(step) else (lambda: step)
        self.enabled, self.graph = enabled, None

    @property
    def step(self):
        return self._step()

    def capture(self, reset, warmup: int = 2) -> None:
        if not self.enabled or self.graph is not None:
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                reset()
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        reset()
        gc.collect()                  # an unreachable earlier graph must not be freed mid-capture: that aborts it
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step()
        finally:
            if was_enabled:
                gc.enable()
        self.graph = graph

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()


class _Decoder:
    """What both decoders share: the static cache, the one model call, the graphs switch."""

    def __init__(self, model, batch_size: int, prompt_len: int, total_len: int, graphs: bool):
        p = next(model.parameters())
        self.model, self.n, self.P = model, batch_size, prompt_len
        self.device = p.device
        self.graphs = bool(graphs) and self.device.type == "cuda"
        # Padded to a multiple of 16: the memory-efficient sdpa kernel wants an aligned mask; padding is masked out.
        self.L = _round_up(total_len, 16)
        self.kv = StaticKV(model, batch_size, self.L)
        self._cache_kw = cache_kwargs(model, self.kv.cache)
        self.key_pos = torch.arange(self.L, device=self.device)
        self._captured = False

    def _forward(self, ids: torch.Tensor, start, limit: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        """Run query ``ids`` [n, q] at absolute positions ``start + arange(q)``, writing their K/V there.

        Query i may attend key positions ``< limit[i]`` (``limit`` [q], device), which covers every case: causal
        prefill (limit = position + 1), an AR token, a bidirectional block, the fused write + step. The mask always
        spans the whole cache, so the shapes never change.
        """
        n, q = ids.shape
        self.kv.seek(start)
        pos = (start + torch.arange(q, device=self.device))[None].expand(n, q)
        mask = (self.key_pos[None, :] < limit[:, None])[None, None].expand(n, 1, q, self.L)
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True,
                         logits_to_keep=logits_to_keep, **self._cache_kw)
        return out.logits

    def _prefill_logits(self, prompt: torch.Tensor) -> torch.Tensor:
        """Causal forward of the prompt written at 0..P-1; the logits of its last position (they predict token P)."""
        if tuple(prompt.shape) != (self.n, self.P):
            raise ValueError(f"this decoder was built for prompts of shape {(self.n, self.P)}, got "
                             f"{tuple(prompt.shape)} (static shapes: one decoder per batch size and prompt length)")
        limit = torch.arange(1, self.P + 1, device=self.device)
        return self._forward(prompt.to(self.device), 0, limit, logits_to_keep=1)[:, -1]


# ----------------------------------------------------------------------------------------------- AR
class FastARDecoder(_Decoder):
    """Greedy AR decoding: one prefill, then one graphed single-token step per token.

    Same tokens as ``ar_decode(model, prompt, max_new, eos_id)`` (greedy, no constraint): after a row writes
    ``<eos>`` it keeps getting ``<eos>``. The host checks "all rows ended?" only every ``check_every`` steps (a sync);
    the few extra steps cost less than syncing every step, and the output is cut where ``ar_decode`` would stop.
    ``forwards`` counts the model calls actually made after the prefill (with ``check_every=1``: ``ar_decode``'s).
    """

    def __init__(self, model, batch_size: int, prompt_len: int, max_new: int, eos_id: int, graphs: bool = True,
                 check_every: int = 8):
        super().__init__(model, batch_size, prompt_len, prompt_len + max_new, graphs)
        self.max_new, self.eos_id, self.check_every = max_new, eos_id, max(1, int(check_every))
        n, dev = batch_size, self.device
        self.tok = torch.zeros(n, dtype=torch.long, device=dev)         # last token: the next step's input
        self.pos = torch.zeros((), dtype=torch.long, device=dev)        # its absolute position
        self.t = torch.zeros((), dtype=torch.long, device=dev)          # its index in the completion
        self.done = torch.zeros(n, dtype=torch.bool, device=dev)
        self.out = torch.full((n, max_new), eos_id, dtype=torch.long, device=dev)
        self._step = StepGraph(self._step_fn, self.graphs)

    def _start(self, prompt: torch.Tensor) -> None:
        """Prefill and pick the first token (eager: once per request, like the diffusion decoder's prefill)."""
        nxt = pick(self._prefill_logits(prompt), 0.0)
        self.out.fill_(self.eos_id)
        self.out[:, 0] = nxt
        self.done.copy_(nxt == self.eos_id)
        self.tok.copy_(nxt)
        self.pos.fill_(self.P)
        self.t.fill_(1)

    def _step_fn(self) -> None:
        """Feed the last token at ``pos``; pick the next one greedily; ended rows get ``<eos>``. All in place."""
        logits = self._forward(self.tok[:, None], self.pos, (self.pos + 1).view(1), logits_to_keep=1)[:, -1]
        nxt = pick(logits, 0.0)
        nxt = torch.where(self.done, torch.full_like(nxt, self.eos_id), nxt)
        self.out.index_copy_(1, self.t.view(1), nxt[:, None])
        self.done |= nxt == self.eos_id
        self.tok.copy_(nxt)
        self.pos += 1
        self.t += 1

    def _capture(self, prompt: torch.Tensor) -> None:
        if self._captured or not self.graphs or self.max_new < 2:
            return
        self._start(prompt)
        snap = (self.tok.clone(), self.done.clone())

        def reset():                                                    # a valid state for the warm-up steps
            self.tok.copy_(snap[0])
            self.done.copy_(snap[1])
            self.pos.fill_(self.P)
            self.t.fill_(1)

        self._step.capture(reset)
        self._captured = True

    @torch.no_grad()
    def decode(self, prompt: torch.Tensor, max_new: int | None = None, stop_at_eos: bool = True) -> dict:
        """Decode ``prompt`` [batch_size, prompt_len]. ``max_new`` (<= the built one) and ``stop_at_eos=False``
        force a fixed length (speed vs length). Returns ``tokens`` [B, T] and ``forwards``."""
        max_new = self.max_new if max_new is None else min(max_new, self.max_new)
        self._capture(prompt)
        self._start(prompt)
        forwards = 0
        for s in range(1, max_new):
            if stop_at_eos and (s - 1) % self.check_every == 0 and bool(self.done.all()):
                break
            self._step()
            forwards += 1
        out = self.out[:, :max_new]
        if stop_at_eos:                                                 # cut where ar_decode stops: all rows ended
            is_eos = out == self.eos_id
            first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], max_new - 1,
                                                                                        dtype=torch.long))
            out = out[:, :int(first.max()) + 1]
        return {"tokens": out.clone(), "forwards": forwards}


# ----------------------------------------------------------------------------------------------- block diffusion
class FastDiffusionDecoder(_Decoder):
    """``diffusion_decode(..., fused=True, temperature=0)`` over a static cache, with graphed steps.

    Two step shapes, each one graph that runs the forward *and* the commit rule on device:

    * **plain step** (B query tokens): the canvas of the current block at positions ``start..start+B-1``; its K/V are
      written there too, and simply overwritten by the next step (nothing is appended, nothing to crop);
    * **fused step** (2B query tokens): the *final* tokens of the previous block (which see the cache and themselves,
      exactly the block-causal mask of training) followed by the first step of the current block (which sees
      everything). The previous block's K/V written here are the ones that stay.

    State between steps lives in preallocated tensors: canvas, committed, the step each token was committed at,
    steps per row, the logits that predict the block's first token (the token shift), and two flags -- "block full"
    and "every row has ended" -- that the host reads once per step (one small sync; the step count is the method).
    """

    def __init__(self, model, batch_size: int, prompt_len: int, max_blocks: int, block_size: int, mask_id: int,
                 eos_id: int, tau: float = 1.0, graphs: bool = True, sub_block: int | None = None):
        super().__init__(model, batch_size, prompt_len, prompt_len + max_blocks * block_size, graphs)
        self.max_blocks, self.B, self.mask_id, self.eos_id, self.tau = max_blocks, block_size, mask_id, eos_id, tau
        self.sub_block = sub_block
        n, B, dev = batch_size, block_size, self.device
        long = dict(dtype=torch.long, device=dev)
        self.start = torch.zeros((), **long)                        # first position of the current block
        self.canvas = torch.full((n, B), mask_id, **long)
        self.pending = torch.full((n, B), mask_id, **long)          # final tokens of the previous block
        self.committed = torch.zeros(n, B, dtype=torch.bool, device=dev)
        self.step_of = torch.zeros(n, B, **long)
        self.steps = torch.zeros(n, **long)
        self.k = torch.zeros((), **long)                            # step index within the block
        self.finished = torch.zeros(n, dtype=torch.bool, device=dev)
        self.flags = torch.zeros(2, dtype=torch.bool, device=dev)   # [block full, every row ended]
        self.last_logits = None                                     # [n, V], allocated at the first prefill
        self.tokens = torch.full((n, max_blocks * B), eos_id, **long)
        self.commit_step = torch.zeros(n, max_blocks * B, **long)
        self.steps_all = torch.zeros(n, max_blocks, **long)
        # per-query attention limits relative to the forward's first position
        self.lim_plain = torch.full((B,), B, **long)                                  # the block sees itself
        self.lim_fused = torch.cat([torch.full((B,), B, **long), torch.full((B,), 2 * B, **long)])
        self._plain = StepGraph(self._plain_fn, self.graphs)
        self._fused = StepGraph(self._fused_fn, self.graphs)

    # -- the two step shapes (graph bodies) --
    def _plain_fn(self) -> None:
        logits = self._forward(self.canvas, self.start, self.start + self.lim_plain, logits_to_keep=self.B)
        self._commit(torch.cat([self.last_logits[:, None], logits[:, :self.B - 1]], 1))

    def _fused_fn(self) -> None:
        first = self.start - self.B
        q = torch.cat([self.pending, self.canvas], 1)
        # the last B+1 logits: the previous block's last position (predicts this block's first token), then the
        # canvas positions 0..B-2 (each predicts the next one: the token shift)
        logits = self._forward(q, first, first + self.lim_fused, logits_to_keep=self.B + 1)
        self.last_logits.copy_(logits[:, 0])
        self._commit(logits[:, :self.B])

    def _commit(self, pred_logits: torch.Tensor) -> None:
        """The sampler's rule, on device: commit every masked position with p >= tau, plus the most confident one."""
        tok, conf = _choose(pred_logits, 0.0, None)
        commit = commit_rule(conf, self.committed, self.tau, self.sub_block)
        self.canvas.copy_(torch.where(commit, tok, self.canvas))
        self.step_of.copy_(torch.where(commit, self.k, self.step_of))
        self.steps += (~self.committed).any(-1).long()
        self.committed |= commit
        self.k += 1
        ended = self.finished | (self.canvas == self.eos_id).any(-1)
        self.flags.copy_(torch.stack([self.committed.all(), ended.all()]))

    # -- host-side bookkeeping (a few small kernels per block) --
    def _prefill(self, prompt: torch.Tensor) -> None:
        logits = self._prefill_logits(prompt)
        if self.last_logits is None or self.last_logits.dtype != logits.dtype:
            self.last_logits = torch.empty_like(logits)
        self.last_logits.copy_(logits)
        self.finished.zero_()

    def _begin_block(self, b: int) -> None:
        self.start.fill_(self.P + b * self.B)
        ended = self.finished[:, None].expand_as(self.canvas)              # ended rows: the block is all <eos>
        self.canvas.copy_(torch.where(ended, torch.full_like(self.canvas, self.eos_id),
                                      torch.full_like(self.canvas, self.mask_id)))
        self.committed.copy_(ended)
        self.step_of.zero_()
        self.steps.zero_()
        self.k.zero_()

    def _end_block(self, b: int, stop_at_eos: bool) -> None:
        sl = slice(b * self.B, (b + 1) * self.B)
        self.tokens[:, sl] = self.canvas
        self.commit_step[:, sl] = self.step_of
        self.steps_all[:, b] = self.steps
        if stop_at_eos:
            self.finished |= (self.canvas == self.eos_id).any(-1)
        self.pending.copy_(self.canvas)

    def _capture(self, prompt: torch.Tensor) -> None:
        if self._captured or not self.graphs:
            return
        self._prefill(prompt)
        snap = self.last_logits.clone()

        def reset():                                  # block 1 (or 0): positions valid for both step shapes
            self.last_logits.copy_(snap)
            self.finished.zero_()
            self._begin_block(min(1, self.max_blocks - 1))

        self._plain.capture(reset)
        if self.max_blocks > 1:
            self._fused.capture(reset)
        self._captured = True

    @torch.no_grad()
    def decode(self, prompt: torch.Tensor, max_blocks: int | None = None, stop_at_eos: bool = True) -> dict:
        """Decode ``prompt`` [batch_size, prompt_len]. ``max_blocks`` (<= the built one) and ``stop_at_eos=False``
        force a fixed number of blocks (speed vs length). Returns ``tokens`` [B, nb*block], ``forwards`` (model
        calls after the prefill), ``steps`` [B, nb] (steps each block took per row) and ``commit_step``."""
        max_blocks = self.max_blocks if max_blocks is None else min(max_blocks, self.max_blocks)
        self._capture(prompt)
        self._prefill(prompt)
        forwards, nb = 0, 0
        for b in range(max_blocks):
            self._begin_block(b)
            (self._fused if b > 0 else self._plain)()                   # block b > 0 starts with the fused step
            forwards += 1
            while True:
                block_full, all_ended = self.flags.tolist()             # the one sync per step
                if block_full:
                    break
                self._plain()
                forwards += 1
            self._end_block(b, stop_at_eos)
            nb = b + 1
            if stop_at_eos and all_ended:
                break
        c = nb * self.B
        return {"tokens": self.tokens[:, :c].clone(), "forwards": forwards, "steps": self.steps_all[:, :nb].clone(),
                "commit_step": self.commit_step[:, :c].clone()}

