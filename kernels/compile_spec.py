"""What a kernel file tells the static report (compile_report.py; bench/kernel_report.py prints it): every
configuration its launcher can pick, in a form `triton.compile` takes without a GPU (ASTSource + GPUTarget, e.g.
sm_90). A spec made for one architecture (a launcher whose table depends on the GPU: `arch`) is compiled for that
one only.

Each kernel file exposes `compile_specs() -> list[KernelSpec]`, built from the same selection code its
launcher uses, so the report and the tests cover exactly what ships.

A spec should see what the launcher's JIT call sees. At a launch Triton specialises each argument:
an integer equal to 1 becomes a constant (put it in `constexprs`, signature "constexpr"); an integer
that is a multiple of 16, or a tensor whose address is 16-byte aligned, is marked divisible by 16
(name it in `divisible`). Without these the static code can be narrower than what runs (e.g. a
contiguous stride compiled as a runtime value prevents vector loads).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def jit_function(fn):
    """The JITFunction under triton.autotune / triton.heuristics wrappers (each keeps the wrapped one in `.fn`)."""
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(fn, JITFunction):
        inner = getattr(fn, "fn", None)
        if inner is None or seen > 8:
            raise TypeError(f"{fn!r} is not a @triton.jit function (TRITON_INTERPRET set when it was defined?)")
        fn, seen = inner, seen + 1
    return fn


@dataclass(frozen=True)
class KernelSpec:
    label: str                 # e.g. "fused_sgd fp32 momentum" (unique within a kernel file)
    fn: object                 # the @triton.jit function
    signature: dict            # every argument name -> Triton type ("*fp32", "*i64", "i32", "fp32", "constexpr")
    constexprs: dict           # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 3
    facts: dict = field(default_factory=dict)  # what the launcher promises of this config (e.g. {"dtype": "bf16"})
    divisible: tuple = ()      # argument names the launch guarantees divisible by 16 (int) / 16-byte aligned (pointer)
    arch: int | None = None    # the one architecture this configuration ships for (e.g. 80, 90); None: any
    maxnreg: int | None = None  # the launch's maxnreg (PTX .maxnreg: ptxas's register cap), if it sets one

    @property
    def kernel(self) -> str:
        """The kernel's Python name, e.g. "_fused_sgd_kernel"."""
        return jit_function(self.fn).__name__

    def ast_source(self):
        from triton.compiler import ASTSource

        fn = jit_function(self.fn)
        names = fn.arg_names
        missing = set(names) - set(self.signature)
        if missing:
            raise ValueError(f"{self.label}: signature lacks {sorted(missing)}")
        unknown = (set(self.signature) | set(self.constexprs) | set(self.divisible)) - set(names)
        if unknown:
            raise ValueError(f"{self.label}: {fn.__name__} has no argument(s) {sorted(unknown)}")
        undeclared = {n for n, t in self.signature.items() if t == "constexpr"} - set(self.constexprs)
        if undeclared:
            raise ValueError(f"{self.label}: constexpr argument(s) {sorted(undeclared)} have no value")
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in self.divisible}
        return ASTSource(fn, {n: self.signature[n] for n in names},
                         constexprs={(names.index(n),): v for n, v in self.constexprs.items()}, attrs=attrs)

    def compile(self, arch: int | None = None):
        """Compile for a CUDA target without a GPU (Triton's own ptxas): `arch`, else the spec's own, else sm_90;
        returns triton's CompiledKernel."""
        import triton
        from triton.backends.compiler import GPUTarget

        arch = arch or self.arch or 90
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            options["maxnreg"] = self.maxnreg
        return triton.compile(self.ast_source(), target=GPUTarget("cuda", arch, 32), options=options)
