"""SignedSGD: torch.optim.SGD's semantics for param groups whose lr may be negative, in one fused pass.

    opt = SignedSGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4, backend="auto")
    opt.param_groups[0]["lr"] = -0.001      # ascent for this group from the next step on
    opt.reset_momentum()                    # == rebuilding torch.optim.SGD: buffers restart at d_p

- backend "triton": kernels/fused_sgd.py, one launch per parameter dtype for all groups (a second, small
  one when some tensor is not 16-byte aligned or its length not a multiple of 16 bytes) (CUDA, or the
  CPU under TRITON_INTERPRET=1); "cuda": the native CUDA C++ twin of that kernel (kernels/cuda/, opt-in:
  `make cuda`; a CUDA device only); "torch": the same step in PyTorch ops (kernels/fused_sgd_torch.py);
  "auto": triton on CUDA, torch on CPU: on an H200 the two GPU kernels tied (docs/performance.md, the SGD rows;
  bench/bench_sgd.py measures yours), and a tie keeps Triton, which needs no build. All backends walk the same
  table (kernels.fused_sgd_table.SGDTable, made by kernels.fused_sgd_table.make_table).
- momentum, dampening and nesterov are shared by all groups; lr and weight_decay are per group.
- Hyper-parameters live in device tensors. `step()` copies changed group values there (a host-to-device
  copy, no sync); to replay a captured CUDA graph with new values, call `sync_hyperparameters()` before
  the replay (outside the graph). Momentum buffers are allocated once and reset in place.
- The table is rebuilt only when it stops describing the tensors; the per-step check is O(groups) in Python
  plus one address compare per parameter (`_Watch.why`; ResNet-50's 161: ~11 us on a 2-core CPU): a watched
  gradient was freed (set to None, or replaced by a new tensor: a weak reference tells us), a parameter
  that had no gradient got one, a parameter's storage was swapped (`p.data = ...`, `model.to(...)`), a group
  or its list of parameters changed, momentum was switched on or off. Not seen: a gradient replaced while
  something else keeps the old one alive; change gradients in place (zero_grad() does), or call
  `invalidate()`.
- A captured CUDA graph of step() replays one table: `graph_token()` names it at capture, `graph_changed(token)`
  says (same check, O(groups) + the address compare) before each replay whether a step would still use it
  (seal_fast/step.py re-captures when it would not).
- "Restart pending" (the next step starts a buffer at d_p): the RESTART flags of the table while a
  parameter is in it; `momentum_buffer` None in the state otherwise (torch.optim.SGD's own form, what
  state_dict() exports either way).
- state_dict()/load_state_dict() use torch.optim.SGD's format (`momentum_buffer` per parameter, None
  where the buffer restarts), so either optimizer loads the other's checkpoints.
- Loss scaling: with torch.amp.GradScaler, the scaler's inf check fills `found_inf` and the fused pass
  unscales, skips or updates. Without one, `step(inv_scale=t)` runs a non-finite check pass and the
  fused update; `found_inf_flag` (device tensor, nonzero = skipped) says whether a scaled step was skipped.
  No `.item()`.
- `zero_grad()` zeroes gradients in place by default (their addresses stay valid for the fused table
  and a captured graph); `zero_grad(set_to_none=True)` frees them, and the next step rebuilds the table.
"""

from __future__ import annotations

import weakref

import torch

BACKENDS = ("auto", "triton", "torch", "cuda")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_data_ptr = torch.Tensor.data_ptr


class _Watch:
    """Whether the table still describes the optimizer's tensors, answered without a Python loop over the
    parameters (one `map` of data_ptr over them, in C)."""

    __slots__ = ("__weakref__", "_lists", "_momentum", "_params", "_ptrs", "_refs", "_without_grad", "dirty")

    def __init__(self, param_groups, params, addresses, grads, without_grad, momentum: bool):
        self.dirty: str | None = None  # why the table went stale, once something said so
        self._refs = [weakref.ref(g, self._freed) for g in grads]  # fires when a gradient is freed
        self._lists = [(g["params"], len(g["params"])) for g in param_groups]
        self._params = list(params)
        self._ptrs = list(addresses[:len(self._params)])  # the parameters' addresses the table's records hold
        self._without_grad = without_grad
        self._momentum = momentum

    def _freed(self, _ref) -> None:
        if self.dirty is None:
            self.dirty = "a gradient was freed or replaced (zero_grad(set_to_none=True), or p.grad = ...)"

    def why(self, param_groups, momentum: bool) -> str | None:
        """None while the table is valid; else what changed, in a few words."""
        if self.dirty is not None:
            return self.dirty
        if momentum != self._momentum:
            return "momentum was switched on or off"
        if len(param_groups) != len(self._lists):
            return "a param group was added or removed"
        for g, (params, n) in zip(param_groups, self._lists):
            if g["params"] is not params or len(params) != n:
                return "a param group's list of parameters changed"
        if any(p.grad is not None for p in self._without_grad):
            return "a parameter that had no gradient got one"
        if list(map(_data_ptr, self._params)) != self._ptrs:
            return "a parameter's storage was replaced (p.data = ..., or the model moved / converted)"
        return None

    def valid(self, param_groups, momentum: bool) -> bool:
        return self.why(param_groups, momentum) is None


class SignedSGD(torch.optim.Optimizer):
    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale / found_inf tensors

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"SignedSGD: backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if momentum < 0 or weight_decay < 0:
            raise ValueError("SignedSGD: momentum and weight_decay cannot be negative (a negative lr means ascent)")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SignedSGD: Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))
        if backend == "cuda":  # fail here, not at the first step, without the library or a GPU
            first = next((p for g in self.param_groups for p in g["params"]), None)
            self._require_native(first.device if first is not None else torch.device("cuda"))
        self.backend = backend
        self._table = None    # kernels.fused_sgd_table.SGDTable of the parameters that have gradients
        self._watch = None    # _Watch: is that table still valid
        self._owned = {}      # parameter -> the momentum buffer this optimizer allocated for it

    @property
    def found_inf_flag(self) -> torch.Tensor | None:
        """float32 [1] on the device: nonzero when the last scaled step was skipped (None before a step)."""
        return self._table.found_inf if self._table is not None else None

    # -- shared settings ------------------------------------------------------------------------
    def _shared(self) -> tuple[float, float, bool]:
        first = self.param_groups[0]
        for g in self.param_groups[1:]:
            for key in ("momentum", "dampening", "nesterov"):
                if g[key] != first[key]:
                    raise ValueError(f"SignedSGD: all param groups must share {key} "
                                     f"({first[key]!r} != {g[key]!r}); lr and weight_decay may differ")
        return float(first["momentum"]), float(first["dampening"]), bool(first["nesterov"])

    @staticmethod
    def _require_native(device: torch.device) -> None:
        """The native library loads and `device` is a usable GPU; else a one-line RuntimeError."""
        from seal_fast.kernels import cuda

        try:
            cuda.require(device)
        except cuda.NativeUnavailable as exc:
            raise RuntimeError(f"SignedSGD: backend 'cuda': {exc}") from None

    def _kernel(self, device: torch.device) -> str:
        """Which implementation runs the step: "triton", "cuda" (native) or "torch" (PyTorch ops)."""
        if self.backend == "auto":
            return "triton" if device.type == "cuda" else "torch"
        return self.backend

    # -- the table of tensors the fused step walks -----------------------------------------------
    def invalidate(self) -> None:
        """Rebuild the table at the next step (after replacing tensors in ways the O(1) check cannot see)."""
        if self._watch is not None and self._watch.dirty is None:
            self._watch.dirty = "invalidate() was called"

    def _current_table(self, momentum: float):
        w = self._watch
        why = "no table yet" if w is None else w.why(self.param_groups, momentum != 0)
        if why is None:
            return self._table
        if _capturing():
            raise RuntimeError(f"SignedSGD: the parameters or gradients changed during CUDA graph capture ({why}); "
                               "run one eager step first and keep the gradients (zero_grad() zeroes them in place)")
        return self._rebuild(momentum)

    def table_stale(self) -> str | None:
        """None when the next step() would use the current table as it is; else why it would rebuild it."""
        if self._watch is None:
            return "the optimizer has no table yet (no step since it was built, reloaded or its gradients freed)"
        momentum = self._shared()[0]
        return self._watch.why(self.param_groups, momentum != 0)

    def graph_token(self):
        """What a CUDA graph of step() captured now replays: the table, its watch and the Nesterov flag (both
        baked into the captured launches). None when the next step would rebuild the table: step eagerly first."""
        if self.table_stale() is not None:
            return None
        return (self._table, self._watch, self._shared()[2])

    def graph_changed(self, token) -> str | None:
        """None while a graph captured with `token` (graph_token()) still does what step() would do; else what
        changed, in a few words (load_state_dict(), a freed gradient, a swapped parameter, ...)."""
        table, watch, nesterov = token
        if self._table is None:
            return "the optimizer dropped its table (load_state_dict(), or a step without gradients)"
        if self._table is not table or self._watch is not watch:
            return "the optimizer rebuilt its table (an eager step saw new tensors)"
        momentum, _, now = self._shared()
        why = watch.why(self.param_groups, momentum != 0)
        if why is None and now != nesterov:
            why = "nesterov was switched"
        return why

    def _rebuild(self, momentum: float):
        from seal_fast.kernels.fused_sgd_table import make_table, same_layout

        entries = [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"] if p.grad is not None]
        old = self._table
        keep = {p for _, p in entries}
        if old is not None and old.momentum:  # restarts pending for parameters that leave the table go to the state
            leaving = [i for i, p in enumerate(old.params) if p not in keep or momentum == 0]
            if leaving:
                pending = old.pending()
                for i in leaving:
                    if pending[i]:
                        self._drop_buffer(old.params[i])
        self._table, self._watch = None, None
        if not entries:
            return None
        device = entries[0][1].device
        if any(p.device != device for _, p in entries):
            raise ValueError("SignedSGD: all parameters must be on one device")
        if self.backend == "cuda":
            self._require_native(device)
        params = [p for _, p in entries]
        for p in params:
            if not same_layout(p.grad, p):  # keep the gradient in the parameter's layout from now on
                p.grad = torch.empty_like(p, memory_format=torch.preserve_format).copy_(p.grad)
        bufs, restart = None, None
        if momentum != 0:  # restart pending: no buffer in the state (never stepped, reset, loaded as None) ...
            restart = torch.tensor([not isinstance(self.state[p].get("momentum_buffer"), torch.Tensor)
                                    for p in params], dtype=torch.int64).to(device)
            bufs = [self._buffer(p) for p in params]
            if old is not None and old.momentum:  # ... or the old table's flag, carried on the device (no host read)
                slot = {p: i for i, p in enumerate(old.params)}
                rows = [slot.get(p, -1) for p in params]
                if any(r >= 0 for r in rows):
                    index = torch.tensor(rows, dtype=torch.int64, device=device)
                    restart = torch.where(index >= 0, old.restart_flags()[index.clamp(min=0)], restart)
        grads = [p.grad for p in params]
        table = make_table(params, grads, bufs, [gi for gi, _ in entries], len(self.param_groups), restart=restart)
        without = [p for g in self.param_groups for p in g["params"] if p.grad is None]
        self._watch = _Watch(self.param_groups, params, table.addresses, grads, without, momentum != 0)
        self._table = table
        return table

    def _buffer(self, p: torch.Tensor) -> torch.Tensor:
        """p's momentum buffer, owned by this optimizer and in p's layout (a loaded one is copied in)."""
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if isinstance(buf, torch.Tensor) and self._owned.get(p) is buf:
            return buf
        new = torch.zeros_like(p, memory_format=torch.preserve_format)
        if isinstance(buf, torch.Tensor):
            new.copy_(buf)
        state["momentum_buffer"] = self._owned[p] = new
        return new

    def _drop_buffer(self, p: torch.Tensor) -> None:
        """Restart pending for a parameter outside the table: no buffer, as torch.optim.SGD would have it."""
        st = self.state.get(p)
        if st is not None and "momentum_buffer" in st:
            st["momentum_buffer"] = None
        self._owned.pop(p, None)

    def sync_hyperparameters(self) -> None:
        """Copy the groups' lr and weight_decay into the device table (call before replaying a graph)."""
        t = self._table
        if t is not None:
            momentum, dampening, _ = self._shared()
            t.set_hyperparameters([g["lr"] for g in self.param_groups], [g["weight_decay"] for g in self.param_groups],
                                  momentum, dampening)

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, inv_scale: torch.Tensor | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        momentum, dampening, nesterov = self._shared()
        t = self._current_table(momentum)
        if t is None:
            return loss
        t.set_hyperparameters([g["lr"] for g in self.param_groups], [g["weight_decay"] for g in self.param_groups],
                              momentum, dampening)
        # loss scaling: from GradScaler (attributes it sets around this call) or from `inv_scale`
        grad_scale, scaler_found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        scaled = inv_scale is not None or grad_scale is not None or scaler_found_inf is not None
        check = inv_scale is not None and scaler_found_inf is None  # our own non-finite pass
        if scaled:
            if inv_scale is not None:
                t.scalars[2:].copy_(inv_scale.reshape(1))
            elif grad_scale is not None:
                torch.reciprocal(grad_scale.reshape(1).to(t.scalars), out=t.scalars[2:])
            else:
                t.scalars[2:].fill_(1.0)
            if scaler_found_inf is not None:
                torch.clamp(scaler_found_inf.reshape(1).to(t.found_inf), max=1.0, out=t.found_inf)
            else:  # our own check (inv_scale) raises it from 0
                t.found_inf.zero_()
        kernel = self._kernel(t.device)
        if kernel == "triton":
            from seal_fast.kernels import fused_sgd

            fused_sgd.step(t, nesterov=nesterov, scaled=scaled, check=check)
        elif kernel == "cuda":
            from seal_fast.kernels import fused_sgd

            fused_sgd.native_step(t, nesterov=nesterov, scaled=scaled, check=check)
        else:  # the same step in PyTorch ops (the CPU default); its lr / wd: the table's host copy, set above
            from seal_fast.kernels import fused_sgd_torch

            fused_sgd_torch.step(t, nesterov=nesterov, scaled=scaled)
        return loss

    def reset_momentum(self) -> None:
        """Restart every momentum buffer: those in the table zeroed in place and restarted at d_p by the next
        applied step; any other parameter's buffer dropped (None: torch.optim.SGD's fresh state)."""
        t = self._table
        inside = set()
        if t is not None and t.momentum:
            torch._foreach_zero_(t.bufs)
            t.request_restart()
            inside = set(t.params)
        for group in self.param_groups:
            for p in group["params"]:
                if p not in inside:
                    self._drop_buffer(p)

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = False) -> None:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if set_to_none:
            for g in self.param_groups:
                for p in g["params"]:
                    p.grad = None
        elif grads:
            torch._foreach_zero_(grads)

    # -- torch.optim.SGD-compatible state --------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        order = [p for g in self.param_groups for p in g["params"]]
        t = self._table
        pending = set()
        if t is not None and t.momentum:
            pending = {p for p, f in zip(t.params, t.pending()) if f}
        for i, p in enumerate(order):
            if i in sd["state"]:
                st = {k: v for k, v in sd["state"][i].items() if not k.startswith("_")}
                if p in pending:
                    st["momentum_buffer"] = None
                sd["state"][i] = st
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # SGD-only keys we do not use
            if group.get("maximize"):
                raise ValueError("SignedSGD: maximize=True is not supported; use a negative lr")
        self._shared()
        # rebuilt on the next step: loaded buffers are copied into owned, layout-matched ones, and a loaded
        # momentum_buffer None is a pending restart
        self._table, self._watch, self._owned = None, None, {}
