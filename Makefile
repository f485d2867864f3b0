# The two commands of the README. Both set up .venv (once) from setup.py, then run.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test cuda
setup: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

demo: setup
	$(PY) -m seal_fast.train --amp --channels-last

test: setup
	$(PY) -m pytest -q tests

# Optional: the native CUDA backend (CMakeLists.txt) -> kernels/cuda/lib/libseal_fast_cuda.so.
# CUDA_ARCHS=90 (one architecture) builds faster; rebuild after upgrading torch.
CUDA_ARCHS ?= 90;80
cuda: setup
	cmake -S . -B build -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-DSEAL_FAST_CUDA_ARCHITECTURES="$(CUDA_ARCHS)"
	cmake --build build -j
