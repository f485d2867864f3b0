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
- LLF re-initializes weights in place (models.reinit_in_place); BN statistics are updated in place.
Anything that replaces a tensor (loading a checkpoint into the optimizer, a new optimizer) needs
`invalidate()`; the trainer captures after resuming, so it never does.

The first `warmup` calls of a shape run eagerly (real steps of the run, on a side stream: cuDNN picks
its algorithms, the optimizer builds its table); the next call captures and replays. A batch of another
shape (the short last batch of an epoch) runs eagerly, so nothing is padded and the science is unchanged.
Not graphed: fp16 with GradScaler (its skip logic reads the host), torch.optim.SGD (its lr is a Python
float baked into the launches), data-parallel runs; `--cuda-graph auto` then runs eagerly and says why.
"""

from __future__ import annotations

import torch

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


class _Graphed:
    def __init__(self, warmup: int):
        self.warmup = warmup
        self.graph = None
        self.key = None
        self.eager_calls = 0
        self.replays = 0

    def invalidate(self) -> None:
        self.graph, self.key, self.eager_calls = None, None, 0

    def _run(self, x: torch.Tensor, y: torch.Tensor):
        key = (tuple(x.shape), x.stride(), x.dtype, tuple(y.shape))
        if self.key is None:
            self.key = key
        if key != self.key:
            return self._eager(x, y)                      # e.g. the short last batch of an epoch
        if self.graph is None:
            if self.eager_calls < self.warmup:
                self.eager_calls += 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self._eager(x, y)
                torch.cuda.current_stream().wait_stream(side)
                return out
            self.static_x = x.clone(memory_format=torch.preserve_format)
            self.static_y = y.clone()
            self._before_replay()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):                 # records, runs nothing
                self.static_out = self._eager(self.static_x, self.static_y, capturing=True)
            self.graph = graph
        else:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
            self._before_replay()
        self.graph.replay()
        self.replays += 1
        return self.static_out

    def _before_replay(self) -> None:
        pass


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
        self.model, self.criterion, self.optimizer, self.amp_dtype = model, criterion, optimizer, amp_dtype
        self.enabled, self.scaler = graphed, scaler  # scaler: fp16 loss scaling (never graphed)

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        return self._run(x, y) if self.enabled else self._eager(x, y)

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
