"""The one training loop every stage uses: copy warm-up, SFT and CFT through :meth:`Trainer.fit`; OPD and RL, whose
steps start with rollouts, through its two primitives :meth:`Trainer.backward` and :meth:`Trainer.step`.

One optimizer step::

    for each micro-batch of this process (its share of the global batch):
        with bf16 autocast (CUDA only):  loss_sum, weight = loss_fn(model, batch)
        loss_sum.backward()                              gradients of the *sum*; the weights are added up
    all-reduce [gradients, loss sums, weights] over the processes          (one collective; none with one process)
    gradients /= total weight                            = the gradient of the global batch's mean loss
    clip the gradient norm to 1.0; AdamW (fused on CUDA); learning rate from the schedule; zero the gradients

**Exact accumulation.** A loss returned as a pair (sum, weight), e.g. a weighted cross-entropy's numerator and its sum
of token weights, is normalised over the whole global batch: ``grad_accum`` micro-batches of ``b`` rows on ``p``
processes give the gradient of one batch of ``grad_accum * p * b`` rows, however many weighted tokens each holds. A
loss returned as a plain mean counts as weight 1 (each micro-batch counts equally, as usual accumulation does).

**Several processes.** Started with ``accelerate launch --num_processes N ...`` (or ``torchrun``), every process holds
the whole model and takes its shard of each global batch (:class:`~diffgr2_lite.batches.DeviceBatches`). accelerate
sets up the process group, the device of each process and the collectives. The model is *not* wrapped in
DistributedDataParallel: the losses call ``model.model`` and ``model.lm_head`` directly (so the output layer runs on
scored positions only), and those calls would bypass DDP's forward and with it the gradient synchronisation. The
step all-reduces the gradients itself instead, once per step, after the last micro-batch; the weights start equal
(broadcast from process 0) and stay equal because every process applies the same update. (Nothing overlaps that
all-reduce with the backward pass as DDP's buckets would: for this 14M-parameter model it is one ~56 MB collective.)
Validation runs on process 0 and its score is broadcast, so every process keeps the same best state.

We use accelerate's process state (:class:`accelerate.PartialState`), not an ``Accelerator``: besides the DDP
wrapping above, an ``Accelerator`` fixes mixed precision for the whole process (a second one with another setting
raises), while here each trainer chooses it from its device; bf16 autocast is ``torch.autocast``, exactly what
accelerate would enter.

**Weight averaging (optional).** With ``ema`` > 0 the trainer also keeps an exponential moving average of the
weights, ``w_ema <- d_t * w_ema + (1 - d_t) * w`` after step ``t``, with ``d_t = min(ema, (1 + t) / (10 + t))`` so
that the random initial weights fade out quickly (the warm-up of TensorFlow's ``ExponentialMovingAverage``). While
the warm-up term is the smaller, the average spans roughly the last ninth of the steps so far; once ``ema`` caps it,
the last ``1 / (1 - ema)`` steps (an ``ema`` above ``(1 + T) / (10 + T)`` for a run of ``T`` steps changes
nothing: the history records the last decay used). Validation scores the average, and the average is what
training leaves in the model: an average over the last epochs varies less from run to run than the last step.

**No host sync on the hot path.** Losses, weights and logged extras stay on the device; they are read back every
``log_every`` steps (and at the end). Gradient clipping and the optimizer do not read values back either.

**Speed.** Batches are already on the device (no Python collation); AdamW is fused on CUDA; with ``compile`` the loss
function (model forward, output layer and cross-entropy; its backward follows) is compiled by ``torch.compile``: the
element-wise work of a small model (norms, rotary, activations, the float32 cross-entropy over the vocabulary) is
fused instead of running as hundreds of small kernels. ``python -m diffgr2_lite bench-train`` measures what each
of these buys (``diffgr2_lite/bench_train.py``).
"""
from __future__ import annotations

import math
import time
import weakref

import torch
from .progress import tqdm


# ----------------------------------------------------------------------------------------------- schedules
def _half_cosine(start: float, step: int, total: int) -> float:
    """1 at ``start``, falling along half a cosine to 0 at ``total`` (and 0 after it)."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - start) / max(1, total - start))))


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` (a factor of the base rate)."""
    if step < warmup:
        return (step + 1) / warmup
    return _half_cosine(warmup, step, total)


def constant_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps (none when 0), then the base rate."""
    return (step + 1) / warmup if step < warmup else 1.0


def stable_decay_lr(step: int, total: int, warmup: int, decay: float = 0.2) -> float:
    """Warm-up, then the base rate until the last ``decay`` share of the steps, then cosine decay to 0 over them.

    Why: a skill that arrives as a sudden drop of the loss (copying, notebook 02) needs a learning rate that is
    still high when the drop comes; a cosine schedule starts shrinking it from the first step after warm-up.
    """
    if step < warmup:
        return (step + 1) / warmup
    start = warmup + (1 - decay) * (total - warmup)
    return 1.0 if step < start else _half_cosine(start, step, total)


SCHEDULES = {"cosine": cosine_lr, "constant": constant_lr, "stable_decay": stable_decay_lr}


# ----------------------------------------------------------------------------------------------- best state
class BestState:
    """A copy of the weights with the best validation score so far; ``restore`` puts them back at the end."""

    def __init__(self, ties_to_later: bool = False):
        self.best, self.state, self.ties_to_later = -float("inf"), None, ties_to_later

    def update(self, model, score: float) -> None:
        if score > self.best or (self.ties_to_later and score == self.best):
            self.best = score
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore(self, model) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def validation_due(validate, step: int, total: int, every: int) -> bool:
    """Whether a validation runs after ``step``: every ``every`` steps and at the last, when there is one."""
    return validate is not None and (step % every == 0 or step == total)


def maybe_validate(validate, model, step: int, total: int, every: int, history: dict, keeper: BestState | None):
    """Every ``every`` steps and at the last: score the model (in eval mode), record it, let ``keeper`` keep the
    best."""
    if not validation_due(validate, step, total, every):
        return
    was_training = model.training
    model.eval()
    score = float(validate(model))
    model.train(was_training)
    history["val_step"].append(step)
    history["val"].append(score)
    if keeper is not None:
        keeper.update(model, score)


# ----------------------------------------------------------------------------------------------- processes
def distributed():
    """The processes of this run: accelerate's process state (one process unless started by ``accelerate launch`` or
    ``torchrun``; on a machine without CUDA several processes talk over gloo)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def end_distributed() -> None:
    """Close the process group once every process has arrived here. A process that tears its group down while
    another is still inside a collective can make that one abort (gloo), so the last step is a barrier."""
    state = distributed()
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()


def process_device(device=None) -> torch.device:
    """The device this process trains on: ``device`` with one process, the process's own GPU with several."""
    state = distributed()
    if state.num_processes > 1 or device is None:
        return torch.device(state.device)
    return torch.device(device)


_COMPILED = weakref.WeakKeyDictionary()        # loss function -> {compile options: its compiled version}


def _unpack(out):
    """A loss function's result -> (sum, weight, extras). See :meth:`Trainer.fit` for the three accepted forms."""
    extras = {}
    if isinstance(out, dict):
        extras = {k: v for k, v in out.items() if k not in ("loss", "sum", "weight")}
        out = (out["sum"], out["weight"]) if "sum" in out else out["loss"]
    if isinstance(out, tuple):
        return out[0], out[1], extras
    return out, 1.0, extras


# ----------------------------------------------------------------------------------------------- the trainer
# "auto" compiles a run of at least this many optimizer steps: compiling costs about 20 s per batch shape on an H200
# and saves about 20 ms per step (results/checks/2026-12-01-h200-train-speed-static-compile.json)
AUTO_COMPILE_MIN_STEPS = 1000


def compile_options_for(mode: str | None) -> dict | None:
    """The trainer's ``compile_options`` for a profile's ``compile_mode``: None keeps the trainer's default (static
    shapes, inductor's default mode); a mode is added to static shapes (``"reduce-overhead"`` replays each step's
    kernels as CUDA graphs)."""
    return None if mode is None else {"dynamic": False, "mode": mode}


def engine_settings(profile) -> dict:
    """The training-engine keywords of :func:`train_supervised` a profile sets (SFT and CFT alike): gradient
    accumulation, length buckets, compilation and its mode."""
    return dict(grad_accum=profile.grad_accum, buckets=profile.length_buckets, compile=profile.compile,
                compile_options=compile_options_for(profile.compile_mode))


def compile_enabled(compile, device, total_steps: int | None = None) -> bool:
    """Whether losses are compiled: ``None``/``"auto"`` means on CUDA and not on CPU (a profile's ``compile``), and
    only for runs of at least :data:`AUTO_COMPILE_MIN_STEPS` steps when ``total_steps`` is known (a short run would
    spend longer compiling than it saves); True or False decide alone."""
    if compile not in (None, "auto"):
        return bool(compile)
    return torch.device(device).type == "cuda" and (total_steps is None or total_steps >= AUTO_COMPILE_MIN_STEPS)


class Trainer:
    """AdamW on ``model`` with a learning-rate schedule, bf16 autocast, exact gradient accumulation and data
    parallelism (see the module docstring).

    ``total_steps`` optimizer steps with ``warmup`` warm-up steps (default: 5% of them) and a ``schedule``
    (a name in :data:`SCHEDULES`: ``cosine``, ``constant`` or ``stable_decay``). ``mixed_precision``: ``auto`` (bf16
    on CUDA, none on CPU), ``bf16`` or ``no``.
    ``compile``: ``auto`` or None (on CUDA, for runs of at least :data:`AUTO_COMPILE_MIN_STEPS` steps), True or
    False; ``compile_options`` go to ``torch.compile`` (default ``dynamic=False``: static shapes, one compilation per
    batch shape; the device batcher yields only ``length_buckets`` of them. Dynamic shapes failed in inductor on
    torch 2.11, and static ones measured 2.4x faster than eager per SFT step on an H200:
    ``results/checks/2026-12-01-h200-train-speed-static-compile.json``). Should compiling fail, the trainer warns
    and trains that loss eagerly.
    ``device``: where to train with one process (several processes each take their own GPU).
    ``ema``: the decay of the weight average that validation scores and :meth:`fit` returns (0: none; see the
    module docstring).
    """

    def __init__(self, model, *, lr: float, total_steps: int, warmup: int | None = None, schedule: str = "cosine",
                 weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.98), grad_clip: float | None = 1.0,
                 grad_accum: int = 1, mixed_precision: str = "auto", compile="auto",
                 compile_options: dict | None = None, log_every: int = 10, device=None, desc: str = "training",
                 progress: bool = True, ema: float = 0.0):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        if mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"unknown mixed_precision {mixed_precision!r}; valid: auto, bf16, no")
        if grad_accum < 1 or log_every < 1:
            raise ValueError("grad_accum and log_every must be at least 1")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1) (0: no weight averaging), got {ema}")
        self.state = distributed()
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.is_main = self.rank == 0
        self.device = process_device(device)
        self.model = model.to(self.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.world > 1:
            for t in self.model.state_dict().values():                 # every process starts from process 0's weights
                torch.distributed.broadcast(t, src=0)
        cuda = self.device.type == "cuda"
        self.bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and cuda)
        self.compile = compile_enabled(compile, self.device, total_steps)
        self.compile_options = {"dynamic": False} if compile_options is None else compile_options
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=betas, weight_decay=weight_decay, fused=cuda)
        self.lr, self.total_steps = lr, max(1, int(total_steps))
        self.warmup = max(1, self.total_steps // 20) if warmup is None else int(warmup)
        self.schedule = SCHEDULES[schedule]
        self.grad_clip, self.grad_accum, self.log_every = grad_clip, grad_accum, log_every
        self.desc, self.progress = desc, progress
        self.steps_done = 0
        self.ema = ema
        self.averaged = None                 # the weight average (a copy of the model), when ema > 0
        self.ema_decay = 0.0                 # the decay of the latest update
        self.last_step_state = None          # after fit with ema or a kept best state: the last step's own
                                             # weights, to compare the kept model with
        if ema:
            import copy

            self.averaged = copy.deepcopy(self.model).requires_grad_(False)
            self._avg_params = [q for p, q in zip(model.parameters(), self.averaged.parameters()) if p.requires_grad]
        self._proven = set()
        self._zero_step()
        self._zero_window()
        self._set_lr()

    # -- primitives ------------------------------------------------------------------------------------------------
    @property
    def scored_model(self):
        """The weights validation scores and training returns: the average with ``ema``, else the model itself.
        Only trained parameters are averaged; the average takes the model's buffers as they are now."""
        if self.averaged is None:
            return self.model
        with torch.no_grad():
            for avg, cur in zip(self.averaged.buffers(), self.model.buffers()):
                avg.copy_(cur)
        return self.averaged

    def autocast(self):
        """The mixed-precision context of the forward pass (bf16 autocast on CUDA by default, nothing on CPU)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def backward(self, loss: torch.Tensor, weight=1.0) -> None:
        """Add the gradient of ``loss``: a sum whose rows weigh ``weight`` in total, or a mean (weight 1)."""
        loss.backward()
        self._sum += loss.detach().float()
        self._weight += weight

    def step(self) -> torch.Tensor:
        """Synchronise, normalise, clip and apply the accumulated gradients. Returns the step's loss (on the device:
        the global batch's sum over its weight)."""
        stats = torch.stack([self._sum, self._weight.float()])
        if self.world > 1:
            stats = self._all_reduce_grads(stats)
        total = stats[1].clamp(min=1e-8)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_div_(grads, total)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.averaged is not None:
            self.ema_decay = min(self.ema, (1 + self.steps_done) / (10 + self.steps_done))    # a host number: no sync
            torch._foreach_lerp_(self._avg_params, [p.detach() for p in self.params], 1.0 - self.ema_decay)
        self.steps_done += 1
        self._set_lr()
        self._zero_step()
        loss = stats[0] / total
        self._window += loss
        self._window_steps += 1
        return loss

    def train_step(self, micro_batches, loss_fn) -> torch.Tensor:
        """One optimizer step of ``fit``: forward and backward of every micro-batch, then :meth:`step`."""
        for batch in micro_batches:
            fn = self.compiled(loss_fn)
            try:
                self._forward_backward(fn, batch)
            except Exception as exc:                    # a compiler failure must not stop a training run
                if fn is loss_fn or loss_fn in self._proven:
                    raise
                import warnings

                warnings.warn(f"torch.compile failed on {getattr(loss_fn, '__name__', loss_fn)} "
                              f"({type(exc).__name__}: {str(exc)[:300]}); training it eagerly")
                _COMPILED[loss_fn][self._options_key()] = loss_fn
                self._forward_backward(loss_fn, batch)
            self._proven.add(loss_fn)
        return self.step()

    def _forward_backward(self, fn, batch) -> None:
        with self.autocast():
            out = fn(self.model, batch)
        loss, weight, extras = _unpack(out)
        self.backward(loss, weight)
        for k, v in extras.items():
            self._extras[k] = self._extras.get(k, 0.0) + v.detach().float()
        self._extra_count += 1

    def compiled(self, loss_fn):
        """``loss_fn`` itself, or (with ``compile``) its ``torch.compile``d version. One compiled version per function
        and options for the whole process, so later trainers (the next stage, another model of the same shape)
        reuse what an earlier one compiled."""
        if not self.compile:
            return loss_fn
        versions = _COMPILED.setdefault(loss_fn, {})
        key = self._options_key()
        if key not in versions:
            versions[key] = torch.compile(loss_fn, **self.compile_options)
        return versions[key]

    def is_compiled(self, loss_fn) -> bool:
        """Whether ``loss_fn`` runs compiled (False when compiling is off or failed)."""
        return self.compiled(loss_fn) is not loss_fn

    def on_main(self, fn):
        """``fn(model) -> float`` run on process 0 only, its result given to every process (for validation)."""
        if fn is None or self.world == 1:
            return fn

        def run(model):
            from accelerate.utils import broadcast_object_list

            box = [float(fn(model)) if self.is_main else None]
            broadcast_object_list(box, from_process=0)
            return box[0]

        return run

    def all_sum(self, value: float) -> float:
        """``value`` summed over the processes (a host number: for decisions every process must take alike)."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], device=self.device)
        torch.distributed.all_reduce(t)
        return float(t)

    # -- the supervised loop ---------------------------------------------------------------------------------------
    def fit(self, batches, loss_fn, *, validate=None, validate_every: int | None = None, keep_best: bool = True,
            ties_to_later: bool = True, stop_at: float | None = None) -> dict:
        """Train until ``total_steps``; each step takes ``grad_accum`` micro-batches from ``batches``.

        ``batches``: an iterable of this process's micro-batches (e.g. :class:`~diffgr2_lite.batches.DeviceBatches`,
        which cycles through epochs). ``loss_fn(model, batch)`` returns the loss as a mean, as a pair
        ``(sum, weight)`` (exact over the global batch), or as a dict with ``loss`` (or ``sum`` and ``weight``) and
        further scalar tensors to log (averaged over the micro-batches of the ``log_every`` window).
        ``validate(model) -> float`` (higher is better) runs every ``validate_every`` steps and at the end; with
        ``keep_best`` the best-scoring weights are restored at the end (``ties_to_later``: a tie goes to the later).
        ``stop_at``: stop early, as soon as a validation score reaches it (a gate, e.g. the copy warm-up's).
        With ``ema`` the scored and kept weights are the average (:attr:`scored_model`), and the model ends holding
        it (or its best-scoring state). With ``ema`` or a kept best state, :attr:`last_step_state` holds the last
        step's own weights (for a paired comparison of the kept model with the last step).
        Returns the history: ``step`` and ``loss`` (mean over each logging window) and any extras, ``val_step``,
        ``val``, ``best_val``, ``steps`` (taken), ``seconds``, ``processes`` and ``global_batch_rows`` (when known).
        """
        if getattr(batches, "grad_accum", self.grad_accum) != self.grad_accum:      # steps would straddle batches
            raise ValueError(f"the batches are cut for grad_accum={batches.grad_accum}, the trainer accumulates "
                             f"{self.grad_accum}: build both with the same value")
        history = {"step": [], "loss": [], "val_step": [], "val": []}
        keeper = BestState(ties_to_later) if keep_best else None
        self.last_step_state = None
        validate = self.on_main(validate)
        every = validate_every or self.total_steps
        it = iter(batches)
        t0 = time.time()
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.steps_done, desc=self.desc, mininterval=1,
                   disable=not (self.progress and self.is_main))
        while self.steps_done < self.total_steps:
            try:
                micro = [next(it) for _ in range(self.grad_accum)]
            except StopIteration:
                raise ValueError(f"batches ran out after {self.steps_done} of {self.total_steps} steps") from None
            self.train_step(micro, loss_fn)
            bar.update(1)
            if self.steps_done % self.log_every == 0 or self.steps_done == self.total_steps:
                self.log(history)
                bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
            if validation_due(validate, self.steps_done, self.total_steps, every):    # scored_model syncs buffers
                maybe_validate(validate, self.scored_model, self.steps_done, self.total_steps, every, history, keeper)
            if stop_at is not None and history["val_step"][-1:] == [self.steps_done] and history["val"][-1] >= stop_at:
                if self.steps_done % self.log_every:
                    self.log(history)
                break
        bar.close()
        if self.averaged is not None:      # the model takes the average (a later fit continues from it)
            self.last_step_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(self.scored_model.state_dict())
        if keeper is not None:
            if self.last_step_state is None and keeper.state is not None:
                self.last_step_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            keeper.restore(self.model)
        self.model.eval()
        history.update(best_val=max(history["val"]) if history["val"] else None, steps=self.steps_done,
                       seconds=time.time() - t0, processes=self.world)
        if self.averaged is not None:
            history.update(ema=self.ema, ema_last_decay=self.ema_decay)
        if hasattr(batches, "global_batch"):
            history["global_batch_rows"] = batches.global_batch
        return history

    def log(self, history: dict) -> None:
        """Append the window's mean loss and extras to ``history`` (the one place values are read back)."""
        if self._window_steps == 0:
            return
        history["step"].append(self.steps_done)
        history["loss"].append(float(self._window / self._window_steps))
        if self._extras:
            names = sorted(self._extras)
            vals = torch.stack([self._extras[k] for k in names]) / self._extra_count
            if self.world > 1:
                torch.distributed.all_reduce(vals)
                vals = vals / self.world
            for k, v in zip(names, vals.tolist()):
                history.setdefault(k, []).append(v)
        self._zero_window()

    # -- internals -------------------------------------------------------------------------------------------------
    def _options_key(self) -> str:
        return repr(sorted(self.compile_options.items(), key=lambda kv: kv[0]))

    def _set_lr(self) -> None:
        lr = self.lr * self.schedule(self.steps_done, self.total_steps, self.warmup)
        for g in self.opt.param_groups:
            g["lr"] = lr

    def _zero_step(self) -> None:
        self._sum = torch.zeros((), device=self.device)
        self._weight = torch.zeros((), device=self.device)

    def _zero_window(self) -> None:
        self._window = torch.zeros((), device=self.device)
        self._window_steps = 0
        self._extras, self._extra_count = {}, 0

    def _all_reduce_grads(self, stats: torch.Tensor) -> torch.Tensor:
        """Sum every process's gradients and ``stats`` in one flat buffer; gradients become views of the result."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [stats])
        torch.distributed.all_reduce(flat)
        o = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[o:o + n].view_as(p).to(p.dtype)
            o += n
        return flat[o:]


# ----------------------------------------------------------------------------------------------- supervised stages
def train_supervised(model, train_ds, tokenizer, *, loss_fn, epochs: float, lr: float, batch_size: int,
                     lambda_r: float, lambda_o: float, device, seed: int = 0, multiple_of: int = 1,
                     grad_accum: int = 1, buckets: int = 1, transform=None, validate=None,
                     validate_every: int | None = None, desc: str = "SFT", weight_decay: float = 0.01,
                     compile="auto", compile_options: dict | None = None, log_every: int = 10,
                     schedule: str = "cosine", ema: float = 0.0, keep_best: bool = True) -> dict:
    """SFT and CFT: ``epochs`` over ``train_ds`` (tokenised rows) with a warm-up and the learning-rate ``schedule``,
    keeping the best validation state (ties to the later one; ``keep_best=False``: the last state, validation only
    recorded); with ``ema``, of the weight average.

    ``batch_size`` is the micro-batch of one process; a step's global batch is ``batch_size * grad_accum *
    processes`` rows. ``loss_fn(model, batch)`` is the objective (AR SFT, or the masked-diffusion loss for CFT);
    ``validate(model)`` returns a score to maximise (validation NDCG@3). See :class:`Trainer` and
    :class:`~diffgr2_lite.batches.DeviceBatches` (``buckets``, ``transform``).
    """
    from .batches import DeviceBatches

    state = distributed()
    data = DeviceBatches(train_ds, tokenizer, batch_size=batch_size, lambda_r=lambda_r, lambda_o=lambda_o,
                         multiple_of=multiple_of, buckets=buckets, seed=seed, device=process_device(device),
                         grad_accum=grad_accum, rank=state.process_index, world=state.num_processes,
                         transform=transform)
    total = max(1, int(round(epochs * len(data))))
    trainer = Trainer(model, lr=lr, total_steps=total, schedule=schedule, weight_decay=weight_decay,
                      grad_accum=grad_accum, compile=compile, compile_options=compile_options, log_every=log_every,
                      device=device, desc=desc, ema=ema)
    return trainer.fit(data, loss_fn, validate=validate, validate_every=validate_every or len(data),
                       keep_best=keep_best)
