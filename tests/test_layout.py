"""The layout (docs/architecture.md): every command through `python -m seal_fast COMMAND`; no import loop, and the
floors only import downward."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from seal_fast.__main__ import COMMANDS

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help_through_the_dispatcher(command):
    res = run("-m", "seal_fast", command, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage:"), res.stdout


def test_train_module_stays():
    res = run("-m", "seal_fast.train", "--help")
    assert res.returncode == 0, res.stderr
    assert "python -m seal_fast.train" in res.stdout


@pytest.mark.parametrize("args", [[], ["--help"], ["-h"]])
def test_bare_lists_the_commands(args):
    res = run("-m", "seal_fast", *args)
    assert res.returncode == 0, res.stderr
    for command in COMMANDS:
        assert f"\n  {command} " in res.stdout, res.stdout


def test_unknown_command_is_one_line_exit_2():
    res = run("-m", "seal_fast", "nope")
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: unknown command 'nope'"), res.stderr


def test_every_console_script_has_a_command():
    """setup.py's seal-NAME points at the module `python -m seal_fast NAME` runs."""
    script = (
        "import setuptools, runpy\n"
        "seen = {}\n"
        "setuptools.setup = lambda **kw: seen.update(kw)\n"
        "runpy.run_path('setup.py')\n"
        "print('\\n'.join(seen['entry_points']['console_scripts']))\n")
    done = run("-c", script)
    assert done.returncode == 0, done.stderr
    scripts = dict(line.split("=") for line in done.stdout.split())
    assert {name.removeprefix("seal-") for name in scripts} == set(COMMANDS)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert (module, func) == (COMMANDS[name.removeprefix("seal-")][0], "main")


# ----------------------------------------------------------------------------------------------
# Imports: no loop, and the floors (docs/architecture.md) only import downward
# ----------------------------------------------------------------------------------------------


def module_files() -> dict[str, Path]:
    """Every module of the package: seal_fast/** (not through the kernels link) and kernels/** as seal_fast.kernels."""
    files = {}
    for top, name in ((ROOT / "seal_fast", "seal_fast"), (ROOT / "kernels", "seal_fast.kernels")):
        for path in sorted(top.rglob("*.py")):
            rel = path.relative_to(top)
            if rel.parts[0] == "kernels" and top.name == "seal_fast":
                continue  # the link to kernels/, read from there
            parts = [name, *rel.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in the file (a function's lazy import counts too)."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # import a.b.c of a package's module: its deepest module
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def test_import_graph_sees_the_package():
    graph = import_graph()
    assert {"seal_fast.train", "seal_fast.studies.hessian", "seal_fast.runs.report", "seal_fast.kernels.knn",
            "seal_fast.data.layout"} <= set(graph)
    assert "seal_fast.studies.hessian_plots" in graph["seal_fast.studies.hessian"]
    assert "seal_fast.kernels.knn" in graph["seal_fast.studies.depth"]


def test_no_import_loop():
    graph = import_graph()
    state, loops = {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                loops.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not loops, "\n".join(" -> ".join(loop) for loop in loops)


def floor(module: str) -> str:
    for room in ("seal_fast.kernels", "seal_fast.studies", "seal_fast.runs", "seal_fast.__main__"):
        if module == room or module.startswith(room + "."):
            return room
    return "seal_fast"  # the trainer's core, data/ included


def test_imports_only_go_down():
    """kernels <- the trainer's core <- studies <- runs <- __main__ (the command table); the core never reaches up."""
    may_import = {
        "seal_fast.kernels": {"seal_fast.kernels"},
        "seal_fast": {"seal_fast", "seal_fast.kernels"},
        "seal_fast.studies": {"seal_fast", "seal_fast.kernels", "seal_fast.studies"},
        "seal_fast.runs": {"seal_fast", "seal_fast.kernels", "seal_fast.studies", "seal_fast.runs"},
        "seal_fast.__main__": {"seal_fast", "seal_fast.kernels", "seal_fast.studies", "seal_fast.runs"},
    }
    wrong = [f"{module} -> {target}" for module, targets in import_graph().items() for target in sorted(targets)
             if floor(target) not in may_import[floor(module)]]
    assert not wrong, "\n".join(wrong)


def test_studies_never_import_the_training_loop():
    wrong = [f"{module} -> seal_fast.train" for module, targets in import_graph().items()
             if floor(module) == "seal_fast.studies" and "seal_fast.train" in targets]
    assert not wrong, wrong


# ----------------------------------------------------------------------------------------------
# Room sizes: a module under ~450 lines, a function under ~80 (docs/architecture.md)
# ----------------------------------------------------------------------------------------------

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
# (file, function) -> why it stays longer; every entry must still exist and still be long (a stale one fails)
LONG_FUNCTIONS: dict[tuple[str, str], str] = {}
# file -> why it stays over MAX_MODULE_LINES (a stale entry fails too)
LONG_MODULES: dict[str, str] = {
    "bench/gpu_check.py": "the one prepared GPU command: its docstring is the step table with each step's time box "
                          "(checked against the plan by tests/test_gpu_check.py); its steps' commands are gpu_steps.py",
}


def project_sources() -> list[Path]:
    """The package (seal_fast/**, kernels/** once) and the measuring commands (bench/*.py); not the tests."""
    return [*module_files().values(), *sorted((ROOT / "bench").glob("*.py"))]


def long_functions() -> dict[tuple[str, str], int]:
    found = {}
    for path in project_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found[(str(path.relative_to(ROOT)), node.name)] = length
    return found


def test_every_module_is_under_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in project_sources()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    unexplained = {f: n for f, n in long.items() if f not in LONG_MODULES}
    stale = sorted(set(LONG_MODULES) - set(long))
    assert not unexplained, f"split these rooms (lines), or list them with a reason: {unexplained}"
    assert not stale, f"LONG_MODULES names rooms that are short now or gone: {stale}"


def test_every_function_is_under_80_lines_or_says_why():
    found = long_functions()
    unexplained = {k: n for k, n in found.items() if k not in LONG_FUNCTIONS}
    stale = sorted(set(LONG_FUNCTIONS) - set(found))
    assert not unexplained, f"split these functions (lines), or list them with a reason: {unexplained}"
    assert not stale, f"LONG_FUNCTIONS names functions that are gone or short now: {stale}"


def test_the_size_scan_sees_every_room():
    paths = {str(p.relative_to(ROOT)) for p in project_sources()}
    assert {"seal_fast/train.py", "kernels/knn.py", "bench/gpu_check.py", "seal_fast/studies/hessian.py"} <= paths
