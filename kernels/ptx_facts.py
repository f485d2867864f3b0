"""Reading what the compiler produced, for the static report (kernels/compile_report.py compiles, this reads):
PTX global accesses and their source lines (`ptx_lines`, `ptx_accesses`), the Triton IR's tensor accesses
matched to them (`ttgir_tensor_accesses`, `tensor_access_widths`), registers and spills from a `ptxas -v` log
(`ptxas_resources`) or the cubin (`cuobjdump_resources`), and tensor-core instructions in the SASS (`sass_mma`).
Text in, facts out: nothing here compiles.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

_COMMENT = re.compile(r"//.*$")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+(\d+)")
_MEMOP = re.compile(r"(?<![\w.%$])(ld|st)((?:\.[\w:]+)+)")
_CPASYNC = re.compile(r"(?<![\w.%$])cp\.async((?:\.[\w:]+)+)\s+\[[^\]]*\]\s*,\s*\[[^\]]*\]\s*,\s*(0x[0-9a-fA-F]+|\d+)")
_TYPE = re.compile(r"^[bsuf](8|16|32|64|128)$")


def ptx_lines(ptx: str):
    """(line index, code without its comment, loc) of every PTX line that is not a .file / .loc directive or an
    inline-asm marker; loc is (file path, line, col) of the source line it came from, or None."""
    lines = ptx.splitlines()
    files = {m.group(1): m.group(2) for m in map(_FILE.match, lines) if m}  # the table comes at the end
    loc, in_asm, asm_loc = None, False, None
    for i, raw in enumerate(lines):
        if _FILE.match(raw):
            continue
        if "// begin inline asm" in raw:
            in_asm, asm_loc = True, None
            continue
        if "// end inline asm" in raw:
            in_asm = False
            continue
        m = _LOC.match(raw)
        if m:
            loc = (files.get(m.group(1), m.group(1)), int(m.group(2)), int(m.group(3)))
            if in_asm:  # LLVM numbers the lines of an inline asm string from the op's line on: keep the first
                asm_loc = asm_loc or loc
                loc = asm_loc
            continue
        yield i, _COMMENT.sub("", raw), loc


def ptx_accesses(ptx: str) -> list[dict]:
    """Every global memory access of a PTX text: {"op": "ld"|"st"|"cp.async", "vec", "elem_bits", "bits",
    "loc": (file, line, col) or None}. ld/st of other state spaces (param, shared, local) are left out."""
    out = []
    for _, line, loc in ptx_lines(ptx):
        m = _CPASYNC.search(line)
        if m:
            if ".global" in m.group(1) and ".bulk" not in m.group(1):
                nbytes = int(m.group(2), 0)
                out.append({"op": "cp.async", "vec": 1, "elem_bits": 8 * nbytes, "bits": 8 * nbytes, "loc": loc})
            continue
        m = _MEMOP.search(line)
        if not m:
            continue
        tokens = m.group(2).split(".")[1:]
        if "global" not in tokens:
            continue
        vec = next((int(t[1:]) for t in tokens if re.fullmatch(r"v\d+", t)), 1)
        elem = next((int(_TYPE.match(t).group(1)) for t in tokens if _TYPE.match(t)), None)
        out.append({"op": m.group(1), "vec": vec, "elem_bits": elem, "bits": vec * elem if elem else None,
                    "loc": loc})
    return out


_LOC_DEF = re.compile(r"^(#loc\d*)\s*=\s*loc\((.*)\)\s*$")
_LOC_USE = re.compile(r"loc\((#loc\d*|\"[^\"]*\":\d+:\d+)\)\s*$")
_TENSOR_PTR = re.compile(r"tensor<[^>]*?!tt\.ptr<(\w+)>")


def _resolve(ref: str, defs: dict, depth: int = 0):
    """A TTGIR location -> the innermost (file, line, col), or None (unknown / unparsed)."""
    if depth > 64:
        return None
    ref = ref.strip()
    m = re.fullmatch(r'"([^"]*)":(\d+):(\d+)', ref)
    if m:
        return m.group(1), int(m.group(2)), int(m.group(3))
    if ref.startswith("#loc"):
        return _resolve(defs[ref], defs, depth + 1) if ref in defs else None
    m = re.fullmatch(r'callsite\((\S+) at (\S+)\)', ref)  # callee at caller: the callee's own line
    if m:
        return _resolve(m.group(1), defs, depth + 1)
    m = re.fullmatch(r'"[^"]*"\((.*)\)', ref)  # a named location: "p"(#loc25)
    if m:
        return _resolve(m.group(1), defs, depth + 1)
    m = re.fullmatch(r"fused(?:<[^>]*>)?\[([^,\]]+).*\]", ref)
    if m:
        return _resolve(m.group(1), defs, depth + 1)
    return None


def ttgir_tensor_accesses(ttgir: str) -> list[dict]:
    """Tensor (not scalar) global loads/stores of a TTGIR text: {"op": "ld"|"st", "elem": "f32"..., "loc"}.
    async copies global -> shared count as loads."""
    lines = ttgir.splitlines()
    defs = {}
    for line in lines:
        m = _LOC_DEF.match(line.strip())
        if m:
            defs[m.group(1)] = m.group(2)
    out = []
    for line in lines:
        s = line.strip()
        if s.startswith("#"):
            continue
        if re.search(r"\btt\.load\b|\bttg\.async_copy_global_to_local\b", s):
            op = "ld"
        elif re.search(r"\btt\.store\b", s):
            op = "st"
        else:
            continue
        t = _TENSOR_PTR.search(s)
        m = _LOC_USE.search(s)
        if t is None:
            continue  # a scalar access
        out.append({"op": op, "elem": t.group(1), "loc": _resolve(m.group(1), defs) if m else None})
    return out


def tensor_access_widths(ptx_acc: list[dict], ttgir_acc: list[dict]) -> list[dict]:
    """The PTX accesses issued for TTGIR tensor accesses (same source location, same direction), each with
    the TTGIR element type added as "elem"."""
    where = {}
    for a in ttgir_acc:
        if a["loc"] is not None:
            where[(a["op"], a["loc"])] = a["elem"]
    out = []
    for a in ptx_acc:
        op = "ld" if a["op"] in ("ld", "cp.async") else "st"
        if a["loc"] is not None and (op, a["loc"]) in where:
            out.append(dict(a, elem=where[(op, a["loc"])]))
    return out


def ptxas_resources(log: str, kernel: str) -> dict:
    """Registers, spills, stack, barriers and warnings of one function from a `ptxas -v` log."""
    out = {}
    block = log
    m = re.search(rf"Compiling entry function '{re.escape(kernel)}'(.*?)(?=Compiling entry function|\Z)", log,
                  re.DOTALL)
    if m:
        block = m.group(1)
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
    if m:
        out.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
    m = re.search(r"Used (\d+) registers", block)
    if m:
        out["regs"] = int(m.group(1))
    notes = [ln.strip() for ln in log.splitlines()
             if re.search(r"warning|Performance Loss|serializ", ln, re.IGNORECASE)]
    out["ptxas_notes"] = " | ".join(dict.fromkeys(notes))
    return out


def _cuobjdump(cubin: bytes, flag: str):
    """`cuobjdump FLAG` of the cubin (written to a temp file): the CompletedProcess, None without cuobjdump."""
    tool = _tool("cuobjdump")
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.cubin"
        f.write_bytes(cubin)
        return subprocess.run([tool, flag, str(f)], capture_output=True, text=True, check=False)


def cuobjdump_resources(cubin: bytes, kernel: str) -> dict:
    """REG / STACK / SHARED / LOCAL of one function from `cuobjdump --dump-resource-usage`; {} when cuobjdump
    is missing or says nothing."""
    r = _cuobjdump(cubin, "--dump-resource-usage")
    if r is None:
        return {}
    m = re.search(rf"Function {re.escape(kernel)}:\s*\n\s*(.*)", r.stdout)
    if not m:
        return {}
    return {k.lower(): int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", m.group(1)) if "[" not in k}


def sass_mma(cubin: bytes) -> dict:
    """Counts of HGMMA (wgmma) and HMMA (mma.sync) instructions in the SASS; {} without cuobjdump."""
    r = _cuobjdump(cubin, "-sass")
    if r is None or r.returncode != 0 or "Function" not in r.stdout:
        return {}
    ins = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", r.stdout)
    return {"hgmma": sum(i == "HGMMA" for i in ins), "hmma": sum(i == "HMMA" for i in ins)}


def _tool(name: str):
    try:
        import triton

        path = getattr(triton.knobs.nvidia, name).path
        return path if path and os.path.exists(path) else None
    except Exception:  # noqa: BLE001 - no nvidia backend: the column says n/a
        return None


def _width_summary(acc: list[dict], op: str) -> tuple[str, int | None]:
    """"s:N v2:N v4:N" counts (vector width as issued) and the widest access in bits."""
    sel = [a for a in acc if a["op"] == op]
    counts = {}
    for a in sel:
        key = "s" if a["vec"] == 1 else f"v{a['vec']}"
        counts[key] = counts.get(key, 0) + 1
    order = sorted(counts, key=lambda k: 1 if k == "s" else int(k[1:]))
    text = " ".join(f"{k}:{counts[k]}" for k in order) or "0"
    bits = [a["bits"] for a in sel if a["bits"]]
    return text, (max(bits) if bits else None)

