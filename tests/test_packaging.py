"""The package claims no top-level name another project owns: kernels/ is imported and installed as
seal_fast.kernels (seal_fast/kernels links to it), never as `kernels`, which is a package on PyPI."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ours_import_beside_another_package_named_kernels(tmp_path):
    """A stub `kernels` first on the path: the optimizer and the KNN run through ours, the stub stays the only
    `kernels` in the process."""
    stub = tmp_path / "site" / "kernels"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("OWNER = 'someone else'\n")
    script = (
        "import sys, torch\n"
        "import kernels\n"
        "from seal_fast.optim import SignedSGD\n"
        "from seal_fast.kernels.knn import knn_topk\n"
        "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "SignedSGD([p], lr=0.1, momentum=0.9, backend='torch').step()\n"
        "d, i = knn_topk(torch.zeros(1, 2), torch.eye(2), 1, backend='torch')\n"
        "assert kernels.OWNER == 'someone else', kernels.__file__\n"
        "theirs = sorted(m for m in sys.modules if m == 'kernels' or m.startswith('kernels.'))\n"
        "assert theirs == ['kernels'], theirs\n"
        "import seal_fast.kernels as ours\n"
        "assert not hasattr(ours, 'OWNER') and ours.__name__ == 'seal_fast.kernels'\n"
        "print('ok', round(float(p[0]), 6), int(i[0, 0]))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(ROOT)]))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "0.9", "0"], done.stdout


def test_setup_installs_no_top_level_kernels():
    """What setup.py would install: seal_fast and its subpackages (seal_fast.kernels and .cuda among them), no
    top-level package of any other name."""
    script = (
        "import setuptools, runpy\n"
        "seen = {}\n"
        "setuptools.setup = lambda **kw: seen.update(kw)\n"
        "runpy.run_path('setup.py')\n"
        "print(' '.join(sorted(seen['packages'])))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    packages = done.stdout.split()
    assert {"seal_fast", "seal_fast.kernels", "seal_fast.kernels.cuda"} <= set(packages), packages
    assert {p.split(".")[0] for p in packages} == {"seal_fast"}, packages
