"""The training step and the evaluation step, eager or replayed as CUDA graphs (`--cuda-graph`).

`training_step` is the step itself: zero_grad, forward and loss under autocast, backward, the optimizer's
update (through the GradScaler with fp16). `evaluation_step` is one val batch. `TrainStep` / `EvalStep` call
them eagerly, or (CUDA, SignedSGD, no fp16 scaling, one process) capture them once and replay the graph.

Why a graph: a step is hundreds of small kernel launches at batch 32, which is where a 64x64 ResNet-50
step spends its time on a big GPU; captured once as one graph, a step is one launch. What keeps one graph
valid for all 1,600 epochs:
- inputs are copied into static tensors before each replay;
- SignedSGD reads lr / weight decay from a device tensor (`sync_hyperparameters()` before each replay),
  resets momentum in place (a per-tensor restart flag) and zeroes gradients in place;
- LLF re-initializes weights in place (models.reinit_in_place); BN statistics are updated in place;
  resuming loads the checkpoint in place, before the first capture.

A replay runs the captured kernels on the captured addresses, so before each one `_Capture.stale` checks
that an eager step would touch the same tensors: the optimizer's table (SignedSGD.graph_changed: a gradient
freed by zero_grad(set_to_none=True), load_state_dict(), a parameter's storage swapped by `p.data = ...`,
O(groups) plus one address compare per parameter), the model's buffers and remaining parameters (one address
compare each) and their replacement by assignment (`bn.running_mean = t`, load_state_dict(assign=True), a
new submodule: a flag raised by module registration hooks). ResNet-50 (161 parameters, 159 buffers): ~22 us
of host time per replay on a 2-core CPU. When something changed, the graph is dropped and the step warms up
and captures again (`recaptures`, `stale` say how often and why); a graph that goes stale right after each
of 3 captures, or an optimizer whose tensors keep changing before the capture, stops with one line. The
model's train / eval mode is part of the key, like the batch shape.

The first `warmup` calls of a shape run eagerly (real steps of the run, on a side stream: cuDNN picks
its algorithms, the optimizer builds its table); the next call captures and replays. A batch of another
shape (the short last batch of an epoch) runs eagerly, so nothing is padded and the science is unchanged.
Not graphed: fp16 with GradScaler (its skip logic reads the host), torch.optim.SGD (its lr is a Python
float baked into the launches), data-parallel runs; `--cuda-graph auto` then runs eagerly and says why
(TrainStep(graphed=True) refuses the first two).
"""

from __future__ import annotations

import weakref

import torch

from .errors import SealError
from .optim import SignedSGD


def graph_support(device: torch.device, optimizer, amp_dtype, world: int) -> tuple[bool, str]:
    """(can the step be graphed, why not / how)."""
    if device.type != "cuda":
        return False, "CUDA graphs need a CUDA device; eager steps on the CPU"
    if not isinstance(optimizer, SignedSGD):
        return False, "--optimizer torch keeps its lr on the host; eager steps (use the default SignedSGD to graph)"
    if amp_dtype == torch.float16:
        return False, "fp16 loss scaling decides on the host; eager steps"
    if world > 1:
        return False, "data-parallel runs step eagerly (the all-reduce is not captured)"
    return True, "training and evaluation steps replayed as CUDA graphs"


_data_ptr = torch.Tensor.data_ptr
_SHORT_LIVED = 3    # graphs in a row that went stale before a second replay: stop (something replaces tensors per step)
_PATIENCE = 4       # extra eager steps waiting for the optimizer's table to stay put before a capture


class _Replaced:
    """A flag raised when a parameter, buffer or submodule of the captured model is replaced by assignment
    (`bn.running_mean = t`, `conv.weight = Parameter(...)`, `model.fc = Linear(...)`,
    `load_state_dict(assign=True)`): PyTorch's global registration hooks, so a replay reads one attribute.
    The hooks are removed when the graph is dropped."""

    def __init__(self, model: torch.nn.Module):
        self.changed: str | None = None
        names = {id(m): n for n, m in model.named_modules()}
        me = weakref.ref(self)

        def hook(module, name, value):
            watch = me()
            if watch is not None and watch.changed is None and id(module) in names:
                where = names[id(module)]
                watch.changed = f"{where + '.' if where else ''}{name} was replaced by assignment"

        from torch.nn.modules import module as nn_module

        self._handles = [nn_module.register_module_parameter_registration_hook(hook),
                         nn_module.register_module_buffer_registration_hook(hook),
                         nn_module.register_module_module_registration_hook(hook)]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __del__(self):
        self.close()


class _Capture:
    """What one captured graph reads and writes besides its own static tensors, and the per-replay check that
    it is all still there: the model's tensors (by address: a swapped `p.data` / buffer), their replacement
    by assignment (a flag), the optimizer's table (SignedSGD.graph_changed: O(groups) + its parameters'
    addresses). Holds the tensors, so nothing the graph touches is freed and reused while it exists."""

    def __init__(self, model: torch.nn.Module, optimizer=None):
        self.token = optimizer.graph_token() if optimizer is not None else None
        covered = {id(p) for p in self.token[0].params} if self.token is not None else set()
        named = [*model.named_parameters(), *model.named_buffers()]
        named = [(n, t) for n, t in named if id(t) not in covered]  # the optimizer's watch checks its own
        self.names = [n for n, _ in named]
        self.tensors = [t for _, t in named]
        self.ptrs = list(map(_data_ptr, self.tensors))
        self.replaced = _Replaced(model)
        self.replays = 0

    def stale(self, optimizer=None) -> str | None:
        """None while a replay does what an eager step would; else what changed."""
        if self.replaced.changed is not None:
            return self.replaced.changed
        if self.token is not None:
            why = optimizer.graph_changed(self.token)
            if why is not None:
                return why
        if list(map(_data_ptr, self.tensors)) != self.ptrs:  # named only on failure
            moved = next(n for n, t, a in zip(self.names, self.tensors, self.ptrs) if t.data_ptr() != a)
            return f"{moved}'s storage was replaced (.data = ..., or the model moved / converted)"
        return None

    def close(self) -> None:
        self.replaced.close()


class _Graphed:
    """Warm-up, capture, replay and re-capture of one step (TrainStep / EvalStep). The device work is in
    `_warm`, `_capture`, `_replay` and `_release`; everything else (which call does what) runs anywhere, so
    a test can drive it on the CPU with stand-ins for those four."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.graph = None
        self.captured: _Capture | None = None
        self.key = None
        self.eager_calls = 0
        self.replays = 0
        self.captures = 0
        self.recaptures = 0             # graphs dropped because what they replay changed
        self.stale: list[str] = []      # why, per dropped graph (the last 16)
        self._short_lived = 0

    def invalidate(self) -> None:
        """Drop the graph: the next calls warm up and capture again (nothing needs it: replays check)."""
        if self.graph is not None:
            self._drop(None)
        self.key, self.eager_calls = None, 0

    def _key(self, x: torch.Tensor, y: torch.Tensor):
        return (tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), y.dtype, self.model.training)

    def _run(self, x: torch.Tensor, y: torch.Tensor):
        if self.graph is not None:
            why = self.captured.stale(self._optimizer())
            if why is not None:
                self._drop(why)                           # warm up and capture again
        key = self._key(x, y)
        if self.key is None:
            self.key = key
        if key != self.key:
            return self._eager(x, y)                      # the short last batch of an epoch; another mode
        if self.graph is None:
            if self.eager_calls < self.warmup or self._unready() is not None:
                if self.eager_calls >= self.warmup + _PATIENCE:
                    raise SealError(f"{type(self).__name__}: cannot capture the CUDA graph: {self._unready()} "
                                    f"before each of the last {_PATIENCE} steps; change tensors in place "
                                    "(zero_grad() without set_to_none) or run with --cuda-graph off")
                self.eager_calls += 1
                return self._warm(x, y)
            self.static_x = x.clone(memory_format=torch.preserve_format)
            self.static_y = y.clone()
            self._before_replay()
            self.captured = _Capture(self.model, self._optimizer())
            try:
                self.graph, self.static_out = self._capture()
            except BaseException:
                self.captured.close()
                self.captured = None
                raise
            self.captures += 1
        else:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
            self._before_replay()
        self._replay()
        self.replays += 1
        self.captured.replays += 1
        return self.static_out

    def _drop(self, why: str | None) -> None:
        """Forget the graph (it no longer does what an eager step would); the next calls warm up again."""
        short = self.captured.replays <= 1
        self.captured.close()
        self._release()
        self.graph = self.captured = self.static_out = self.static_x = self.static_y = None
        self.eager_calls = 0
        if why is None:
            return
        self.recaptures += 1
        self.stale = (self.stale + [why])[-16:]
        self._short_lived = self._short_lived + 1 if short else 0
        if self._short_lived >= _SHORT_LIVED:
            raise SealError(f"{type(self).__name__}: the captured CUDA graph went stale right after each of the last "
                            f"{_SHORT_LIVED} captures ({why}); something replaces tensors before every step: change "
                            "them in place or run with --cuda-graph off")

    def _optimizer(self):
        return None

    def _unready(self) -> str | None:
        """None when a capture now would record what the next eager step does; else why not yet."""
        return None

    def _before_replay(self) -> None:
        pass

    # -- the device work (CUDA); tests replace these four on the CPU ------------------------------
    def _warm(self, x, y):
        """An eager step on a side stream (what a capture needs: cuDNN's choices, the optimizer's table)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self._eager(x, y)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self):
        """(graph, static outputs): the step on the static inputs, recorded; nothing runs."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._eager(self.static_x, self.static_y, capturing=True)
        return graph, out

    def _replay(self) -> None:
        self.graph.replay()

    def _release(self) -> None:
        """Before a graph is dropped: its last replay has finished (its pool is freed with it)."""
        torch.cuda.current_stream().synchronize()


def training_step(model, criterion, optimizer, x, y, amp_dtype=None, scaler=None, capturing: bool = False):
    """One optimizer step on the batch (x, y) -> (loss float32 [], correct int64 []), both still on the device."""
    optimizer.zero_grad()                                 # in place: gradient addresses stay fixed (graphs)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                        cache_enabled=not capturing):
        logits = model(x)
        loss = criterion(logits, y)
    if scaler is not None and scaler.is_enabled():        # fp16: scaled backward, the step skipped on inf
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach().float(), (logits.detach().argmax(1) == y).sum()


@torch.no_grad()
def evaluation_step(model, criterion, x, y, amp_dtype=None, capturing: bool = False):
    """One val batch -> (summed loss float32 [], top-1 correct int64 [], top-5 correct int64 []), eval mode."""
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                        cache_enabled=not capturing):
        logits = model(x)
        loss = criterion(logits, y)
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return loss.float() * y.shape[0], (logits.argmax(1) == y).sum(), (top5 == y[:, None]).any(1).sum()


class TrainStep(_Graphed):
    """step(x, y) -> training_step's (loss, correct); graphed on CUDA after `warmup` eager steps of the same
    shape. The returned tensors are overwritten by the next step: copy them out."""

    def __init__(self, model, criterion, optimizer, amp_dtype, graphed: bool, warmup: int = 3, scaler=None):
        super().__init__(warmup)
        if graphed and not isinstance(optimizer, SignedSGD):
            raise ValueError(f"TrainStep: a graphed step needs SignedSGD (lr on the device), not "
                             f"{type(optimizer).__name__}; pass graphed=False")
        if graphed and scaler is not None and scaler.is_enabled():
            raise ValueError("TrainStep: fp16 loss scaling (an enabled GradScaler) decides on the host and cannot be "
                             "graphed; pass graphed=False")
        self.model, self.criterion, self.optimizer, self.amp_dtype = model, criterion, optimizer, amp_dtype
        self.enabled, self.scaler = graphed, scaler  # scaler: fp16 loss scaling (never graphed)

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        return self._run(x, y) if self.enabled else self._eager(x, y)

    def _optimizer(self):
        return self.optimizer

    def _unready(self) -> str | None:
        return self.optimizer.table_stale()

    def _before_replay(self) -> None:
        self.optimizer.sync_hyperparameters()             # the plan's lr / wd, into the device table

    def _eager(self, x, y, capturing: bool = False):
        return training_step(self.model, self.criterion, self.optimizer, x, y, self.amp_dtype, self.scaler, capturing)


class EvalStep(_Graphed):
    """step(x, y) -> evaluation_step's (summed loss, top-1 correct, top-5 correct); graphed on CUDA after
    `warmup` eager calls."""

    def __init__(self, model, criterion, amp_dtype, graphed: bool, warmup: int = 2):
        super().__init__(warmup)
        self.model, self.criterion, self.amp_dtype, self.enabled = model, criterion, amp_dtype, graphed

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        return self._run(x, y) if self.enabled else self._eager(x, y)

    def _eager(self, x, y, capturing: bool = False):
        return evaluation_step(self.model, self.criterion, x, y, self.amp_dtype, capturing)
