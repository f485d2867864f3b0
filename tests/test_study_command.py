"""The studies' shared ends (seal_fast/studies/command.py): a study given a bad checkpoint stops with one error line
(exit 1) and leaves no empty --out folder behind; a folder that existed before is left alone; usage lines and
--version come from the shared parser."""

import importlib

import pytest

STUDIES = ("depth", "transfer", "fewshot", "hessian", "pof")


def _argv(study: str, ckpt: str, out: str) -> list[str]:
    extra = {"transfer": ["--dataset", "synthetic"], "fewshot": ["--dataset", "synthetic"]}.get(study, [])
    return ["--checkpoint", ckpt, "--out", out, "--device", "cpu", *extra]


@pytest.mark.parametrize("study", STUDIES)
def test_bad_checkpoint_leaves_no_empty_out(study, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    out = tmp_path / "out" / study
    mod = importlib.import_module(f"seal_fast.studies.{study}")
    code = mod.main(_argv(study, str(junk), str(out)))
    err = capsys.readouterr().err
    assert code == 1, err  # a DataError: the file is not a checkpoint
    assert err.startswith("error: ") and "Traceback" not in err
    assert not out.exists(), f"{study} left {sorted(p.name for p in out.iterdir())} in an --out it made"


@pytest.mark.parametrize("study", ("depth", "pof"))
def test_existing_out_is_kept(study, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    out = tmp_path / "mine"
    out.mkdir()
    mod = importlib.import_module(f"seal_fast.studies.{study}")
    assert mod.main(_argv(study, str(junk), str(out))) == 1
    assert out.is_dir()


@pytest.mark.parametrize("study", STUDIES)
def test_version_and_usage(study, capsys):
    mod = importlib.import_module(f"seal_fast.studies.{study}")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("seal-fast ")
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    assert f"seal_fast {study}" in capsys.readouterr().out.splitlines()[0]
