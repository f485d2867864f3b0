"""SignedSGD: torch.optim.SGD's semantics for param groups whose lr may be negative, in one fused pass.

    opt = SignedSGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4, backend="auto")
    opt.param_groups[0]["lr"] = -0.001      # ascent for this group from the next step on
    opt.reset_momentum()                    # == rebuilding torch.optim.SGD: buffers restart at d_p

- backend "triton": kernels/fused_sgd.py, one launch per parameter dtype for all groups (CUDA, or the
  CPU under TRITON_INTERPRET=1); "torch": kernels/reference.py; "auto": triton on CUDA, torch on CPU;
  "cuda" (a native extension) is not built in this project yet.
- momentum, dampening and nesterov are shared by all groups; lr and weight_decay are per group.
- Hyper-parameters live in device tensors. `step()` copies changed group values there (a host-to-device
  copy, no sync); to replay a captured CUDA graph with new values, call `sync_hyperparameters()` before
  the replay (outside the graph). Momentum buffers are allocated once and reset in place.
- state_dict()/load_state_dict() use torch.optim.SGD's format (`momentum_buffer` per parameter, None
  where the buffer restarts), so either optimizer loads the other's checkpoints.
- Loss scaling: with torch.amp.GradScaler, the scaler's inf check fills `found_inf` and the fused pass
  unscales, skips or updates. Without one, `step(inv_scale=t)` runs a non-finite check pass and the
  fused update; `found_inf_flag` (device tensor) says whether the step was skipped. No `.item()`.
- `zero_grad()` zeroes gradients in place by default (their addresses stay valid for the fused table
  and a captured graph); `zero_grad(set_to_none=True)` frees them, and the next step rebuilds the table.
"""

from __future__ import annotations

import torch

from kernels.reference import signed_sgd_ref

BACKENDS = ("auto", "triton", "torch", "cuda")


class SignedSGD(torch.optim.Optimizer):
    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale / found_inf tensors

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"SignedSGD: backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if backend == "cuda":
            raise RuntimeError("SignedSGD: backend 'cuda' needs the native extension, which this build does not "
                               "have; use backend='triton' (or 'auto')")
        if momentum < 0 or weight_decay < 0:
            raise ValueError("SignedSGD: momentum and weight_decay cannot be negative (a negative lr means ascent)")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SignedSGD: Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))
        self.backend = backend
        self._table = None
        self.found_inf_flag = None

    # -- shared settings ------------------------------------------------------------------------
    def _shared(self) -> tuple[float, float, bool]:
        first = self.param_groups[0]
        for g in self.param_groups[1:]:
            for key in ("momentum", "dampening", "nesterov"):
                if g[key] != first[key]:
                    raise ValueError(f"SignedSGD: all param groups must share {key} "
                                     f"({first[key]!r} != {g[key]!r}); lr and weight_decay may differ")
        return float(first["momentum"]), float(first["dampening"]), bool(first["nesterov"])

    def _use_triton(self, device: torch.device) -> bool:
        if self.backend == "auto":
            return device.type == "cuda"
        return self.backend == "triton"

    # -- the table of tensors the fused step walks -----------------------------------------------
    def _params_with_grad(self):
        return [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"] if p.grad is not None]

    def _build(self, entries) -> dict:
        from kernels.fused_sgd import build_chunks

        momentum, _, _ = self._shared()
        device = entries[0][1].device
        if any(p.device != device for _, p in entries):
            raise ValueError("SignedSGD: all parameters must be on one device")
        for _, p in entries:
            if p.grad.stride() != p.stride():  # keep the gradient in the parameter's layout from now on
                p.grad = torch.empty_like(p, memory_format=torch.preserve_format).copy_(p.grad)
        fresh = []
        for _, p in entries:
            state = self.state[p]
            loaded = state.get("momentum_buffer")
            if momentum == 0:
                buf, new = p, True  # unused: no buffers without momentum (like torch.optim.SGD)
            elif isinstance(loaded, torch.Tensor) and loaded.data_ptr() == state.get("_owned", -1):
                buf, new = loaded, bool(state.get("_fresh_on_build", False))
            else:
                buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                new = not isinstance(loaded, torch.Tensor)
                if not new:
                    buf.copy_(loaded)
                state["momentum_buffer"], state["_owned"] = buf, buf.data_ptr()
            state.pop("_fresh_on_build", None)
            fresh.append(new)
        table = {"device": device, "entries": entries, "momentum": momentum,
                 "grad_ptrs": [p.grad.data_ptr() for _, p in entries],
                 "fresh": torch.tensor(fresh, dtype=torch.int64, device=device),
                 "hyper": torch.zeros(len(self.param_groups), 2, dtype=torch.float32, device=device),
                 "hyper_values": None,
                 "scalars": torch.ones(3, dtype=torch.float32, device=device),
                 "found_inf": torch.zeros(1, dtype=torch.float32, device=device),
                 "by_dtype": {}}
        if self._use_triton(device):
            for dtype in sorted({p.dtype for _, p in entries}, key=str):
                idx = [i for i, (_, p) in enumerate(entries) if p.dtype == dtype]
                table["by_dtype"][dtype] = {
                    "ptrs": torch.tensor([[entries[i][1].data_ptr(), entries[i][1].grad.data_ptr(),
                                           self._buf(entries[i][1]).data_ptr()] for i in idx],
                                         dtype=torch.int64, device=device),
                    "meta": torch.tensor([[entries[i][1].numel(), entries[i][0], i] for i in idx],
                                         dtype=torch.int64, device=device),
                    "chunks": build_chunks([entries[i][1].numel() for i in idx], device=device),
                }
        self.found_inf_flag = table["found_inf"]
        return table

    def _buf(self, p):
        return self.state[p]["momentum_buffer"] if self._table_momentum() else p

    def _table_momentum(self) -> bool:
        return self.param_groups[0]["momentum"] != 0

    def _current_table(self) -> dict | None:
        entries = self._params_with_grad()
        if not entries:
            return None
        t = self._table
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        same_set = t is not None and len(t["entries"]) == len(entries) and all(
            a[1] is b[1] and a[0] == b[0] for a, b in zip(t["entries"], entries))
        if same_set and [p.grad.data_ptr() for _, p in entries] == t["grad_ptrs"]:
            return t
        if capturing:
            raise RuntimeError("SignedSGD: the parameters or gradients changed during CUDA graph capture; run one "
                               "eager step first and keep the gradients (zero_grad() zeroes them in place)")
        self._stash_fresh()
        self._table = self._build(entries)
        return self._table

    def _stash_fresh(self) -> None:
        """Before the table is rebuilt: keep its pending buffer restarts in the per-parameter state."""
        t = self._table
        if t is not None:
            for (_, p), f in zip(t["entries"], t["fresh"].tolist()):
                if f:
                    self.state[p]["_fresh_on_build"] = True

    def sync_hyperparameters(self) -> None:
        """Copy the groups' lr and weight_decay into the device table (call before replaying a graph)."""
        t = self._table
        if t is None:
            return
        values = [(float(g["lr"]), float(g["weight_decay"])) for g in self.param_groups]
        momentum, dampening, _ = self._shared()
        if values != t["hyper_values"] or (momentum, dampening) != t.get("md"):
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("SignedSGD: lr or weight_decay changed during CUDA graph capture; call "
                                   "sync_hyperparameters() before capturing or replaying")
            t["hyper"].copy_(torch.tensor(values, dtype=torch.float32), non_blocking=True)
            t["scalars"][:2].copy_(torch.tensor([momentum, dampening], dtype=torch.float32), non_blocking=True)
            t["hyper_values"], t["md"] = values, (momentum, dampening)

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, inv_scale: torch.Tensor | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        momentum, dampening, nesterov = self._shared()
        t = self._current_table()
        if t is None:
            return loss
        self.sync_hyperparameters()
        # loss scaling: from GradScaler (attributes it sets around this call) or from `inv_scale`
        grad_scale, scaler_found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        scaled = inv_scale is not None or grad_scale is not None or scaler_found_inf is not None
        check = inv_scale is not None and scaler_found_inf is None
        found = t["found_inf"]
        if scaled:
            if inv_scale is not None:
                t["scalars"][2:].copy_(inv_scale.reshape(1))
            elif grad_scale is not None:
                t["scalars"][2:].copy_(grad_scale.reshape(1).reciprocal())
            else:
                t["scalars"][2:].fill_(1.0)
            if scaler_found_inf is not None:
                found.copy_((scaler_found_inf.reshape(1) > 0).float())
            else:
                found.zero_()
        if t["by_dtype"]:
            from kernels.fused_sgd import fused_sgd, nonfinite_check

            if check:  # every dtype's gradients are checked before anything is updated
                for dt, sub in t["by_dtype"].items():
                    nonfinite_check(sub["ptrs"], sub["meta"], sub["chunks"], t["scalars"], found, dt)
            for dt, sub in t["by_dtype"].items():
                fused_sgd(sub["ptrs"], sub["meta"], sub["chunks"], t["hyper"], t["scalars"], t["fresh"], found, dt,
                          momentum=momentum != 0, nesterov=nesterov, scaled=scaled)
        else:
            params = [p for _, p in t["entries"]]
            group_of = [gi for gi, _ in t["entries"]]
            flag = signed_sgd_ref(
                params, [p.grad for p in params], [self._buf(p) for p in params],
                [bool(f) for f in t["fresh"].tolist()],
                [self.param_groups[g]["lr"] for g in group_of], [self.param_groups[g]["weight_decay"] for g in group_of],
                momentum, dampening, nesterov,
                inv_scale=t["scalars"][2] if scaled else None, found_inf=found if scaler_found_inf is not None else None)
            found.copy_(flag.reshape(1))
        if momentum != 0:
            if scaled:  # a skipped step leaves the restart pending
                t["fresh"].mul_((found > 0).to(torch.int64))
            else:
                t["fresh"].zero_()
        return loss

    def reset_momentum(self) -> None:
        """Restart every momentum buffer, in place: zeroed now, and set to d_p by the next step."""
        t = self._table
        if t is not None:
            bufs = [self.state[p]["momentum_buffer"] for _, p in t["entries"] if "momentum_buffer" in self.state[p]]
            if self._table_momentum() and bufs:
                torch._foreach_zero_(bufs)
            t["fresh"].fill_(1)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and t is None:
                    st["_fresh_on_build"] = True
                    if isinstance(st.get("momentum_buffer"), torch.Tensor):
                        st["momentum_buffer"].zero_()

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
        fresh = set()
        if self._table is not None:
            fresh = {id(p) for (_, p), f in zip(self._table["entries"], self._table["fresh"].tolist()) if f}
        for i, p in enumerate(order):
            if i in sd["state"]:
                st = {k: v for k, v in sd["state"][i].items() if not k.startswith("_")}
                if id(p) in fresh or self.state[p].get("_fresh_on_build"):
                    st["momentum_buffer"] = None
                sd["state"][i] = st
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # SGD-only keys we do not use
            if group.get("maximize"):
                raise ValueError("SignedSGD: maximize=True is not supported; use a negative lr")
        self._shared()
        self._table = None  # rebuilt on the next step: loaded buffers are copied into owned, layout-matched ones
