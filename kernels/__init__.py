"""GPU kernels of seal-fast, one op per file; reference.py holds their fp64 test oracles, cuda/ the optional native build."""
