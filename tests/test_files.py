"""seal_fast/files.py: every command's outputs are replaced whole, never left half-written."""

import pytest

from seal_fast.files import write_whole, written_whole


def test_write_whole_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "table.md"
    path.write_text("old\n")
    write_whole(path, "new\n")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]


def test_a_failure_while_writing_keeps_the_earlier_file(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("earlier\n")
    with pytest.raises(OSError, match="disk full"):
        with written_whole(path) as f:
            f.write("half of a new ")
            raise OSError("disk full")
    assert path.read_text() == "earlier\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_the_file_appears_under_its_name_only_once_closed(tmp_path):
    path = tmp_path / "new.json"
    with written_whole(path) as f:
        f.write("{}")
        f.flush()
        assert not path.exists()
    assert path.read_text() == "{}"


def test_text_goes_through_as_given(tmp_path):
    """newline="": csv's \\r\\n row ends and plain \\n are written as they are."""
    path = tmp_path / "x.csv"
    write_whole(path, "a,b\r\n1,2\r\n")
    assert path.read_bytes() == b"a,b\r\n1,2\r\n"


@pytest.mark.parametrize("module", ["seal_fast.studies.depth", "seal_fast.studies.fewshot",
                                    "seal_fast.studies.transfer", "seal_fast.studies.hessian",
                                    "seal_fast.studies.pof", "seal_fast.evaluate", "seal_fast.runs.report",
                                    "seal_fast.runs.study_page", "seal_fast.runs.slurm"])
def test_every_output_writer_goes_through_files_py(module):
    """No command here opens an output for writing directly (write_text / open(..., "w")): they go through files.py."""
    import ast
    import importlib
    import inspect

    source = inspect.getsource(importlib.import_module(module))
    direct = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "write_text":
            direct.append(f"line {node.lineno}: write_text")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
            modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
            modes += [k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
            if any("w" in m for m in modes):
                direct.append(f"line {node.lineno}: open(..., {modes[0]!r})")
    assert not direct, f"{module} writes files directly: {direct}"
