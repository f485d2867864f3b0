"""GPU kernels of seal-fast, one op per file, each with a pure-PyTorch reference in reference.py."""
